"""Runners execute a planned embed job on one engine; all of them write the same part files.

A runner receives an `EmbedJob` (picklable: it travels to remote workers), runs `DecodeStage` and `EmbedStage`
over its work items, and writes each shard's rows with `write_shard`. The job then commits once on the driver.
A new engine is a module here with a class exposing `run(job, progress) -> RunStats`, plus a line in `RUNNERS`;
engine imports (apache_beam, ray) stay in that module.

A runner whose driver may exit before its job ends (Beam: a Dataflow Flex Template launcher only builds the
graph) commits from its graph's last step through `job.commit` and says so in `RunStats.status`.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa

from schemas import failpoints
from schemas.errors import ConfigError, RunAbortedError
from schemas.manifest import WorkItem
from schemas.store import TableStore
from schemas.tables import EMBEDDINGS, FAILURES, WINDOWS
from workers.audio import DecodeConfig
from workers.rows import RowContext, embedding_rows, failure_rows, window_rows
from workers.stages import EncoderConfig, TrackEmbedding, TrackFailure

RUNNERS: dict[str, str] = {
    "local": "pipelines.runners.local:LocalRunner",
    "beam": "pipelines.runners.beam:BeamRunner",
    "dataflow": "pipelines.runners.beam:DataflowRunner",
    "ray": "pipelines.runners.ray:RayRunner",
}

# Below this many finished tracks the failure ratio is too noisy to abort a run on.
_MIN_TRACKS_FOR_ABORT = 20

Progress = Callable[[int, float], None]  # (tracks finished since last call, audio seconds)


@dataclass(frozen=True)
class EmbedJob:
    """A planned run: what to embed, how, and where its parts go."""

    run_id: str
    out: str
    items: tuple[WorkItem, ...]
    encoder: EncoderConfig
    decode: DecodeConfig
    rows: RowContext
    workers: int = 2
    shard_size: int = 64
    write_windows: bool = False
    decode_timeout_s: float = 300.0
    max_failure_ratio: float = 0.5
    storage_options: dict[str, str] | None = None
    commit: Callable[[RunStats], str] | None = None
    attempt: int = 0

    def shards(self) -> list[tuple[str, tuple[WorkItem, ...]]]:
        """Deterministic shards: the same plan and attempt always yield the same part names.

        The attempt number (how often the run was resumed) leads each name, so a resumed run never overwrites
        the parts an earlier attempt staged.
        """
        size = self.shard_size
        return [
            (f"{self.attempt:03d}-{i // size:06d}", self.items[i : i + size]) for i in range(0, len(self.items), size)
        ]

    def work_items(self) -> pa.Table:
        """The work items with their shard, one row per track, for engines that read their input as a table."""
        rows = [(shard, item) for shard, items in self.shards() for item in items]
        return pa.table(
            {
                "shard": pa.array([shard for shard, _ in rows], pa.string()),
                "track_id": pa.array([item.track_id for _, item in rows], pa.string()),
                "uri": pa.array([item.uri for _, item in rows], pa.string()),
                "fingerprint": pa.array([item.fingerprint for _, item in rows], pa.string()),
            }
        )

    def without_items(self) -> EmbedJob:
        """This job minus its work items: what workers need, without shipping the whole plan to each of them."""
        return replace(self, items=())

    def store(self) -> TableStore:
        """The output store (cheap; build one per worker)."""
        return TableStore(self.out, self.storage_options)


@dataclass
class RunStats:
    """Counts and stage timings a runner reports back.

    Attributes:
        status: None when the job is to commit the run (most runners). A runner that committed the run from its
            own graph through `EmbedJob.commit` sets 'succeeded'; one that returns before its job has run (a
            Dataflow Flex Template launch, whose job commits from its last step) sets 'launched'.
    """

    n_embedded: int = 0
    n_failed: int = 0
    audio_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    status: str | None = None

    def add_time(self, stage: str, seconds: float) -> None:
        """Accumulate time spent in a stage."""
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def record(self, embedded: list[TrackEmbedding], failed: list[TrackFailure]) -> None:
        """Count a finished shard."""
        self.n_embedded += len(embedded)
        self.n_failed += len(failed)
        self.audio_seconds += sum(e.duration_s for e in embedded)
        for failure in failed[: max(0, 5 - len(self.first_errors))]:
            self.first_errors.append(f"{failure.item.track_id}: {failure.error_type}: {failure.message}")

    def merge(self, other: RunStats) -> None:
        """Fold in another worker's stats."""
        self.n_embedded += other.n_embedded
        self.n_failed += other.n_failed
        self.audio_seconds += other.audio_seconds
        for stage, seconds in other.stage_seconds.items():
            self.add_time(stage, seconds)
        self.first_errors.extend(other.first_errors[: max(0, 5 - len(self.first_errors))])
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


def write_shard(
    job: EmbedJob, store: TableStore, shard: str, embedded: list[TrackEmbedding], failed: list[TrackFailure]
) -> float:
    """Write one shard's part files, always all of them and the embeddings part last: its presence marks the
    shard complete when a crashed run is resumed (see `TableStore.staged_progress`).

    Returns:
        Seconds spent writing.
    """
    start = time.perf_counter()
    store.write_part(job.run_id, FAILURES, shard, failure_rows(failed, job.rows))
    if job.write_windows:
        store.write_part(job.run_id, WINDOWS, shard, window_rows(embedded, job.rows))
    failpoints.hit("write_shard", shard)  # a worker lost mid-shard: some parts written, not the last
    store.write_part(job.run_id, EMBEDDINGS, shard, embedding_rows(embedded, job.rows))
    return time.perf_counter() - start


def split_results(
    results: Iterator[TrackEmbedding | TrackFailure] | list[TrackEmbedding | TrackFailure],
) -> tuple[list[TrackEmbedding], list[TrackFailure]]:
    """Separate embeddings from failures."""
    embedded: list[TrackEmbedding] = []
    failed: list[TrackFailure] = []
    for result in results:
        (failed if isinstance(result, TrackFailure) else embedded).append(result)
    return embedded, failed


def get_runner(name: str, **options: object) -> object:
    """Construct the runner registered as `name`.

    Raises:
        ConfigError: unknown runner; the message lists the valid ones.
    """
    try:
        target = RUNNERS[name]
    except KeyError:
        msg = f"unknown runner {name!r}; choose one of: {', '.join(RUNNERS)}"
        raise ConfigError(msg) from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)(**options)
