"""Probe every embedding model in the demo catalog's tables on its three tasks and print the README results table.

Tasks, from the demo catalog's labels.parquet (its `split` column gives the splits):
    instrument: multiclass on `instrument_family` (accuracy)
    key: the 24-class key probe on `key` (MIREX weighted score)
    tempo: regression on `tempo` (R2)

Each (model, task) probe goes to OUT/<model>/<task>; the table is what `catalog-embed probe-report OUT` prints. It
goes to OUT/results.md, and each probe's test metrics with the harness's record of the machine and commit
(`bench/harness.py`) to OUT/results.json.
Run after `make demo`:
    python bench/probe_demo.py --tables demo/tables --labels demo/catalog/labels.parquet --out demo/probes

`--smoke` caps training at two epochs (seconds, on tables of any size): the script runs, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.compute as pc
from deltalake import DeltaTable
from harness import BenchRun, parse_args

from catalog_embed.pipelines.probes.job import ProbeJobConfig, run_probe_job
from catalog_embed.workers.probes.data import LabelSpec
from catalog_embed.workers.probes.report import results_table
from catalog_embed.workers.probes.search import PRESETS, preset
from catalog_embed.workers.probes.tasks import TaskKind

SMOKE = {"max_epochs": 2}
TASKS = {
    "instrument": (TaskKind.MULTICLASS, "instrument_family"),
    "key": (TaskKind.KEY, "key"),
    "tempo": (TaskKind.REGRESSION, "tempo"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the probes and print the results table; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="demo/tables", help="the embed job's --out (holds embeddings/)")
    parser.add_argument("--labels", default="demo/catalog/labels.parquet")
    parser.add_argument("--out", default="demo/probes")
    parser.add_argument("--preset", default="linear", choices=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, help="cap on each probe's epochs (default: the preset's)")
    args = parse_args(parser, SMOKE, argv)
    run = BenchRun("probe_demo", args)

    embeddings = str(Path(args.tables) / "embeddings")
    base = replace(preset(args.preset), seed=args.seed)
    if args.max_epochs:
        base = replace(base, max_epochs=args.max_epochs)
    live = DeltaTable(embeddings).to_pyarrow_dataset().to_table(columns=["model"], filter=~pc.field("deleted"))
    reports = []
    for model in sorted(pc.unique(live["model"]).to_pylist()):
        for task, (kind, column) in TASKS.items():
            job = ProbeJobConfig(
                embeddings=embeddings,
                labels=args.labels,
                task=task,
                label_spec=LabelSpec(kind, columns=(column,), seed=args.seed),
                model=model,
                layer=None,
                out=Path(args.out) / model / task,
                base=base,
            )
            reports.append(run_probe_job(job, log=lambda m: print(m, file=sys.stderr)))
    table = results_table(reports)
    (Path(args.out) / "results.md").write_text(table)
    probes = [{k: r[k] for k in ("model", "layer", "task", "test")} for r in reports]
    run.write(Path(args.out) / "results.json", {"probes": probes})
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
