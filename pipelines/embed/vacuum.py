"""`catalog-embed vacuum`: remove what no reader can see: staging left by dead runs, files replaced long ago."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from catalog_embed.pipelines.embed.lifecycle.staging import RunState, staged_runs
from catalog_embed.pipelines.io.storage import add_storage_option_argument, storage_options_from_args
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.pipelines.output import print_json
from catalog_embed.schemas.errors import ConfigError
from catalog_embed.schemas.tables import TABLES

# Delta's default `delta.deletedFileRetentionDuration`, which our tables keep: a file replaced more recently may
# still be read by a reader on an older version, or be a running commit's new file not yet referenced.
MIN_RETENTION_HOURS = 168


@dataclass(frozen=True)
class VacuumReport:
    """What `vacuum` removed (or would remove) and what it left alone on purpose.

    Attributes:
        staging_removed: runs whose staging was removed: committed, or dead and untouched for --staging-hours.
        staging_live: runs whose staging a live run holds (its lease is fresh): never touched.
        staging_foreign: folders under `_staging/` that no embed run wrote: never touched.
        table_files: unreferenced table files removed.
    """

    staging_removed: list[str]
    staging_live: list[str]
    staging_foreign: list[str]
    table_files: list[str]


def vacuum(
    out: str,
    staging_hours: float,
    retention_hours: int,
    dry_run: bool,
    storage_options: dict[str, str] | None = None,
) -> VacuumReport:
    """Remove abandoned staging and unreferenced table files under `out`.

    Only what an embed run wrote is touched (see `catalog_embed.pipelines.embed.lifecycle.staging.StagedRun`: a
    folder holding a run's meta, or only a run's bookkeeping files and their temporary files), and only when that
    run is committed, or dead (no live lease) and untouched for `staging_hours`. A running run's staging is left
    alone however old its files are.

    Args:
        out: the output root.
        staging_hours: a dead run's staging untouched for this long is abandoned (before then it can be resumed).
        retention_hours: Delta files no longer referenced for this long are deleted (time travel stops there).
        dry_run: report, delete nothing.
        storage_options: deltalake storage options for `out`.
    """
    if staging_hours < 0:
        msg = f"--staging-hours must be >= 0, got {staging_hours:g}"
        raise ConfigError(msg)
    if retention_hours < MIN_RETENTION_HOURS:
        msg = (
            f"--retention-hours {retention_hours} is below the tables' minimum of {MIN_RETENTION_HOURS} (one week): "
            f"files replaced more recently may still be read, or belong to a commit in flight; pass "
            f"{MIN_RETENTION_HOURS} or more"
        )
        raise ConfigError(msg)
    store = TableStore(out, storage_options)
    store.check_root()
    # Files a damaged table no longer references may be what restores it: touch nothing until every table is whole.
    tables = [spec for spec in TABLES.values() if store.exists(spec)]
    for spec in tables:
        store.check_intact(spec)
    now = time.time()
    removed, live, foreign = [], [], []
    for staged in staged_runs(store):
        if staged.state is RunState.FOREIGN:
            foreign.append(staged.run_id)
        elif staged.state is RunState.LIVE:
            live.append(staged.run_id)
        elif staged.state is RunState.COMMITTED or now - store.last_staged(staged.run_id) > staging_hours * 3600:
            removed.append(staged.run_id)
    if not dry_run:
        for run_id in removed:
            store.drop_staging(run_id)
    files: list[str] = []
    for spec in tables:
        files += store.table(spec).vacuum(retention_hours=retention_hours, dry_run=dry_run)
    return VacuumReport(removed, live, foreign, files)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `vacuum` subcommand."""
    parser = subparsers.add_parser(
        "vacuum",
        help="delete abandoned staging and old unreferenced table files",
        description="Delete staging left by dead runs and Delta files replaced more than --retention-hours ago. "
        "Staging of a running run, and folders that catalog-embed did not write, are never touched.",
    )
    parser.add_argument("--out", required=True, help="output root given to `embed`")
    parser.add_argument("--staging-hours", type=float, default=24.0, help="age of abandoned uncommitted staging")
    parser.add_argument(
        "--retention-hours", type=int, default=MIN_RETENTION_HOURS,
        help=f"keep replaced files this long (time travel); at least {MIN_RETENTION_HOURS}",
    )
    parser.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    add_storage_option_argument(parser)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    report = vacuum(
        args.out, args.staging_hours, args.retention_hours, args.dry_run, storage_options_from_args(args)
    )
    verb = "would remove" if args.dry_run else "removed"
    print_json(
        {
            f"staging {verb}": report.staging_removed,
            "staging of running runs, left alone": report.staging_live,
            "folders under _staging not written by catalog-embed, left alone": report.staging_foreign,
            f"table files {verb}": len(report.table_files),
        }
    )
    return 0
