"""The embed job: prepare -> claim -> run -> commit -> summary.

    catalog -> plan (diff against the tables) -> claim a run's staging -> runner (decode, front end, encoder, pool,
    part files) -> commit -> summary

What decides whether a row is lost or duplicated (claiming, resuming, the lease, the write order of parts, the
commit steps) is `catalog_embed.pipelines.embed.lifecycle`'s; this module orders the steps.

Everything that can be wrong with the configuration is checked before any audio is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from catalog_embed.pipelines import logs
from catalog_embed.pipelines.embed.config import EmbedConfig, add_run_arguments, config_from_args
from catalog_embed.pipelines.embed.lifecycle.commit import ModelCommit, RunCommit
from catalog_embed.pipelines.embed.lifecycle.lease import RunLease
from catalog_embed.pipelines.embed.lifecycle.shards import prune_torn_shards, write_shard
from catalog_embed.pipelines.embed.lifecycle.staging import RUN_META, ResumeKey, RunState, StagedRun, staged_runs
from catalog_embed.pipelines.embed.plan import Plan, Request, RunLimits, plan_run, read_state
from catalog_embed.pipelines.io.catalog import catalog_fingerprints, read_catalog
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.pipelines.output import console as output_console
from catalog_embed.pipelines.output import print_json
from catalog_embed.pipelines.runners import EmbedJob, Runner, RunStats, get_runner
from catalog_embed.pipelines.runners import Progress as ShardProgress
from catalog_embed.schemas.errors import ConfigError, RunAbortedError
from catalog_embed.schemas.records import TrackFailure
from catalog_embed.schemas.tables import EMBEDDINGS, TABLES
from catalog_embed.workers.encoders.base import Licence, resolve_device
from catalog_embed.workers.rows import RowContext
from catalog_embed.workers.shard import ModelJob, ShardOutput

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
        model: the encoder's name (several encoders: their names, comma-separated).
        model_version: the encoder's version (the sha256 of its weights; several: comma-separated).
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

    def resume_key(self) -> ResumeKey:
        """What the run plans and computes: an interrupted run staged for the same key can be resumed."""
        config = self.config
        return ResumeKey(
            catalog=config.catalog,
            model=self.model,
            model_version=self.model_version,
            feature_hash=self.feature_hash,
            layers=self.layers,
            windows=config.write_windows,
            limits=RunLimits.of(config),
            policy=config.policy,
        )


def prepare_run(config: EmbedConfig, create_tables: bool = True) -> PreparedRun:
    """Validate the configuration, resolve the encoder, read the catalog and plan against the tables.

    Args:
        config: the run.
        create_tables: create the tables when missing; `plan` only reads.

    Raises:
        ConfigError, EncoderError, ManifestError, TableError: nothing has been read or written but the catalog
            and the tables' keys (a `--prune` of more than `--prune-max-share` of the model's tracks is refused
            here).
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
    request = Request(layers, config.write_windows, RunLimits.of(config))
    embedded_state, failed_state = read_state(store, encoder.name, request)
    plan = plan_run(
        catalog, prints, embedded_state, failed_state, encoder.version, feature_hash, retry_failed=config.retry_failed
    )
    if config.prune:
        plan.check_prune(config.prune_max_share)
    return PreparedRun(config, encoder.name, encoder.version, encoder.licence, layers, feature_hash, plan, store)


def prepare_runs(config: EmbedConfig, create_tables: bool = True) -> tuple[PreparedRun, ...]:
    """`prepare_run` for each encoder of the run (`--model a,b,...`): each is planned on its own, so a track can
    be new for one encoder and current for another.

    Raises:
        As `prepare_run`, for any of the encoders.
    """
    config.validate()
    return tuple(prepare_run(config.for_model(model), create_tables) for model in config.models)


def resume_key(prepared: tuple[PreparedRun, ...]) -> ResumeKey:
    """The resume key of a run of these encoders: with several, their models, versions, feature hashes and
    layers joined in order (each writes only its default layer), so a run resumes only for the same encoders."""
    keys = [run.resume_key() for run in prepared]
    if len(keys) == 1:
        return keys[0]
    return dataclasses.replace(
        keys[0],
        model=",".join(key.model for key in keys),
        model_version=",".join(key.model_version for key in keys),
        feature_hash=",".join(key.feature_hash for key in keys),
        layers=tuple(layer for key in keys for layer in key.layers),
    )


def run_embed(config: EmbedConfig, console: Console | None = None, progress: ShardProgress | None = None) -> RunSummary:
    """Run one embed job end to end: prepare, claim, run, commit, summary.

    An interrupted run (its process dead: killed driver, lost machine, Ctrl-C) that planned the same work is
    resumed: the tracks it already staged, and still planned as they were, are not embedded again, and its parts
    are committed with the new ones. The run holds a lease on its staging from its claim until its commit is done
    (`catalog_embed.pipelines.embed.lifecycle`), so no other run adopts or vacuums it.

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
    prepared = prepare_runs(config)
    lease = claim_run(prepared[0].store, config.run_id, resume_key(prepared), started)
    try:
        with logs.bound_run_id(lease.run_id):
            return _run_claimed(config, prepared, runner, lease, started, clock, console, progress)
    finally:
        lease.release()


def claim_run(store: TableStore, run_id: str | None, key: ResumeKey, started: datetime) -> RunLease:
    """Claim the run this invocation runs, and hold it: `run_id` when given (refused when committed, running,
    staged for other work, or claimed by another process at the same instant), else the newest dead run staged
    for the same work that this process wins, else a new run.

    Raises:
        ConfigError: `run_id` cannot be run by this invocation; the message says why.
    """
    if run_id is not None:
        staged = StagedRun.read(store, run_id)
        if staged.state is RunState.COMMITTED:
            msg = f"--run-id {run_id} is already committed: a run id names one run; omit --run-id or choose a new one"
            raise ConfigError(msg)
        why = None if staged.state is RunState.ABSENT else staged.why_not_resumable(key)
        lease = RunLease(store, run_id)
        if why is None and not lease.claim(staged):
            why = "another process claimed it at the same instant"
        if why is not None:
            raise ConfigError(f"--run-id {run_id}: {why}; choose another run id")
        return lease
    for staged in reversed(staged_runs(store)):
        if staged.state is RunState.DEAD and staged.why_not_resumable(key) is None:
            lease = RunLease(store, staged.run_id)
            if lease.claim(staged):
                return lease
    while True:  # a new id is random: another process creating it too would take both a clock and 32 random bits
        lease = RunLease(store, f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}")
        if lease.claim(StagedRun(lease.run_id, RunState.ABSENT)):
            return lease


def _run_claimed(
    given: EmbedConfig,
    prepared: tuple[PreparedRun, ...],
    runner: Runner,
    lease: RunLease,
    started: datetime,
    clock: float,
    console: Console,
    on_progress: ShardProgress | None,
) -> RunSummary:
    """Run the run `lease` holds; see `run_embed`."""
    first, store, run_id = prepared[0], prepared[0].store, lease.run_id
    plan = Plan.joined(tuple(run.plan for run in prepared))
    # Several encoders: the run records the models as given, with the first one's sizing (the same on a CPU).
    config = dataclasses.replace(first.config, encoder=dataclasses.replace(first.config.encoder, model=given.encoder.model))
    staged, attempt = prune_torn_shards(store, run_id, plan.listed_files)
    items = tuple(item for item in plan.items if item.track_id not in staged)
    if attempt:
        console.print(f"resuming run {run_id}: {len(plan.items) - len(items)} planned tracks are already staged")
    store.write_staged_json(run_id, RUN_META, resume_key(prepared).to_json())
    for run in prepared:
        console.print(
            f"[bold]run {run_id}[/]: {run.model} {run.model_version} layers {','.join(run.layers)}; "
            f"{run.plan.describe()}"
        )
    commit = RunCommit(
        config=config,
        run_id=run_id,
        models=tuple(
            ModelCommit(
                model=run.model,
                model_version=run.model_version,
                licence_code=run.licence.code,
                licence_weights=run.licence.weights,
                feature_hash=run.feature_hash,
                n_planned=len(run.plan.items) + len(run.plan.refused),
                n_skipped=run.plan.n_skipped,
                gone=run.plan.gone,
            )
            for run in prepared
        ),
        n_catalog=plan.n_catalog,
        started=started,
        lease_owner=lease.owner,
    )
    rows = [RowContext(run_id, run.model, run.layers, run.model_version, run.feature_hash) for run in prepared]
    everything = {item.track_id for item in plan.items}
    models = tuple(
        ModelJob(run.config.encoder, row, frozenset(everything - {item.track_id for item in run.plan.items}))
        for run, row in zip(prepared, rows, strict=True)
    )
    job = EmbedJob(
        run_id=run_id,
        config=config,
        items=items,
        rows=rows[0],
        commit=commit.finish,
        attempt=attempt,
        models=models if len(models) > 1 else (),
    )
    stats = RunStats()
    for i, (run, row) in enumerate(zip(prepared, rows, strict=True)):
        if not run.plan.refused:
            continue
        refused = [TrackFailure(item, "plan", "UriRefused", reason) for item, reason in run.plan.refused]
        name = f"{attempt:03d}-refused" + (f"-{i}" if i else "")
        refused_shard = ShardOutput.of(name, [], refused, row, job.write_windows)
        stats.add_time("write", write_shard(store, run_id, refused_shard))
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
        lease.check()
        commit.succeed(stats)  # the heartbeat goes on: a commit that outlasts the lease TTL is still this run's
        stats.add_time("commit", time.perf_counter() - commit_start)
    summary = RunSummary(
        run_id, status, plan, stats, time.perf_counter() - clock, config.out,
        ",".join(run.model for run in prepared), ",".join(run.model_version for run in prepared),
    )
    print_summary(summary, console)
    return summary


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
    for prepared in prepare_runs(config_from_args(args), create_tables=False):  # several encoders: a plan each
        _print_plan(prepared, args.json)
    return 0


def _print_plan(prepared: PreparedRun, as_json: bool) -> None:
    plan = prepared.plan
    if as_json:
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
        return
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
