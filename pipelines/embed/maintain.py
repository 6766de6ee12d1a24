"""`catalog-embed maintain`: keep the tables' file count and log short however many nights have run.

Every night's merge is copy-on-write (deltalake's writer writes no deletion vectors): it replaces each file holding
a changed key by a new file, and adds one more for the night's new rows, so files accumulate, most of them small,
and each commit adds a log entry that every reader replays until a checkpoint. `maintain` bin-packs the small files
of each table into files of about `--target-mb` (files already that size are left alone, so a night's maintenance
rewrites only what the night wrote) and writes a checkpoint. It commits like a run does, retrying a commit that
lost a race, so it is safe while an embed job commits (tests/pipelines/embed/test_maintain.py races the two in real
processes). Replaced files stay on storage, readable by time travel, until `vacuum`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from catalog_embed.pipelines.io.storage import add_storage_option_argument, storage_options_from_args
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.pipelines.output import print_json
from catalog_embed.schemas.errors import ConfigError
from catalog_embed.schemas.tables import TABLES

# The file size deltalake's optimize packs to by default (100 MB, unless a table sets delta.targetFileSize): a full
# file is never rewritten by maintenance (compaction skips files of the target size and bins holding one file), only
# the small ones are packed. 100 MB holds ~110k 200-float rows or ~14k MULE rows: a model's files stay in the tens at a million
# tracks (1M musicnn rows ~0.9 GB: ~10 files; 1M MULE rows 6.9 GB: ~70).
TARGET_MB = 100


@dataclass(frozen=True)
class TableMaintenance:
    """What `maintain` did to one table: its files before and after compaction, and how many it rewrote."""

    files_before: int
    files_after: int
    files_rewritten: int


def maintain(
    out: str, target_mb: int = TARGET_MB, storage_options: dict[str, str] | None = None
) -> dict[str, TableMaintenance]:
    """Compact the small files of every table under `out`, then checkpoint it.

    Args:
        out: the output root.
        target_mb: files below this size are packed together into files of about this size.
        storage_options: deltalake storage options for `out`.

    Returns:
        per table name, what was done (tables that do not exist yet are skipped).
    """
    if target_mb < 1:
        msg = f"--target-mb must be >= 1, got {target_mb}"
        raise ConfigError(msg)
    store = TableStore(out, storage_options)
    store.check_root()
    done = {}
    for spec in TABLES.values():
        if not store.exists(spec):
            continue
        # A damaged table is left as it is for its owner to restore: compaction would drop the evidence.
        store.check_intact(spec)
        before = len(store.table(spec).file_uris())
        metrics = store.compact(spec, target_mb * 1024 * 1024)
        store.checkpoint(spec)
        done[spec.name] = TableMaintenance(before, len(store.table(spec).file_uris()), metrics["numFilesRemoved"])
    return done


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `maintain` subcommand."""
    parser = subparsers.add_parser(
        "maintain",
        help="compact small table files and checkpoint the Delta logs (nightly, after embed)",
        description="Pack each table's files smaller than --target-mb into files of about that size and write a "
        "Delta checkpoint, so file counts and log replay stay flat over hundreds of nights. Safe while an embed "
        "job commits. Run `vacuum` to delete the replaced files once they are past retention.",
    )
    parser.add_argument("--out", required=True, help="output root given to `embed`")
    parser.add_argument("--target-mb", type=int, default=TARGET_MB, help=f"file size to pack to (default {TARGET_MB})")
    add_storage_option_argument(parser)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    report = maintain(args.out, args.target_mb, storage_options_from_args(args))
    print_json(
        {
            name: {"files before": m.files_before, "files after": m.files_after, "files rewritten": m.files_rewritten}
            for name, m in report.items()
        }
    )
    return 0
