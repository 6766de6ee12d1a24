"""Committing a run: its staged parts into the tables, then its `runs` row, by the embed job's rules.

Each step is one Delta commit tagged with the application transaction of its table and run, at a version derived
from what the step writes (`content_version`): a step is skipped only when the table holds the same content under
that transaction, so a commit killed half-way finishes on the next try without duplicating, and rows that an
adopter of the run staged since are committed, never skipped as done. The `runs` row is committed last and once
per run: it marks the run committed. The holder keeps its lease through the commit and each step first checks
that it still holds the run.

The rules (README, "The tables"):
- failures: this run's failures are upserted; failures of tracks that embedded now, or left the catalog, are
  deleted.
- windows: this run's timelines are upserted; a track embedded without a timeline loses its old one (`windows`
  never holds another recording's timeline), and so do tracks retired below.
- embeddings: this run's rows replace their keys. A track whose file changed (its failure's fingerprint differs
  from its embedding's) and now fails is retired: its embedding and timeline are deleted in the commit that
  records its failure (earlier versions stay readable through Delta time travel). A track whose file is unchanged,
  or was not looked at (refused by the URI policy), keeps its previous embedding until a run succeeds.
- tracks gone from the catalog: their embeddings are marked `deleted` (deleted, timelines too, with --prune).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version

import pyarrow as pa
import pyarrow.compute as pc

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.lifecycle.shards import staged_counts
from catalog_embed.pipelines.embed.lifecycle.staging import RunState, StagedRun
from catalog_embed.pipelines.embed.maintain import maintain
from catalog_embed.pipelines.io.store import TableStore, app_id, content_version, merge_rows
from catalog_embed.pipelines.runners import RunStats
from catalog_embed.schemas.errors import RunAbortedError, RunLostError
from catalog_embed.schemas.records import REFUSED_FINGERPRINT
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES, RUNS, WINDOWS

KEYS = pa.schema([pa.field("model", pa.string()), pa.field("track_id", pa.string())])


def commit_run(
    store: TableStore,
    run_id: str,
    run_row: pa.Table,
    gone: pa.Table | None = None,
    prune: bool = False,
    staged: bool = True,
    fence: Callable[[], None] | None = None,
) -> None:
    """Commit a run (see the module docstring), then remove its staging.

    Args:
        store: the output store.
        run_id: the run.
        run_row: its `runs` row.
        gone: (model, track_id) of tracks that left the catalog.
        prune: delete rather than mark the rows of tracks gone from the catalog.
        staged: commit the run's staged parts (False: an aborted run commits only its `runs` row).
        fence: called before each step; raises when this process may no longer commit the run.
    """
    gone = (gone if gone is not None else KEYS.empty_table()).cast(KEYS)
    embeddings = store.read_staged(run_id, EMBEDDINGS) if staged else EMBEDDINGS.schema.empty_table()
    failures = store.read_staged(run_id, FAILURES) if staged else FAILURES.schema.empty_table()
    windows = store.read_staged(run_id, WINDOWS) if staged else WINDOWS.schema.empty_table()
    embedded = embeddings.select(KEYS.names).cast(KEYS)
    retired = _changed_and_failed(store, failures)
    resolved = pa.concat_tables([embedded, gone])
    # A timeline staged for a key is upserted (merge_rows drops it from the deletions); any other is deleted.
    no_timeline = pa.concat_tables([embedded, retired, *([gone] if prune else [])])
    kept = embeddings.filter(pc.invert(pc.is_in(embedded["track_id"], gone["track_id"]))) if gone.num_rows else embeddings
    steps = [
        (FAILURES, (failures, resolved),
         lambda t, txn: merge_rows(t, FAILURES, failures.cast(FAILURES.schema), txn, delete=resolved)),
        (WINDOWS, (windows, no_timeline), lambda t, txn: merge_rows(t, WINDOWS, windows, txn, delete=no_timeline)),
        # One commit for the night's embeddings (see merge_rows): a track gone from the catalog is never upserted.
        (EMBEDDINGS, (kept, retired, gone, pa.table({"prune": [prune]})),
         lambda t, txn: merge_rows(
             t, EMBEDDINGS, kept, txn, delete=pa.concat_tables([retired, *([gone] if prune else [])]),
             mark_deleted=None if prune else gone,
         )),
    ]
    tag = {"catalog_embed.run_id": run_id}
    for spec, content, step in steps:
        if fence is not None:
            fence()
        store.commit_step(spec, app_id(run_id), step, version=content_version(*content), tag=tag)
    if fence is not None:
        fence()
    store.commit_step(
        RUNS, app_id(run_id), lambda t, txn: store.append(t, run_row.cast(RUNS.schema), txn), any_version=True, tag=tag
    )
    store.drop_staging(run_id)


def _changed_and_failed(store: TableStore, failures: pa.Table) -> pa.Table:
    """Keys of the failed tracks whose embedding was computed from another file than the one that failed now."""
    looked_at = failures.filter(pc.not_equal(failures["source_fingerprint"], REFUSED_FINGERPRINT))
    if looked_at.num_rows == 0:
        return KEYS.empty_table()
    live = store.read(EMBEDDINGS, ["model", "track_id", "source_fingerprint"])  # keys only, never the vectors
    pairs = looked_at.select(["model", "track_id", "source_fingerprint"]).join(
        live, ["model", "track_id"], right_suffix="_embedded", join_type="inner"
    )
    changed = pairs.filter(pc.not_equal(pairs["source_fingerprint"], pairs["source_fingerprint_embedded"]))
    return changed.select(KEYS.names).cast(KEYS).sort_by([(k, "ascending") for k in KEYS.names])


@dataclass(frozen=True)
class ModelCommit:
    """What one encoder of a run records in its `runs` row and retires."""

    model: str
    model_version: str
    licence_code: str
    licence_weights: str
    feature_hash: str
    n_planned: int
    n_skipped: int
    gone: tuple[str, ...]


@dataclass(frozen=True)
class RunCommit:
    """Commits one run: its staged parts, then its `runs` rows (see `commit_run`).

    A run of several encoders (`--model a,b,...`) commits one `runs` row per encoder, all under its run id and
    in the one commit that marks the run committed: each row holds its encoder's identity and counts; the config,
    timings and stage seconds are the run's, shared by the rows.

    Picklable, so that a runner whose driver may exit before its job ends (Beam, launched from a Dataflow Flex
    Template) can commit from its graph's last step; committing a run twice adds nothing.
    """

    config: EmbedConfig
    run_id: str
    models: tuple[ModelCommit, ...]
    n_catalog: int
    started: datetime
    lease_owner: str

    def succeed(self, stats: RunStats) -> None:
        """Commit a finished run's parts and a `succeeded` runs row."""
        store = TableStore(self.config.out, self.config.storage_options)
        if StagedRun.read(store, self.run_id).state is RunState.COMMITTED:
            store.drop_staging(self.run_id)  # a retried commit of a committed run (a repeated Beam bundle)
            return
        self._commit(store, stats, "succeeded")
        if self.config.maintain_target_mb:
            maintain(self.config.out, self.config.maintain_target_mb, self.config.storage_options)

    def abort(self) -> None:
        """Drop the run's parts and commit an `aborted` runs row."""
        self._commit(TableStore(self.config.out, self.config.storage_options), RunStats(), "aborted")

    def finish(self, stats: RunStats) -> str:
        """Abort the run when too many tracks failed, else commit it; returns the status committed."""
        try:
            stats.check_failure_ratio(self.config.max_failure_ratio)
        except RunAbortedError:
            self.abort()
            return "aborted"
        self.succeed(stats)
        return "succeeded"

    def _fence(self, store: TableStore) -> None:
        """Raise RunLostError unless this process still holds the run, uncommitted."""
        staged = StagedRun.read(store, self.run_id)
        if staged.state is RunState.COMMITTED:
            msg = f"run {self.run_id} was committed by another process while this one committed it; run again"
            raise RunLostError(msg)
        staged.require_held(self.lease_owner)

    def _commit(self, store: TableStore, stats: RunStats, status: str) -> None:
        succeeded = status == "succeeded"
        self._fence(store)
        finished = datetime.now(UTC)
        rows = [self._row(store, stats, status, model, finished) for model in self.models]
        gone = pa.table(
            {
                "model": [m.model for m in self.models for _ in m.gone],
                "track_id": [track for m in self.models for track in m.gone],
            },
            schema=KEYS,
        )
        commit_run(
            store, self.run_id, pa.concat_tables(rows), gone=gone if succeeded else None, prune=self.config.prune,
            staged=succeeded, fence=lambda: self._fence(store),
        )

    def _row(self, store: TableStore, stats: RunStats, status: str, model: ModelCommit, finished: datetime) -> pa.Table:
        """The `runs` row of one encoder of the run."""
        succeeded = status == "succeeded"
        # Counted from the staged parts, so a resumed run reports the tracks of all its attempts.
        n_embedded, n_failed, audio_seconds = staged_counts(store, self.run_id, model.model) if succeeded else (0, 0, 0.0)
        compute = sum(s for k, s in stats.stage_seconds.items() if k in ("decode", "encode"))
        return pa.table(
            {
                "run_id": [self.run_id],
                "status": [status],
                "runner": [self.config.runner],
                "model": [model.model],
                "model_version": [model.model_version],
                "licence_code": [model.licence_code],
                "licence_weights": [model.licence_weights],
                "feature_hash": [model.feature_hash],
                "config_json": [json.dumps(dataclasses.asdict(self.config), sort_keys=True)],
                "code_version": [package_version("catalog-embed")],
                "started_at": [self.started],
                "finished_at": [finished],
                "n_catalog": [self.n_catalog],
                "n_planned": [model.n_planned],
                "n_skipped": [model.n_skipped],
                "n_embedded": [n_embedded],
                "n_failed": [n_failed],
                "n_deleted": [len(model.gone) if succeeded else 0],
                "audio_seconds": [audio_seconds],
                "wall_seconds": [(finished - self.started).total_seconds()],
                "compute_s_per_audio_hour": [compute / (audio_seconds / 3600) if audio_seconds else None],
                "stage_seconds_json": [json.dumps(stats.stage_seconds, sort_keys=True)],
            },
            schema=RUNS.schema,
        )
