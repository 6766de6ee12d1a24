"""Runners execute a planned embed job on one engine; all of them write the same part files.

A runner receives an `EmbedJob` (picklable: it travels to remote workers) and only schedules: it decodes each
shard's work items with `DecodeStage` in supervised processes, hands the decoded shard to the shard core
(`catalog_embed.workers.shard.ShardEmbedder`: batching, failure routing and counting live there), writes the core's rows with
`catalog_embed.pipelines.embed.lifecycle.shards.write_shard` and merges the shards' stats. The job then commits once on the driver. A new engine is a module here
with a class exposing `run(job, progress) -> RunStats`, plus a line in `options.RUNNER_CLASSES`; engine imports
(apache_beam, ray) stay in that module. `Runner` states that protocol.

A runner whose driver may exit before its job ends (Beam: a Dataflow Flex Template launcher only builds the
graph) commits from its graph's last step through `job.commit` and says so in `RunStats.status`.

Runners whose shards run out of the driver's sight (Beam, Ray) report progress with `ShardWatcher`, which watches
the run's staging for finished shards: it works the same on any engine and any store.
"""

from __future__ import annotations

import importlib
import logging
import posixpath
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, Self

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.pipelines.runners.options import RUNNER_CLASSES
from catalog_embed.schemas.errors import ConfigError, RunAbortedError
from catalog_embed.schemas.records import WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS
from catalog_embed.workers.rows import RowContext
from catalog_embed.workers.shard import ModelJob, MultiShardEmbedder, ShardEmbedder, ShardStats
from catalog_embed.workers.stages import DecodeStage, MultiDecodeStage

if TYPE_CHECKING:  # the config imports the engines' options from this package: no import at run time
    from catalog_embed.pipelines.embed.config import EmbedConfig

# Below this many finished tracks the failure ratio is too noisy to abort a run on.
_MIN_TRACKS_FOR_ABORT = 20
# Seconds between two looks of `ShardWatcher` at the staging: one listing of a folder, cheap on object stores too.
_WATCH_INTERVAL_S = 2.0
_LOG = logging.getLogger(__name__)

Progress = Callable[[int, float], None]  # (tracks finished since last call, audio seconds)


@dataclass(frozen=True)
class EmbedJob:
    """A planned run: its config, what to embed, and the identity its rows carry.

    Attributes:
        run_id: the run.
        config: the run's configuration (a `catalog_embed.pipelines.embed.config.EmbedConfig`), as the user gave it, its batch sized.
        items: the tracks to embed, in plan order.
        rows: what every row of the run records (model, version, layers, feature hash).
        commit: commits the run, for runners whose graph commits it (Beam).
        attempt: how often the run was resumed; it leads the part names.
        models: with several encoders (`--model a,b,...`), one entry each (its encoder, rows and the items it does
            not embed): each track is decoded once for all of them. Empty: the one encoder of `config` and `rows`.
    """

    run_id: str
    config: EmbedConfig
    items: tuple[WorkItem, ...]
    rows: RowContext
    commit: Callable[[RunStats], str] | None = None
    attempt: int = 0
    models: tuple[ModelJob, ...] = ()

    # What the runners read of the config, by the names they use.
    encoder = property(lambda self: self.config.encoder)
    decode = property(lambda self: self.config.decode)
    workers = property(lambda self: self.config.workers)
    shard_size = property(lambda self: self.config.shard_size)
    write_windows = property(lambda self: self.config.write_windows)
    decode_timeout_s = property(lambda self: self.config.decode_timeout_s)
    max_failure_ratio = property(lambda self: self.config.max_failure_ratio)

    def shards(self) -> list[tuple[str, tuple[WorkItem, ...]]]:
        """Deterministic shards: the same plan and attempt always yield the same part names.

        The attempt number (how often the run was resumed) leads each name, so a resumed run never overwrites
        the parts an earlier attempt staged.
        """
        size = self.shard_size
        return [
            (f"{self.attempt:03d}-{i // size:06d}", self.items[i : i + size]) for i in range(0, len(self.items), size)
        ]

    def shard_table(self) -> pa.Table:
        """The shards as a table for engines that read their input as one: one row per shard, holding its work
        items' fields as lists in plan order."""
        shards = self.shards()
        return pa.table(
            {
                "shard": pa.array([shard for shard, _ in shards], pa.string()),
                "track_id": pa.array([[i.track_id for i in items] for _, items in shards], pa.list_(pa.string())),
                "uri": pa.array([[i.uri for i in items] for _, items in shards], pa.list_(pa.string())),
                "fingerprint": pa.array([[i.fingerprint for i in items] for _, items in shards], pa.list_(pa.string())),
            }
        )

    def without_items(self) -> EmbedJob:
        """This job minus its work items: what workers need, without shipping the whole plan to each of them."""
        return replace(self, items=())

    def store(self) -> TableStore:
        """The output store (cheap; build one per worker)."""
        return TableStore(self.config.out, self.config.storage_options)

    def decode_stage(self) -> DecodeStage | MultiDecodeStage:
        """The decode stage every runner runs in its supervised decode processes."""
        if self.models:
            stages = tuple(DecodeStage(m.encoder, self.decode) for m in self.models)
            return MultiDecodeStage(stages, tuple(m.skip for m in self.models))
        return DecodeStage(self.encoder, self.decode)

    def shard_embedder(self) -> ShardEmbedder | MultiShardEmbedder:
        """The shard core every runner hands its decoded shards to (built cheaply; it loads in `setup()`)."""
        if self.models:
            return MultiShardEmbedder(self.models, self.write_windows)
        return ShardEmbedder(self.encoder, self.rows, self.write_windows)


@dataclass
class RunStats(ShardStats):
    """Counts and stage timings a runner reports back: the shards' stats merged, and how the run ended.

    Attributes:
        status: None when the job is to commit the run (most runners). A runner that committed the run from its
            own graph through `EmbedJob.commit` sets 'succeeded'; one that returns before its job has run (a
            Dataflow Flex Template launch, whose job commits from its last step) sets 'launched'.
    """

    status: str | None = None

    def merge(self, other: ShardStats) -> None:
        """Fold in a shard's or another worker's stats."""
        super().merge(other)
        if isinstance(other, RunStats):
            self.status = other.status or self.status

    def check_failure_ratio(self, limit: float) -> None:
        """Abort when so many tracks fail that the run is broken as a whole (bad credentials, wrong bucket)."""
        done = self.n_embedded + self.n_failed
        if done >= _MIN_TRACKS_FOR_ABORT and self.n_failed / done > limit:
            raise self.aborted_error(limit)

    def aborted_error(self, limit: float) -> RunAbortedError:
        """The error of a run aborted for failing more than `limit` of its tracks."""
        msg = (
            f"{self.n_failed} of {self.n_embedded + self.n_failed} tracks failed, above --max-failure-ratio "
            f"{limit:g}: the run is broken as a whole and was aborted; nothing was committed. "
            f"First errors: {'; '.join(self.first_errors) or 'none recorded'}"
        )
        return RunAbortedError(msg)


class Runner(Protocol):
    """What every engine's runner offers the embed job."""

    def run(self, job: EmbedJob, progress: Progress | None = None) -> RunStats:
        """Embed and stage every shard of `job`, calling `progress(tracks, audio_seconds)` as shards finish.

        Returns:
            The merged stats of the shards; `status` set when the runner committed (or launched) the run itself.

        Raises:
            RunAbortedError: too many tracks failed.
        """
        ...


class ShardWatcher:
    """Reports a job's shards to `progress` while an engine runs them out of the driver's sight (Beam's workers,
    Dataflow, a Ray cluster), per shard as each finishes rather than once at the end.

    A thread on the driver lists the run's staged embeddings parts every few seconds: `write_shard`
    (`catalog_embed.pipelines.embed.lifecycle.shards`) writes that part last, so each one of this job's shards that appears is a finished shard (its tracks, and the audio its
    rows hold). Use it as a context manager around the engine's run, then call `finish` with the run's stats.

    Args:
        job: the running job.
        progress: the callback; None reports nothing.
        interval_s: seconds between two looks at the staging.
    """

    def __init__(self, job: EmbedJob, progress: Progress | None, interval_s: float = _WATCH_INTERVAL_S) -> None:
        self._store = job.store()
        self._run_id = job.run_id
        self._progress = progress
        self._interval_s = interval_s
        self._pending = {f"part-{name}.parquet": len(items) for name, items in job.shards()}
        self._total = len(job.items)
        self._tracks = 0
        self._audio_s = 0.0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="shard-watcher", daemon=True)

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def poll(self) -> None:
        """Report the shards staged since the last look."""
        try:
            parts = self._store.staged_parts(self._run_id, EMBEDDINGS)
            finished = {name: path for path in parts if (name := posixpath.basename(path)) in self._pending}
            audio_s = {name: self._audio_seconds(path) for name, path in finished.items()}
        except OSError as exc:  # progress is no reason to fail a run: look again next time
            _LOG.debug("run %s: could not read the staged shards (%s)", self._run_id, exc)
            return
        for name, seconds in audio_s.items():
            self._report(self._pending.pop(name), seconds)

    def finish(self, audio_seconds: float) -> None:
        """Report what the looks did not catch once the engine has returned, or raise what `progress` raised
        meanwhile (a lost lease: `RunLostError`).

        Args:
            audio_seconds: the whole run's audio seconds.
        """
        if self._error is not None:
            raise self._error
        if self._progress is not None and self._tracks < self._total:
            self._progress(self._total - self._tracks, max(audio_seconds - self._audio_s, 0.0))

    def _audio_seconds(self, path: str) -> float:
        """The audio a staged embeddings part holds."""
        durations = pq.read_table(path, columns=["duration_s"], filesystem=self._store.fs)["duration_s"]
        return pc.sum(durations).as_py() or 0.0

    def _report(self, n_tracks: int, audio_s: float) -> None:
        self._tracks += n_tracks
        self._audio_s += audio_s
        self._progress(n_tracks, audio_s)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 (handed to the driver's thread by `finish`)
                self._error = exc
                return


def get_runner(name: str, **options: object) -> Runner:
    """Construct the runner registered as `name`.

    Raises:
        ConfigError: unknown runner; the message lists the valid ones.
    """
    try:
        target = RUNNER_CLASSES[name]
    except KeyError:
        msg = f"unknown runner {name!r}; choose one of: {', '.join(RUNNER_CLASSES)}"
        raise ConfigError(msg) from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)(**options)
