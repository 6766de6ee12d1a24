"""The embed job: validate, plan, run on a runner, commit once, summarise.

    catalog -> plan (diff against the tables) -> runner (decode, front end, encoder, pool, part files) -> commit

Everything that can be wrong with the configuration is checked before any audio is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from catalog_embed.pipelines import logs
from catalog_embed.pipelines.embed.config import EmbedConfig, add_run_arguments, config_from_args
from catalog_embed.pipelines.embed.plan import Plan, Request, plan_run, read_state, run_limits
from catalog_embed.pipelines.io.catalog import catalog_fingerprints, read_catalog
from catalog_embed.pipelines.io.lease import RunLease, read_lease
from catalog_embed.pipelines.io.store import RUN_META, TableStore, run_id_problem
from catalog_embed.pipelines.output import console as output_console
from catalog_embed.pipelines.output import print_json
from catalog_embed.pipelines.runners import EmbedJob, Runner, RunStats, get_runner, write_shard
from catalog_embed.pipelines.runners import Progress as ShardProgress
from catalog_embed.schemas.errors import ConfigError, RunAbortedError, RunLostError
from catalog_embed.schemas.records import TrackFailure
from catalog_embed.schemas.tables import EMBEDDINGS, RUNS, TABLES
from catalog_embed.workers.encoders.base import Licence, resolve_device
from catalog_embed.workers.rows import RowContext
from catalog_embed.workers.shard import ShardOutput

_KEYS = pa.schema([pa.field("model", pa.string()), pa.field("track_id", pa.string())])
# A run launched on Dataflow keeps its lease this long after the launcher exits: its job commits it meanwhile.
_LAUNCHED_LEASE_S = 48 * 3600.0


@dataclass(frozen=True)
class RunSummary:
    """What a finished run did.

    Attributes:
        run_id: the run.
        status: 'succeeded', or 'launched' when the run goes on in a Dataflow job that commits it.
        plan: what the run planned.
        stats: the runner's counts and stage times.
        wall_seconds: from the start of `run_embed` to the end of the commit.
        out: the output root holding the tables.
        model: the encoder's name.
        model_version: the encoder's version (the sha256 of its weights).
    """

    run_id: str
    status: str
    plan: Plan
    stats: RunStats
    wall_seconds: float
    out: str
    model: str
    model_version: str

    @property
    def throughput(self) -> float:
        """Audio seconds embedded per wall second."""
        return self.stats.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0


@dataclass(frozen=True)
class PreparedRun:
    """A validated config, its encoder's identity and the plan: everything decided before any audio is read."""

    config: EmbedConfig
    model: str
    model_version: str
    licence: Licence
    layers: tuple[str, ...]
    feature_hash: str
    plan: Plan
    store: TableStore

    def meta(self) -> dict[str, object]:
        """The resume key: what the run plans and computes. An interrupted run with the same key can be resumed;
        one for another catalog, encoder, layer set or limits never is (its staged rows would not belong)."""
        config = self.config
        key = {
            "catalog": config.catalog,
            "model": self.model,
            "model_version": self.model_version,
            "feature_hash": self.feature_hash,
            "layers": list(self.layers),
            "windows": config.write_windows,
            "limits": run_limits(dataclasses.asdict(config)),
            "policy": dataclasses.asdict(config.policy),
        }
        return json.loads(json.dumps(key))  # as it reads back from the staged run.json (tuples become lists)


def prepare_run(config: EmbedConfig, create_tables: bool = True) -> PreparedRun:
    """Validate the configuration, resolve the encoder, read the catalog and plan against the tables.

    Args:
        config: the run.
        create_tables: create the tables when missing; `plan` only reads.

    Raises:
        ConfigError, EncoderError, ManifestError, TableError: nothing has been read or written but the catalog
            and the tables' keys.
    """
    config.validate()
    encoder = config.encoder.build()
    layers = config.encoder.resolved_layers(encoder)
    if config.encoder_runs_here():
        resolve_device(config.encoder.device)
    # Runners batch by this number: size it to the device once, so the runs row records the size used.
    config = dataclasses.replace(config, encoder=config.encoder.sized(config.encoder_runs_here()))
    encoder.prepare()
    feature_hash = encoder.front_end().config_hash()
    catalog = read_catalog(config.catalog, config.policy)
    prints = catalog_fingerprints(catalog)
    store = TableStore(config.out, config.storage_options)
    store.ensure_tables(create=create_tables)
    request = Request(layers, config.write_windows, run_limits(dataclasses.asdict(config)))
    embedded_state, failed_state = read_state(store, encoder.name, request)
    plan = plan_run(
        catalog, prints, embedded_state, failed_state, encoder.version, feature_hash, retry_failed=config.retry_failed
    )
    return PreparedRun(config, encoder.name, encoder.version, encoder.licence, layers, feature_hash, plan, store)


def run_embed(config: EmbedConfig, console: Console | None = None, progress: ShardProgress | None = None) -> RunSummary:
    """Run one embed job end to end; see the module docstring.

    An interrupted run (its process dead: killed driver, lost machine, Ctrl-C) that planned the same work is
    resumed: the tracks it already staged are not embedded again, and its parts are committed with the new ones.
    The run holds a lease on its staging while it runs (`catalog_embed.pipelines.io.lease`), so no other run adopts or vacuums it.

    Args:
        config: the run (`EmbedConfig`: the same options as the command line's flags).
        console: where the messages for people go (default: stderr; `Console(quiet=True)` for none).
        progress: called with (tracks finished, their audio seconds) as shards finish, on every runner.

    Raises:
        ConfigError, EncoderError, ManifestError, TableError: before any work.
        RunAbortedError: too many tracks failed; nothing but an `aborted` runs row is committed.
        RunLostError: another process took the run's staging over or removed it; this run committed nothing.
    """
    console = console or output_console(stderr=True)
    started = datetime.now(UTC)
    clock = time.perf_counter()
    config.validate()
    runner = get_runner(config.runner, **config.runner_options())
    prepared = prepare_run(config)
    config, store = prepared.config, prepared.store
    run_id = _claimable_run(store, config.run_id, prepared.meta()) or f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
    lease = RunLease(store, run_id).acquire()
    try:
        with logs.bound_run_id(run_id):
            return _run_claimed(config, prepared, runner, run_id, lease, started, clock, console, progress)
    finally:
        lease.release()


def _claimable_run(store: TableStore, run_id: str | None, meta: dict[str, object]) -> str | None:
    """The run this invocation continues: `run_id` when given (refused when committed, running, or staged for
    other work), else the newest dead, uncommitted run staged for the same work, else None (a new run)."""
    if run_id is None:
        for candidate in reversed(store.staged_runs()):
            if run_id_problem(candidate) is None and _resumable(store, candidate, meta) is None:
                return candidate
        return None
    if store.is_committed(run_id):
        msg = f"--run-id {run_id} is already committed: a run id names one run; omit --run-id or choose a new one"
        raise ConfigError(msg)
    why = _resumable(store, run_id, meta)
    if why is not None and store.fs.exists(store.staging_dir(run_id)):
        raise ConfigError(f"--run-id {run_id}: {why}; choose another run id")
    return run_id


def _resumable(store: TableStore, run_id: str, meta: dict[str, object]) -> str | None:
    """Why the staged run `run_id` cannot be resumed for `meta`, or None when it can."""
    staged = store.read_staged_json(run_id, RUN_META)
    if staged is None:
        return "its staging folder was not written by an embed run"
    lease = read_lease(store, run_id)
    if lease is not None and lease.alive():
        return f"it is running now ({lease.describe()})"
    if staged != meta:
        return "it was staged for other work (another catalog, encoder, layers or limits)"
    if store.is_committed(run_id):
        return "it is already committed"
    return None


def _run_claimed(
    config: EmbedConfig,
    prepared: PreparedRun,
    runner: Runner,
    run_id: str,
    lease: RunLease,
    started: datetime,
    clock: float,
    console: Console,
    on_progress: ShardProgress | None,
) -> RunSummary:
    """Run `run_id`, whose lease this process holds; see `run_embed`."""
    plan, store = prepared.plan, prepared.store
    staged, attempt = store.prune_torn_shards(run_id)
    items = tuple(item for item in plan.items if item.track_id not in staged)
    if attempt:
        console.print(f"resuming run {run_id}: {len(plan.items) - len(items)} planned tracks are already staged")
    store.write_staged_json(run_id, RUN_META, prepared.meta())
    console.print(
        f"[bold]run {run_id}[/]: {prepared.model} {prepared.model_version} layers {','.join(prepared.layers)}; "
        f"{plan.describe()}"
    )
    commit = RunCommit(
        config=config,
        run_id=run_id,
        model=prepared.model,
        model_version=prepared.model_version,
        licence_code=prepared.licence.code,
        licence_weights=prepared.licence.weights,
        feature_hash=prepared.feature_hash,
        n_catalog=plan.n_catalog,
        n_planned=len(plan.items) + len(plan.refused),
        n_skipped=plan.n_skipped,
        gone=plan.gone,
        started=started,
        lease_owner=lease.owner,
    )
    job = EmbedJob(
        run_id=run_id,
        config=config,
        items=items,
        rows=RowContext(run_id, prepared.model, prepared.layers, prepared.model_version, prepared.feature_hash),
        commit=commit.finish,
        attempt=attempt,
    )
    stats = RunStats()
    if plan.refused:
        refused = [TrackFailure(item, "plan", "UriRefused", reason) for item, reason in plan.refused]
        refused_shard = ShardOutput.of(f"{attempt:03d}-refused", [], refused, job.rows, job.write_windows)
        stats.add_time("write", write_shard(job, store, refused_shard))
        stats.merge(refused_shard.stats)
    if items:
        try:
            with _progress_bar(console) as bar:
                task = bar.add_task("embedding", total=len(items))

                def progress(n: int, audio_s: float) -> None:
                    lease.check()  # stop as soon as the heartbeat finds the run taken over, not at the commit
                    bar.advance(task, n)
                    if on_progress:
                        on_progress(n, audio_s)

                stats.merge(runner.run(job, progress))
        except RunAbortedError:
            commit.abort()
            raise
    if stats.status == "launched":
        lease.extend(_LAUNCHED_LEASE_S)
    status = stats.status or "succeeded"
    if stats.status is None:
        commit_start = time.perf_counter()
        lease.release()  # no heartbeat may recreate the staging folder that the commit removes
        commit.succeed(stats)
        stats.add_time("commit", time.perf_counter() - commit_start)
    summary = RunSummary(
        run_id, status, plan, stats, time.perf_counter() - clock, config.out, prepared.model, prepared.model_version
    )
    print_summary(summary, console)
    return summary


@dataclass(frozen=True)
class RunCommit:
    """Commits one run: its staged parts, then its `runs` row (see `TableStore.commit`).

    Picklable, so that a runner whose driver may exit before its job ends (Beam, launched from a Dataflow Flex
    Template) can commit from its graph's last step; committing a run twice adds nothing.
    """

    config: EmbedConfig
    run_id: str
    model: str
    model_version: str
    licence_code: str
    licence_weights: str
    feature_hash: str
    n_catalog: int
    n_planned: int
    n_skipped: int
    gone: tuple[str, ...]
    started: datetime
    lease_owner: str

    def succeed(self, stats: RunStats) -> None:
        """Commit a finished run's parts and a `succeeded` runs row."""
        store = TableStore(self.config.out, self.config.storage_options)
        # A retried commit of a committed run (a repeated Beam bundle) finds its staging, lease included, gone.
        if not store.is_committed(self.run_id):
            self._check_lease(store)
        self._commit(store, stats, "succeeded")

    def abort(self) -> None:
        """Drop the run's parts and commit an `aborted` runs row."""
        store = TableStore(self.config.out, self.config.storage_options)
        self._check_lease(store)
        store.drop_staging(self.run_id)
        self._commit(store, RunStats(), "aborted")

    def finish(self, stats: RunStats) -> str:
        """Abort the run when too many tracks failed, else commit it; returns the status committed."""
        try:
            stats.check_failure_ratio(self.config.max_failure_ratio)
        except RunAbortedError:
            self.abort()
            return "aborted"
        self.succeed(stats)
        return "succeeded"

    def _check_lease(self, store: TableStore) -> None:
        """Raise RunLostError unless this run still owns its staging: never commit, or report, another's rows."""
        lease = read_lease(store, self.run_id)
        if lease is None or lease.owner != self.lease_owner:
            who = "it was removed" if lease is None else f"{lease.describe()} took it over"
            msg = f"run {self.run_id} lost its staging while it ran ({who}): this run committed nothing; run again"
            raise RunLostError(msg)

    def _commit(self, store: TableStore, stats: RunStats, status: str) -> None:
        # Counted from the staged parts, so a resumed run reports the tracks of all its attempts.
        n_embedded, n_failed, audio_seconds = store.staged_counts(self.run_id)
        compute = sum(s for k, s in stats.stage_seconds.items() if k in ("decode", "encode"))
        finished = datetime.now(UTC)
        row = pa.table(
            {
                "run_id": [self.run_id],
                "status": [status],
                "runner": [self.config.runner],
                "model": [self.model],
                "model_version": [self.model_version],
                "licence_code": [self.licence_code],
                "licence_weights": [self.licence_weights],
                "feature_hash": [self.feature_hash],
                "config_json": [json.dumps(dataclasses.asdict(self.config), sort_keys=True)],
                "code_version": [package_version("catalog-embed")],
                "started_at": [self.started],
                "finished_at": [finished],
                "n_catalog": [self.n_catalog],
                "n_planned": [self.n_planned],
                "n_skipped": [self.n_skipped],
                "n_embedded": [n_embedded],
                "n_failed": [n_failed],
                "n_deleted": [len(self.gone) if status == "succeeded" else 0],
                "audio_seconds": [audio_seconds],
                "wall_seconds": [(finished - self.started).total_seconds()],
                "compute_s_per_audio_hour": [compute / (audio_seconds / 3600) if audio_seconds else None],
                "stage_seconds_json": [json.dumps(stats.stage_seconds, sort_keys=True)],
            },
            schema=RUNS.schema,
        )
        gone = pa.table({"model": [self.model] * len(self.gone), "track_id": list(self.gone)}, schema=_KEYS)
        store.commit(self.run_id, row, gone=gone if status == "succeeded" else None, prune=self.config.prune)


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def print_summary(summary: RunSummary, console: Console) -> None:
    """The final lines a user reads."""
    stats = summary.stats
    if summary.status == "launched":
        console.print(
            f"[bold green]launched[/]: run {summary.run_id} ({len(summary.plan.items)} tracks) runs on Dataflow and "
            f"commits to {summary.out} when it finishes; its `runs` row tells how it went"
        )
        return
    hours = stats.audio_seconds / 3600
    console.print(
        f"[bold green]{summary.status}[/]: {stats.n_embedded} embedded, {stats.n_failed} failed, "
        f"{summary.plan.n_skipped} skipped; {hours:.2f} audio hours in {summary.wall_seconds:.1f} s "
        f"({summary.throughput:.1f}x real time)"
    )
    if stats.stage_seconds:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(stats.stage_seconds.items()))
        console.print(f"stage time: {stages}")
    for error in stats.first_errors:
        console.print(f"  failed: {error}")
    console.print(f"tables: {summary.out}/{EMBEDDINGS.name} (and failures, runs)")


def summary_document(summary: RunSummary) -> dict[str, object]:
    """The run as `embed --json` prints it, for schedulers to keep: its id and status, the model, the counts of
    the `runs` row (`failed` counts every failures row, the URI policy's refusals included), throughput, and the
    tables' URIs."""
    stats, plan = summary.stats, summary.plan
    return {
        "run_id": summary.run_id,
        "status": summary.status,
        "model": summary.model,
        "model_version": summary.model_version,
        "counts": {
            "embedded": stats.n_embedded,
            "failed": stats.n_failed,
            "skipped": plan.n_skipped,
            "refused": len(plan.refused),
            "deleted": len(plan.gone) if summary.status == "succeeded" else 0,
        },
        "audio_hours": stats.audio_seconds / 3600,
        "x_real_time": summary.throughput,
        "wall_seconds": summary.wall_seconds,
        "tables": {name: f"{summary.out}/{name}" for name in TABLES},
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `embed` and `plan` subcommands (they take the same options)."""
    embed = subparsers.add_parser(
        "embed",
        help="embed a catalog into Delta tables",
        description="Embed every new or changed track of a catalog and commit the rows to Delta tables under --out.",
    )
    add_run_arguments(embed)
    embed.add_argument(
        "--json", action="store_true",
        help="print the finished run as one JSON object on stdout (run id, status, counts, tables); "
             "the summary for people still goes to stderr",
    )
    embed.set_defaults(handler=_handle)
    plan = subparsers.add_parser(
        "plan",
        help="print what `embed` would do, without doing it",
        description="Plan a run like `embed` (same options) and print it: nothing is embedded or committed.",
    )
    add_run_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the whole plan (every track) as one JSON object")
    plan.set_defaults(handler=_handle_plan)


def _handle(args: argparse.Namespace) -> int:
    summary = run_embed(config_from_args(args), logs.console(__name__))
    if args.json:
        print_json(summary_document(summary))
    return 0


def _handle_plan(args: argparse.Namespace) -> int:
    prepared = prepare_run(config_from_args(args), create_tables=False)
    plan = prepared.plan
    if args.json:
        print_json(
            {
                "model": prepared.model,
                "model_version": prepared.model_version,
                "counts": {
                    "catalog": plan.n_catalog,
                    "new": plan.n_new,
                    "changed": plan.n_changed,
                    "unchanged": plan.n_unchanged,
                    "known_bad": plan.n_known_bad,
                    "refused": len(plan.refused),
                    "gone": len(plan.gone),
                },
                "embed": [{"track_id": item.track_id, "uri": item.uri} for item in plan.items],
                "refuse": [{"track_id": item.track_id, "uri": item.uri, "reason": r} for item, r in plan.refused],
                "prune" if prepared.config.prune else "delete": list(plan.gone),
            }
        )
        return 0
    console = output_console(markup=False)
    console.print(f"{prepared.model} {prepared.model_version}: {plan.describe()}")
    for item in plan.items[:20]:
        console.print(f"  embed  {item.track_id}  {item.uri}")
    for item, reason in plan.refused[:20]:
        console.print(f"  refuse {item.track_id}: {reason}")
    for track_id in plan.gone[:20]:
        console.print(f"  {'prune' if prepared.config.prune else 'delete'} {track_id}")
    shown = min(len(plan.items), 20) + min(len(plan.refused), 20) + min(len(plan.gone), 20)
    if shown < len(plan.items) + len(plan.refused) + len(plan.gone):
        console.print("  ... (the first 20 of each kind are shown)")
    return 0
