"""The command line of `catalog-embed probe`, `tag` and `probe-report`: train and apply shallow probes on embedding
tables.

This module only declares the subcommands; the jobs live in `catalog_embed.pipelines.probes.job`, imported when one of them runs
(scikit-learn, mir_eval, matplotlib and torch would otherwise add seconds to every `catalog-embed` start).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from catalog_embed.pipelines.io.storage import add_storage_option_argument
from catalog_embed.workers.probes.tasks import TaskKind

# Where a probe search runs its trials (not the embed runners of `catalog_embed.pipelines.runners`).
TRIAL_RUNNERS = ("local", "ray")
# The names of `catalog_embed.workers.probes.search.PRESETS` (a test keeps them in step), for --help without importing torch.
PRESET_NAMES = ("linear", "mlp", "mule-mtt", "mule-key", "mule-emo")


def _deferred(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module("catalog_embed.pipelines.probes.job"), name)(args)

    return handler


def _hidden(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "linear"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        msg = f"--hidden takes comma-separated layer sizes like 512 or 512,256 (or 'none'), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `probe`, `tag` and `probe-report` subcommands."""
    p = subparsers.add_parser(
        "probe",
        help="train and evaluate a probe on an embeddings table",
        description="Join an embeddings table with labels, train a linear/MLP probe (a preset or the grid), "
        "evaluate it on the test split, and write a report, the probe and test predictions.",
    )
    p.add_argument(
        "--embeddings", required=True, metavar="URI", help="embeddings Delta table, or the --out folder of `embed`"
    )
    p.add_argument("--labels", required=True, metavar="URI", help="labels: .csv/.tsv/.parquet or a Delta table")
    p.add_argument("--task", required=True, metavar="NAME", help="task name, e.g. genre (names the probe)")
    p.add_argument("--kind", required=True, choices=[str(k) for k in TaskKind])
    p.add_argument("--model", help="embedding model (required when the table holds several)")
    p.add_argument("--layer", help="embedding layer (default: the model's only layer)")
    p.add_argument(
        "--label-column",
        action="append",
        metavar="COL",
        help="label column (repeatable); default: every column but track_id/split/artist/group",
    )
    p.add_argument("--label-sep", metavar="SEP", help="multilabel: split a string column into tags on SEP")
    p.add_argument("--split-column", default="split", help="column with train/valid/test (default: split)")
    p.add_argument("--group-column", help="column grouping tracks kept in one split (default: artist, then group)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: probes/TASK)")
    p.add_argument("--preset", default="linear", choices=PRESET_NAMES, help="probe configuration (default: linear)")
    p.add_argument("--hidden", type=_hidden, help="hidden sizes, e.g. 512 or 512,256; 'none' for linear")
    p.add_argument("--dropout", type=float)
    p.add_argument("--l2", type=float, help="L2 penalty (Adam weight decay)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="standardise inputs with training statistics",
    )
    p.add_argument("--max-epochs", type=int, help="epochs the warm-up + cosine schedule spans at most (default 100)")
    p.add_argument("--max-steps", type=int, help="steps the schedule spans at most (default 30000)")
    p.add_argument("--warmup", type=float, help="warm-up fraction of the schedule")
    p.add_argument("--patience", type=int, help="early stopping: epochs without improvement")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default: 0)")
    p.add_argument("--search", choices=["grid"], help="search Castellon et al.'s grid (216 trials)")
    p.add_argument("--max-trials", type=int, help="with --search: a seeded sample of this many grid points")
    p.add_argument("--parallel", type=int, default=1, help="trials run at once (default: 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per trial (default: 1; more helps one large MLP on idle cores)",
    )
    p.add_argument("--runner", choices=TRIAL_RUNNERS, default="local", help="local processes or Ray tasks")
    p.add_argument("--top-k", type=int, default=3, help="labels kept in each prediction's top_labels")
    add_storage_option_argument(p)
    p.set_defaults(handler=_deferred("probe_command"))

    t = subparsers.add_parser(
        "tag",
        help="apply a trained probe to a whole embeddings table",
        description="Score every live embedding of the probe's model and layer and upsert the predictions table; "
        "tracks already tagged by this probe (same embedding) are skipped.",
    )
    t.add_argument("--probe", required=True, metavar="DIR", help="a probe's --out directory (or its probe/)")
    t.add_argument(
        "--embeddings", required=True, metavar="URI", help="embeddings Delta table, or the --out folder of `embed`"
    )
    t.add_argument("--out", required=True, metavar="URI", help="predictions Delta table")
    t.add_argument("--batch-rows", type=int, default=65536, help="rows scored and committed per batch")
    t.add_argument("--top-k", type=int, default=3, help="labels kept in each prediction's top_labels")
    add_storage_option_argument(t)
    t.set_defaults(handler=_deferred("tag_command"))

    r = subparsers.add_parser(
        "probe-report",
        help="gather probe reports into a Markdown results table",
        description="Find report.json under the given directories and print one table: a row per embedding "
        "model/layer, a column per task metric (the README's results table).",
    )
    r.add_argument("reports", nargs="+", metavar="DIR", help="probe output directories (searched recursively)")
    r.add_argument("--out", metavar="FILE", help="write the table here instead of stdout")
    r.set_defaults(handler=_deferred("probe_report_command"))
