"""`catalog-embed vacuum`: remove what no reader can see: staging left by crashed runs, files replaced long ago."""

from __future__ import annotations

import argparse
import json
import time

from pipelines.output import console
from schemas.store import TableStore
from schemas.tables import TABLES


def vacuum(out: str, staging_hours: float, retention_hours: int, dry_run: bool) -> tuple[list[str], list[str]]:
    """Remove abandoned staging and unreferenced table files under `out`.

    Args:
        out: the output root.
        staging_hours: staged runs untouched for this long and not committed are abandoned (a live run rewrites
            its parts continuously; a crashed one can also be resumed before then).
        retention_hours: Delta files no longer referenced for this long are deleted (time travel stops there).
        dry_run: report, delete nothing.

    Returns:
        The run ids whose staging was removed and the table files removed (or that would be).
    """
    store = TableStore(out)
    now = time.time()
    stale = [
        run_id
        for run_id in store.staged_runs()
        if store.is_committed(run_id) or now - store.last_staged(run_id) > staging_hours * 3600
    ]
    if not dry_run:
        for run_id in stale:
            store.drop_staging(run_id)
    removed: list[str] = []
    for spec in TABLES.values():
        removed += store.table(spec).vacuum(retention_hours=retention_hours, dry_run=dry_run)
    return stale, removed


# Delta's default `delta.deletedFileRetentionDuration`, which our tables keep: deltalake refuses to vacuum files
# replaced more recently, as a reader or writer still on an older table version could lose the files it reads.
MIN_RETENTION_HOURS = 168


def _retention_hours(text: str) -> int:
    hours = int(text)
    if hours < MIN_RETENTION_HOURS:
        msg = (
            f"{text} is below the tables' minimum of {MIN_RETENTION_HOURS} hours (one week): files "
            f"replaced more recently may still be read; pass {MIN_RETENTION_HOURS} or more"
        )
        raise argparse.ArgumentTypeError(msg)
    return hours


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `vacuum` subcommand."""
    parser = subparsers.add_parser(
        "vacuum",
        help="delete abandoned staging and old unreferenced table files",
        description="Delete staging left by crashed runs and Delta files replaced more than --retention-hours ago.",
    )
    parser.add_argument("--out", required=True, help="output root given to `embed`")
    parser.add_argument("--staging-hours", type=float, default=24.0, help="age of abandoned uncommitted staging")
    parser.add_argument(
        "--retention-hours",
        type=_retention_hours,
        default=MIN_RETENTION_HOURS,
        help=f"keep replaced files this long (time travel); at least {MIN_RETENTION_HOURS}",
    )
    parser.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    stale, removed = vacuum(args.out, args.staging_hours, args.retention_hours, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    console(markup=False).print(json.dumps({f"staging {verb}": stale, f"table files {verb}": len(removed)}, indent=2))
    return 0
