"""Probe every embedding model in the demo catalog's tables on its three tasks and print the README results table.

Tasks, from the demo catalog's labels.parquet (its `split` column gives the splits):
    instrument: multiclass on `instrument_family` (accuracy)
    key: the 24-class key probe on `key` (MIREX weighted score)
    tempo: regression on `tempo` (R2)

Each (model, task) probe goes to OUT/<model>/<task>; the table is what `catalog-embed probe-report OUT` prints.
Run after `make demo`:
    python bench/probe_demo.py --tables demo/tables --labels demo/catalog/labels.parquet --out demo/probes
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.compute as pc
from deltalake import DeltaTable

from catalog_embed.pipelines.probes.job import ProbeJobConfig, run_probe_job
from catalog_embed.workers.probes.data import LabelSpec
from catalog_embed.workers.probes.report import results_table
from catalog_embed.workers.probes.search import PRESETS, preset
from catalog_embed.workers.probes.tasks import TaskKind

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
    args = parser.parse_args(argv)

    embeddings = str(Path(args.tables) / "embeddings")
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
                base=replace(preset(args.preset), seed=args.seed),
            )
            reports.append(run_probe_job(job, log=lambda m: print(m, file=sys.stderr)))
    table = results_table(reports)
    (Path(args.out) / "results.md").write_text(table)
    (Path(args.out) / "results.json").write_text(
        json.dumps([{k: r[k] for k in ("model", "layer", "task", "test")} for r in reports], indent=2)
    )
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
