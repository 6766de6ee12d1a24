"""Probe benchmark: train probes on a synthetic embeddings table and time them.

A synthetic Delta table of N x 1728 embeddings (MULE's width) with 50 tags (multilabel, prevalence 2-30%) is
written to a temporary directory, then:
  1. loading: reading the table, joining the labels and splitting;
  2. single trials of the `linear` and `mlp` presets (one 512-unit layer): seconds per epoch, epochs and seconds
     to the best validation epoch (convergence), total seconds with early stopping's patience, test ROC-AUC;
     the MLP also with 2 torch threads (3 epochs: seconds per epoch only);
  3. grid search wall time with 1 and 2 trials in parallel, on a seeded sample of the grid over a subset of rows
     (the full 216-trial grid on 100k rows is hours on 2 cores).

Prints a table and writes bench/results/probe_bench.json. Timings depend on what else the machine runs: say so
when reporting them. `--quick` runs a small version (10,000 rows, capped epochs) in a minute or two; `--smoke` the
smallest (1,000 x 64, two epochs), in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake
from harness import BenchRun, console, parse_args, print_table, results_path

from catalog_embed.pipelines.probes.tables import EmbeddingsSource
from catalog_embed.schemas.tables import EMBEDDINGS
from catalog_embed.workers.probes.data import LabelSpec, ProbeDataset, Split, build_dataset
from catalog_embed.workers.probes.metrics import evaluate
from catalog_embed.workers.probes.models import predict_scores
from catalog_embed.workers.probes.search import PRESETS, grid_configs, run_trial, search
from catalog_embed.workers.probes.tasks import TaskKind
from catalog_embed.workers.probes.train import ProbeConfig, restore

SMOKE = {"rows": 1_000, "dim": 64, "labels": 5, "max_epochs": 2, "grid_trials": 2, "grid_rows": 500,
         "grid_max_epochs": 1}  # fmt: skip


def synthetic_table(directory: Path, rows: int, dim: int, n_labels: int, seed: int = 0) -> tuple[str, pa.Table]:
    """Write an embeddings Delta table and return its URI and a matching labels table."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(rows, 64)).astype(np.float32)
    vectors = latent @ rng.normal(size=(64, dim)).astype(np.float32) / 8
    vectors += rng.normal(scale=0.5, size=(rows, dim)).astype(np.float32)
    # Tags: thresholded noisy projections of the latent factors, some through a nonlinearity, prevalence 2-30%.
    logits = latent @ rng.normal(size=(64, n_labels)).astype(np.float32)
    logits[:, ::3] = np.abs(logits[:, ::3])
    logits += rng.normal(scale=2.0, size=logits.shape).astype(np.float32)
    prevalence = np.linspace(0.02, 0.3, n_labels)
    thresholds = np.array([np.quantile(logits[:, j], 1 - p) for j, p in enumerate(prevalence)])
    tags = logits > thresholds
    ids = [f"track{i:07d}" for i in range(rows)]
    now = datetime.now(UTC)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * dim)
    table = pa.Table.from_pydict(
        {
            "model": ["synthetic"] * rows,
            "track_id": ids,
            "layer": ["pool"] * rows,
            "dim": [dim] * rows,
            "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))),
            "n_windows": [10] * rows,
            "duration_s": [30.0] * rows,
            "source_uri": ids,
            "source_fingerprint": ids,
            "model_version": ["0"] * rows,
            "feature_hash": ["0"] * rows,
            "run_id": ["bench"] * rows,
            "embedded_at": [now] * rows,
            "deleted": [False] * rows,
        },
        schema=EMBEDDINGS.schema,
    )
    uri = str(directory / "embeddings")
    write_deltalake(uri, table, partition_by=list(EMBEDDINGS.partition_by))
    names = [f"tag{j:02d}" for j in range(n_labels)]
    labels = pa.table({"track_id": ids, **{name: tags[:, j] for j, name in enumerate(names)}})
    return uri, labels


def subset(dataset: ProbeDataset, rows: int) -> ProbeDataset:
    """The first rows of every split, in the splits' proportions."""
    total = sum(len(s.track_ids) for s in dataset.splits.values())
    splits = {}
    for name, split in dataset.splits.items():
        keep = max(1, round(len(split.track_ids) * rows / total))
        splits[name] = Split(split.track_ids[:keep], split.x[:keep], split.y[:keep])
    return replace(dataset, splits=splits)


def single_trial(dataset: ProbeDataset, name: str, config: ProbeConfig, threads: int) -> dict:
    """Train one trial and measure it."""
    result = run_trial(dataset, config, threads)
    test = dataset.splits["test"]
    scores = predict_scores(restore(dataset, result), dataset.kind, test.x)
    summary = result.summary()
    # Converged: the first epoch whose validation AUC is within 0.001 of the best the trial reached.
    near = next(h for h in result.history if h["valid"] >= result.best_valid - 0.001)
    return {
        "probe": name,
        "threads": threads,
        "config": config.label(),
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds_to_best": summary["seconds_to_best"],
        "converged_epoch": near["epoch"],
        "seconds_to_converged": near["seconds"],
        "seconds_total": result.seconds,
        "valid_roc_auc": result.best_valid,
        "test": evaluate(dataset.kind, test.y, scores, dataset.label_names).metrics,
        "history": result.history,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 rows, epochs capped at 8, 4 grid trials")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1728)
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=100,
        help="max epochs of the single trials (the default 30000-step budget usually ends them first)",
    )
    parser.add_argument("--grid-trials", type=int, default=8, help="grid points sampled for the search timing")
    parser.add_argument("--grid-rows", type=int, default=20_000, help="rows the grid search trains on")
    parser.add_argument("--grid-max-epochs", type=int, default=10)
    args = parse_args(parser, SMOKE, argv)
    if args.quick:
        args.rows, args.max_epochs, args.grid_trials, args.grid_rows, args.grid_max_epochs = 10_000, 8, 4, 5_000, 4

    run = BenchRun("probe", args)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        started = time.perf_counter()
        uri, labels = synthetic_table(Path(tmp), args.rows, args.dim, args.labels)
        results["write_table_seconds"] = time.perf_counter() - started
        console.print(f"wrote {args.rows} x {args.dim} embeddings in {results['write_table_seconds']:.1f}s")

        started = time.perf_counter()
        source = EmbeddingsSource(uri)
        dataset = build_dataset(source.read(), labels, LabelSpec(TaskKind.MULTILABEL), source.model, source.layer)
        results["load_seconds"] = time.perf_counter() - started
        console.print(f"read, joined and split in {results['load_seconds']:.1f}s: {dataset.info}")

    trials = []
    # The 2-thread MLP run only measures seconds per epoch: on a busy machine it can be many times slower.
    for name, threads, epochs in (("linear", 1, args.max_epochs), ("mlp", 1, args.max_epochs), ("mlp", 2, 3)):
        config = replace(PRESETS[name], max_epochs=epochs)
        trials.append(single_trial(dataset, name, config, threads))
        t = trials[-1]
        console.print(
            f"{name} ({threads} thread(s)): {t['seconds_per_epoch']:.1f} s/epoch, best epoch "
            f"{t['best_epoch']}/{t['epochs_run']} at {t['seconds_to_best']:.0f}s, within 0.001 of it at epoch "
            f"{t['converged_epoch']} ({t['seconds_to_converged']:.0f}s), test ROC-AUC "
            f"{t['test']['roc_auc']:.4f}"
        )
    results["single_trials"] = trials

    small = subset(dataset, args.grid_rows)
    configs = grid_configs(replace(PRESETS["linear"], max_epochs=args.grid_max_epochs), args.grid_trials)
    grid = []
    for parallel in (1, 2):
        started = time.perf_counter()
        best, _ = search(small, configs, parallel=parallel, threads=1)
        grid.append(
            {
                "parallel": parallel,
                "trials": len(configs),
                "rows": args.grid_rows,
                "wall_seconds": time.perf_counter() - started,
                "best": best.config.label(),
                "best_valid_roc_auc": best.best_valid,
            }
        )
        console.print(
            f"grid, {len(configs)} trials on {args.grid_rows} rows, {parallel} parallel: "
            f"{grid[-1]['wall_seconds']:.0f}s"
        )
    results["grid"] = grid

    load = run.meta["machine"]["load_average_start"][0]
    rows = [
        (f"{t['probe']} ({t['config']})", str(t["threads"]), f"{t['seconds_per_epoch']:.1f}",
         f"{t['best_epoch']} / {t['epochs_run']}", f"{t['seconds_to_best']:.0f}",
         f"{t['seconds_to_converged']:.0f} ({t['converged_epoch']})", f"{t['seconds_total']:.0f}",
         f"{t['test']['roc_auc']:.4f}", f"{t['test']['pr_auc']:.4f}")
        for t in trials
    ]  # fmt: skip
    rows += [
        (f"grid: {g['trials']} trials, {g['rows']:,} rows, {g['parallel']} parallel", "1", "", "", "", "",
         f"{g['wall_seconds']:.0f}", f"{g['best_valid_roc_auc']:.4f} (valid)", "")
        for g in grid
    ]  # fmt: skip
    rows.append(("load: read table + join + split", "", "", "", "", "", f"{results['load_seconds']:.1f}", "", ""))
    print_table(
        f"Probe benchmark: {args.rows:,} x {args.dim} embeddings, {args.labels} tags ({os.cpu_count()} cores, "
        f"load {load:.1f})",
        ("run", "threads", "s/epoch", "best epoch / run", "s to best", "s to best-0.001 (epoch)", "s total",
         "test ROC-AUC", "test PR-AUC"),
        rows,
    )  # fmt: skip
    console.print(f"results -> {run.write(results_path('probe_bench'), results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
