"""The shard core: the one place where a shard of decoded tracks becomes table rows, failures rows and stats.

    (decoded track | failure, decode s)* ─▶ batches across tracks ─▶ EmbedStage ─▶ route ─▶ ShardOutput

Every runner schedules it and nothing else: the local runner feeds it from its decode pool as tracks arrive, Beam
and Ray feed it the decoded shard their decode tasks hand over (`decode_shard`). Batching across tracks, failure
routing and counting live here only:

- a track that failed to decode (or in the front end next to the decoder) arrives as a `TrackFailure` and stays
  one;
- a track the front end fails on when it runs on the encoder's device costs that track (stage `frontend`);
- a batch whose encoder call raises is split in halves until the tracks that cause it stand alone; each gets a
  `failures` row (stage `encode`) and the others land. CUDA out of memory (`torch.OutOfMemoryError`) first halves
  the windows per encoder call, for the rest of the run, and retries; only a track that fails alone at one window
  per call is given up;
- a track whose embeddings are not finite (NaN, inf) gets a `failures` row, never a table row.

Engine- and storage-free: no apache_beam, ray or deltalake here. The rows come back as Arrow tables; the job layer
writes them (`catalog_embed.pipelines.embed.lifecycle.shards.write_shard`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from catalog_embed.schemas.records import TrackEmbedding, TrackFailure, WorkItem
from catalog_embed.workers.isolation import IsolatedPool
from catalog_embed.workers.rows import RowContext, embedding_rows, failure_rows, window_rows
from catalog_embed.workers.stages import EmbedStage, EncoderConfig, Resources, TrackFeatures, TrackFeatureSet

Decoded = tuple[TrackFeatures | TrackFeatureSet | TrackFailure, float]  # a decode result and the seconds it took
DecodedShard = tuple[str, Iterable[Decoded]]  # a shard's part name and its tracks as decoded, in plan order
_LOG = logging.getLogger(__name__)
# Failures described in a shard's stats, for the run summary.
_FIRST_ERRORS = 5


@dataclass
class ShardStats:
    """Counts and stage timings of one or more shards."""

    n_embedded: int = 0
    n_failed: int = 0
    audio_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    def add_time(self, stage: str, seconds: float) -> None:
        """Accumulate time spent in a stage."""
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def record(self, embedded: list[TrackEmbedding], failed: list[TrackFailure]) -> None:
        """Count finished tracks."""
        self.n_embedded += len(embedded)
        self.n_failed += len(failed)
        self.audio_seconds += sum(e.duration_s for e in embedded)
        for failure in failed[: max(0, _FIRST_ERRORS - len(self.first_errors))]:
            self.first_errors.append(f"{failure.item.track_id}: {failure.error_type}: {failure.message}")

    def merge(self, other: ShardStats) -> None:
        """Fold in another shard's or worker's stats."""
        self.n_embedded += other.n_embedded
        self.n_failed += other.n_failed
        self.audio_seconds += other.audio_seconds
        for stage, seconds in other.stage_seconds.items():
            self.add_time(stage, seconds)
        self.first_errors.extend(other.first_errors[: max(0, _FIRST_ERRORS - len(self.first_errors))])


@dataclass
class ShardOutput:
    """One shard's rows in the table schemas, under the shard's deterministic part name, and its stats.

    Attributes:
        windows: the `windows` rows, or None when the job does not write that table.
    """

    name: str
    embeddings: pa.Table
    failures: pa.Table
    windows: pa.Table | None
    stats: ShardStats

    @classmethod
    def of(
        cls,
        name: str,
        embedded: list[TrackEmbedding],
        failed: list[TrackFailure],
        rows: RowContext,
        with_windows: bool,
        stats: ShardStats | None = None,
    ) -> ShardOutput:
        """The rows of finished tracks, counted into `stats` (new stats when None)."""
        stats = stats or ShardStats()
        stats.record(embedded, failed)
        return cls(
            name=name,
            embeddings=embedding_rows(embedded, rows),
            failures=failure_rows(failed, rows),
            windows=window_rows(embedded, rows) if with_windows else None,
            stats=stats,
        )


def decode_shard(pool: IsolatedPool, items: Iterable[WorkItem]) -> list[Decoded]:
    """Decode a shard's tracks in order in a supervised pool (for engines that decode in a task of their own)."""
    return list(pool.imap(items, ahead=1))


@dataclass
class ShardEmbedder:
    """Turns a shard of decoded tracks into a `ShardOutput`; a `Stage` that engines place on the encoder's device.

    Args:
        encoder: which encoder, where; `batch_windows` is the windows per encoder call.
        rows: what every row of the run shares.
        write_windows: also make the `windows` rows (and keep each track's timeline for them).
    """

    encoder: EncoderConfig
    rows: RowContext
    write_windows: bool = False
    _stage: EmbedStage | None = field(default=None, init=False, repr=False)
    _unreported_load_s: float = field(default=0.0, init=False, repr=False)

    @property
    def resources(self) -> Resources:
        """The encoder's: one core, and its GPU when it runs on one."""
        return EmbedStage(self.encoder).resources

    def setup(self) -> None:
        """Load the encoder (once per worker)."""
        if self._stage is None:
            start = time.perf_counter()
            stage = EmbedStage(self.encoder, keep_timeline=self.write_windows)
            stage.setup()
            self._stage = stage
            self._unreported_load_s = time.perf_counter() - start

    def teardown(self) -> None:
        """Release the encoder."""
        if self._stage is not None:
            self._stage.teardown()
            self._stage = None

    def process(self, shard: DecodedShard) -> ShardOutput:
        """Embed the decoded tracks of a shard in batches of at most `batch_windows` windows across them (a track
        with more windows alone, in several).

        The tracks may come from a lazy iterator (the local runner's decode queue): they are taken as they come
        and a batch is embedded as soon as the next track would not fit, while the decoders work ahead.
        """
        name, decoded = shard
        self.setup()
        stats = ShardStats()
        if self._unreported_load_s:  # the first shard after loading reports it
            stats.add_time("load_model", self._unreported_load_s)
            self._unreported_load_s = 0.0
        results: list[TrackEmbedding | TrackFailure] = []
        pending: list[TrackFeatures] = []
        pending_windows = 0
        for result, seconds in decoded:
            stats.add_time("decode", seconds)
            if isinstance(result, TrackFailure):
                results.append(result)
                continue
            if pending and pending_windows + result.n_windows > self._stage.batch_windows:
                # The pending tracks go first, in one batch: an encoder of a fixed batch shape (on a GPU) pads a
                # call's last batch, and a track spilling into a second one would pad nearly a whole batch.
                results.extend(self._timed(pending, stats))
                pending, pending_windows = [], 0
            pending.append(result)
            pending_windows += result.n_windows
            if pending_windows >= self._stage.batch_windows:
                results.extend(self._timed(pending, stats))
                pending, pending_windows = [], 0
        results.extend(self._timed(pending, stats))
        embedded = [r for r in results if isinstance(r, TrackEmbedding)]
        failed = [r for r in results if isinstance(r, TrackFailure)]
        return ShardOutput.of(name, embedded, failed, self.rows, self.write_windows, stats)

    def _timed(self, tracks: list[TrackFeatures], stats: ShardStats) -> list[TrackEmbedding | TrackFailure]:
        start = time.perf_counter()
        results = self._embed(tracks)
        stats.add_time("encode", time.perf_counter() - start)
        return results

    def _embed(self, tracks: list[TrackFeatures]) -> list[TrackEmbedding | TrackFailure]:
        """Embed `tracks`; when the encoder raises, retry smaller (out of memory) or split to find the culprits."""
        stage = self._stage
        shrunk = False
        # The tracebacks go: they hold the failed call's frames, and with them its tensors (on a GPU, the memory
        # the retry needs).
        try:
            return stage.process(tracks)
        except torch.OutOfMemoryError as exc:
            error: Exception = exc.with_traceback(None)
            shrunk = stage.shrink_batch()
        except Exception as exc:  # noqa: BLE001 (any error of the encoder is a dead letter, not a dead run)
            error = exc.with_traceback(None)
        if shrunk:
            _LOG.warning("the encoder ran out of memory: %d windows per call from now on", stage.batch_windows)
            return self._embed(tracks)
        if len(tracks) == 1:
            return [TrackFailure.from_error(tracks[0].item, error, stage="encode")]
        half = len(tracks) // 2
        return self._embed(tracks[:half]) + self._embed(tracks[half:])


@dataclass(frozen=True)
class ModelJob:
    """One encoder of a run with several (`--model a,b,...`).

    Attributes:
        encoder: which encoder, where.
        rows: what every row of this encoder shares.
        skip: track ids of the run's work items this encoder does not embed (its rows are current).
    """

    encoder: EncoderConfig
    rows: RowContext
    skip: frozenset[str] = frozenset()


@dataclass
class MultiShardEmbedder:
    """The shard core for several encoders over one decode (`catalog_embed.workers.stages.MultiDecodeStage`): each
    encoder's `ShardEmbedder` embeds its own tracks of the shard, and their rows make one `ShardOutput`, so a
    shard is staged (and resumed) for all encoders at once.

    A track that failed to decode becomes a failure of each encoder that planned it; every other failure is its
    encoder's own. The shard's decoded tracks are held until the last encoder has taken them.
    """

    models: tuple[ModelJob, ...]
    write_windows: bool = False
    _embedders: tuple[ShardEmbedder, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._embedders = tuple(ShardEmbedder(m.encoder, m.rows, self.write_windows) for m in self.models)

    @property
    def resources(self) -> Resources:
        """One core, and a GPU when any encoder runs on one (they share it: one device per run)."""
        return max((e.resources for e in self._embedders), key=lambda r: r.gpus)

    def setup(self) -> None:
        """Load every encoder (once per worker)."""
        for embedder in self._embedders:
            embedder.setup()

    def teardown(self) -> None:
        """Release the encoders."""
        for embedder in self._embedders:
            embedder.teardown()

    def process(self, shard: DecodedShard) -> ShardOutput:
        """Embed a decoded shard with every encoder; one output holding all encoders' rows."""
        name, decoded = shard
        tracks = list(decoded)
        stats = ShardStats()
        stats.add_time("decode", sum(seconds for _, seconds in tracks))  # once: the encoders share the decode
        outputs = []
        for i, (model, embedder) in enumerate(zip(self.models, self._embedders, strict=True)):
            mine = [(r, 0.0) for result, _ in tracks if (r := _for_model(result, i, model)) is not None]
            outputs.append(embedder.process((name, mine)))
        for output in outputs:
            stats.merge(output.stats)
        return ShardOutput(
            name=name,
            embeddings=pa.concat_tables([o.embeddings for o in outputs], promote_options="default"),
            failures=pa.concat_tables([o.failures for o in outputs]),
            windows=pa.concat_tables([o.windows for o in outputs]) if self.write_windows else None,
            stats=stats,
        )


def _for_model(result: TrackFeatureSet | TrackFailure, index: int, model: ModelJob) -> TrackFeatures | TrackFailure | None:
    """What encoder `index` of a multi-encoder run gets of a decode result: None when it does not embed the track."""
    if isinstance(result, TrackFailure):
        return None if result.item.track_id in model.skip else result
    return result.per_model[index]
