"""Runners execute a planned embed job on one engine; all of them write the same part files.

A runner receives an `EmbedJob` (picklable: it travels to remote workers) and only schedules: it decodes each
shard's work items with `DecodeStage` in supervised processes, hands the decoded shard to the shard core
(`catalog_embed.workers.shard.ShardEmbedder`: batching, failure routing and counting live there), writes the core's rows with
`catalog_embed.pipelines.embed.lifecycle.shards.write_shard` and merges the shards' stats. The job then commits once on the driver. A new engine is a module here
with a class exposing `run(job, progress) -> RunStats`, plus a line in `options.RUNNER_CLASSES`; engine imports
(apache_beam, ray) stay in that module.

A runner whose driver may exit before its job ends (Beam: a Dataflow Flex Template launcher only builds the
graph) commits from its graph's last step through `job.commit` and says so in `RunStats.status`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyarrow as pa

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.pipelines.runners.options import RUNNER_CLASSES
from catalog_embed.schemas.errors import ConfigError, RunAbortedError
from catalog_embed.schemas.records import WorkItem
from catalog_embed.workers.rows import RowContext
from catalog_embed.workers.shard import ShardEmbedder, ShardStats
from catalog_embed.workers.stages import DecodeStage

if TYPE_CHECKING:  # the config imports the engines' options from this package: no import at run time
    from catalog_embed.pipelines.embed.config import EmbedConfig

# Below this many finished tracks the failure ratio is too noisy to abort a run on.
_MIN_TRACKS_FOR_ABORT = 20

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
    """

    run_id: str
    config: EmbedConfig
    items: tuple[WorkItem, ...]
    rows: RowContext
    commit: Callable[[RunStats], str] | None = None
    attempt: int = 0

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

    def decode_stage(self) -> DecodeStage:
        """The decode stage every runner runs in its supervised decode processes."""
        return DecodeStage(self.encoder, self.decode)

    def shard_embedder(self) -> ShardEmbedder:
        """The shard core every runner hands its decoded shards to (built cheaply; it loads in `setup()`)."""
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


def get_runner(name: str, **options: object) -> object:
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
