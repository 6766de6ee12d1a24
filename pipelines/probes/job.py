"""The probe jobs behind `catalog-embed probe`, `tag` and `probe-report` (`catalog_embed.pipelines.probes.cli` declares the
subcommands).

`probe` joins an embeddings table (one model, one layer) with a labels table, trains a preset or searches the
grid (trials in local processes or Ray tasks), evaluates the chosen probe on the test split and writes into --out:
report.json, report.md and plots, the probe (probe/probe.safetensors, probe/probe.json) and the test split's
predictions (predictions/, a Delta table). `tag` applies a saved probe to a whole embeddings table, incrementally.
`probe-report` gathers report.json files into one Markdown results table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from catalog_embed.pipelines.io.storage import storage_options_from_args
from catalog_embed.pipelines.probes.tables import (
    EmbeddingsSource,
    delete_predictions,
    predictions_table,
    read_labels,
    tagged,
)
from catalog_embed.schemas.errors import ConfigError
from catalog_embed.workers.probes.data import Embeddings, LabelSpec, ProbeDataset, build_dataset
from catalog_embed.workers.probes.metrics import PRIMARY_METRIC, evaluate
from catalog_embed.workers.probes.models import Probe, ProbeSpec
from catalog_embed.workers.probes.predictions import prediction_table
from catalog_embed.workers.probes.report import REPORT_FILE, results_table, write_report
from catalog_embed.workers.probes.search import GRID, grid_configs, local_trials, preset, run_trial, search
from catalog_embed.workers.probes.tasks import TaskKind
from catalog_embed.workers.probes.train import ProbeConfig, TrialResult, restore


@dataclass(frozen=True)
class ProbeJobConfig:
    """Everything `catalog-embed probe` was asked to do, resolved.

    Attributes:
        embeddings: embeddings table URI.
        labels: labels table URI.
        task: task name (names the probe and its predictions).
        label_spec: how labels are read and split.
        model: embedding model (None: the table's only one).
        layer: embedding layer (None: the model's only one).
        out: output directory.
        base: the trial configuration (the preset with overrides), or the base of the grid.
        search: None for a single trial, "grid" for the grid.
        max_trials: sample this many grid points (None: all).
        parallel: trials run at once.
        threads: torch threads per trial.
        runner: "local" (processes) or "ray" (Ray tasks).
        top_k: labels kept in the predictions' top_labels.
        storage_options: deltalake storage options for the embeddings and labels tables (`--storage-option`).
    """

    embeddings: str
    labels: str
    task: str
    label_spec: LabelSpec
    model: str | None
    layer: str | None
    out: Path
    base: ProbeConfig
    search: str | None = None
    max_trials: int | None = None
    parallel: int = 1
    threads: int = 1
    runner: str = "local"
    top_k: int = 3
    storage_options: dict[str, str] | None = None


def ray_trials(
    dataset: ProbeDataset, configs: Sequence[ProbeConfig], parallel: int, threads: int
) -> Iterator[TrialResult]:
    """Run trials as Ray tasks, each reserving `threads` CPUs, on a local Ray started with room for `parallel`
    of them (or on the Ray already initialised in this process)."""
    import ray  # only this runner needs Ray: imported here so the rest never does

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=parallel * threads, include_dashboard=False, log_to_driver=False)
    try:
        data = ray.put(dataset)
        task = ray.remote(num_cpus=threads)(run_trial)
        pending = [task.remote(data, config, threads) for config in configs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started_here:
            ray.shutdown()


def run_probe_job(job: ProbeJobConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, select, evaluate, save and report one probe; returns the report written to report.json."""
    started = time.perf_counter()
    source = EmbeddingsSource(job.embeddings, job.model, job.layer, storage_options=job.storage_options)
    labels = read_labels(job.labels, job.storage_options)
    embeddings = source.read()
    dataset = build_dataset(embeddings, labels, job.label_spec, source.model, source.layer)
    loaded = time.perf_counter()
    configs = grid_configs(job.base, job.max_trials, job.base.seed) if job.search else [job.base]
    metric = PRIMARY_METRIC[dataset.kind]
    log(
        f"probe {job.task}: {source.model}/{source.layer}, {dataset.info['n_train']} train / "
        f"{dataset.info['n_valid']} valid / {dataset.info['n_test']} test, {len(configs)} trial(s)"
    )
    if dataset.info["rows_missing_label"]:
        counts = ", ".join(f"{n} in {c!r}" for c, n in dataset.info["missing_by_column"].items() if n)
        log(f"  left out {dataset.info['rows_missing_label']} track(s) without a label (empty, null or NaN: {counts})")
    finished = 0

    def on_trial(result: TrialResult) -> None:
        nonlocal finished
        finished += 1
        log(
            f"  trial {finished}/{len(configs)} {result.config.label()}: valid {metric} {result.best_valid:.4f} "
            f"(epoch {result.best_epoch}/{result.epochs_run}, {result.seconds:.1f}s)"
        )

    trial_map = ray_trials if job.runner == "ray" else local_trials
    best, trials = search(dataset, configs, job.parallel, job.threads, trial_map, on_trial)
    searched = time.perf_counter()

    net = restore(dataset, best)
    spec = ProbeSpec(
        task=job.task,
        kind=dataset.kind,
        model=dataset.model,
        layer=dataset.layer,
        in_dim=dataset.in_dim,
        label_names=dataset.label_names,
        hidden=best.config.hidden,
        dropout=best.config.dropout,
        dropout_input=best.config.dropout_input,
        config=best.config.to_dict(),
    )
    probe = Probe.create(spec, net)
    probe.save(job.out / "probe")
    valid, test = dataset.splits["valid"], dataset.splits["test"]
    valid_eval = evaluate(dataset.kind, valid.y, probe.scores(valid.x), dataset.label_names)
    test_scores = probe.scores(test.x)
    test_eval = evaluate(dataset.kind, test.y, test_scores, dataset.label_names)

    position = {track_id: row for row, track_id in enumerate(embeddings.track_ids)}
    rows = [position[t] for t in test.track_ids]
    test_embeddings = Embeddings(test.track_ids, test.x, embeddings.embedded_at[rows])
    store, spec = predictions_table(str(job.out / "predictions"))
    store.overwrite(spec, prediction_table(probe, test_embeddings, test_scores, split="test", top_k=job.top_k))

    search_desc = (
        f"grid search, {len(configs)} trials, {job.parallel} in parallel ({job.runner}, {job.threads} thread(s) each)"
        if job.search
        else "single trial"
    )
    report = {
        "task": job.task,
        "kind": str(dataset.kind),
        "probe_id": probe.probe_id,
        "model": dataset.model,
        "layer": dataset.layer,
        "embeddings": job.embeddings,
        "labels": job.labels,
        "label_names": list(dataset.label_names),
        "data": dataset.info,
        "search": {
            "description": search_desc,
            "runner": job.runner,
            "parallel": job.parallel,
            "threads": job.threads,
            "trials": len(configs),
            "wall_seconds": searched - loaded,
        },
        "chosen": {**best.summary(), "history": best.history},
        "trials": [t.summary() for t in trials],
        "valid": valid_eval.metrics,
        "test": test_eval.metrics,
        "per_label": test_eval.per_label,
        "excluded_labels": list(test_eval.excluded),
        "confusion": test_eval.confusion,
        "timings": {
            "load_seconds": loaded - started,
            "search_seconds": searched - loaded,
            "total_seconds": time.perf_counter() - started,
        },
        "config": _job_dict(job),
        "outputs": {"probe": "probe", "predictions": "predictions"},
    }
    report = write_report(job.out, report, best, test_eval, test.y, test_scores)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in test_eval.metrics.items())
    log(f"probe {probe.probe_id}: test {shown}; report in {job.out / REPORT_FILE}")
    return report


@dataclass(frozen=True)
class TagSummary:
    """What a `tag` run did."""

    probe_id: str
    embedded: int
    already_tagged: int
    tagged: int
    removed: int
    commits: int
    seconds: float


def tag(
    probe: Probe,
    source: EmbeddingsSource,
    out_uri: str,
    batch_rows: int = 65536,
    top_k: int = 3,
    storage_options: dict[str, str] | None = None,
) -> TagSummary:
    """Score every live embedding of `source` with `probe` and upsert the rows into the predictions table.

    Tagging is incremental: tracks whose current embedding the same probe already scored are skipped, every batch
    is upserted by (probe_id, model, track_id) in its own commit, so an interrupted run resumes where it stopped
    and a re-embedded track (newer `embedded_at`) is scored again. The probe's rows for tracks no longer live in
    the embeddings table (deleted since) are removed at the end.

    Raises:
        TableError: `out_uri` holds a table that is not a predictions table.
    """
    started = time.perf_counter()
    store, spec = predictions_table(out_uri, storage_options)
    done = tagged(store, spec, probe.probe_id, probe.spec.model)
    embedded = already = scored = commits = 0
    live: set[str] = set()
    for batch in source.batches(batch_rows):
        embedded += len(batch.track_ids)
        live.update(batch.track_ids)
        previous = np.array([done.get(t, np.datetime64("NaT")) for t in batch.track_ids], dtype="datetime64[us]")
        todo = ~(previous == batch.embedded_at)
        already += int((~todo).sum())
        if not todo.any():
            continue
        batch = Embeddings(batch.track_ids[todo], batch.vectors[todo], batch.embedded_at[todo])
        rows = prediction_table(probe, batch, probe.scores(batch.vectors), top_k=top_k)
        store.upsert(spec, rows)
        scored += rows.num_rows
        commits += 1
    gone = sorted(set(done) - live)
    if gone:
        delete_predictions(store, spec, probe.probe_id, probe.spec.model, gone)
        commits += 1
    return TagSummary(probe.probe_id, embedded, already, scored, len(gone), commits, time.perf_counter() - started)


def _job_dict(job: ProbeJobConfig) -> dict[str, Any]:
    data = asdict(job)
    data["out"] = str(job.out)
    data["label_spec"]["kind"] = str(job.label_spec.kind)
    data["base"] = job.base.to_dict()
    # How the tables were reached is not what the probe is, and a storage option may carry a token.
    del data["storage_options"]
    return data


# CLI flag -> ProbeConfig field, for the flags that override the preset.
_OVERRIDES = {
    "hidden": "hidden",
    "dropout": "dropout",
    "l2": "l2",
    "lr": "lr",
    "batch_size": "batch_size",
    "standardize": "standardize",
    "max_epochs": "max_epochs",
    "max_steps": "max_steps",
    "warmup": "warmup",
    "patience": "patience",
}


def probe_job_config(args: argparse.Namespace) -> ProbeJobConfig:
    """Resolve parsed `probe` arguments into a job configuration.

    Raises:
        ConfigError: conflicting flags (e.g. overriding a field the grid searches).
    """
    overrides = {field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag) is not None}
    if args.search:
        searched = sorted(set(overrides) & set(GRID))
        if searched:
            msg = f"--search grid searches {', '.join(searched)}: drop those flags (or drop --search for one trial)"
            raise ConfigError(msg)
    elif args.max_trials is not None:
        msg = "--max-trials samples the grid: add --search grid"
        raise ConfigError(msg)
    if args.parallel < 1 or args.threads < 1:
        msg = f"--parallel and --threads must be at least 1, got {args.parallel} and {args.threads}"
        raise ConfigError(msg)
    base = replace(preset(args.preset), seed=args.seed, **overrides)
    spec = LabelSpec(
        kind=TaskKind(args.kind),
        columns=tuple(args.label_column or ()),
        label_sep=args.label_sep,
        split_column=args.split_column,
        group_column=args.group_column,
        seed=args.seed,
    )
    return ProbeJobConfig(
        embeddings=args.embeddings,
        labels=args.labels,
        task=args.task,
        label_spec=spec,
        model=args.model,
        layer=args.layer,
        out=Path(args.out or Path("probes") / args.task),
        base=base,
        search=args.search,
        max_trials=args.max_trials,
        parallel=args.parallel,
        threads=args.threads,
        runner=args.runner,
        top_k=args.top_k,
        storage_options=storage_options_from_args(args),
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def probe_command(args: argparse.Namespace) -> int:
    """`catalog-embed probe`."""
    run_probe_job(probe_job_config(args), log=_log)
    return 0


def tag_command(args: argparse.Namespace) -> int:
    """`catalog-embed tag`."""
    for flag, value in (("--batch-rows", args.batch_rows), ("--top-k", args.top_k)):
        if value < 1:
            msg = f"{flag} must be at least 1, got {value}"
            raise ConfigError(msg)
    probe = Probe.load(args.probe)
    options = storage_options_from_args(args)
    source = EmbeddingsSource(
        args.embeddings, probe.spec.model, probe.spec.layer, probe=probe.probe_id, storage_options=options
    )
    summary = tag(probe, source, args.out, batch_rows=args.batch_rows, top_k=args.top_k, storage_options=options)
    _log(
        f"tag {summary.probe_id}: {summary.embedded} embedded tracks, {summary.already_tagged} already tagged, "
        f"{summary.tagged} tagged, {summary.removed} removed (deleted tracks) in {summary.commits} commit(s), "
        f"{summary.seconds:.1f}s -> {args.out}"
    )
    return 0


def probe_report_command(args: argparse.Namespace) -> int:
    """`catalog-embed probe-report`."""
    paths = sorted({p for d in args.reports for p in ([Path(d)] if Path(d).is_file() else Path(d).rglob(REPORT_FILE))})
    if not paths:
        msg = f"no {REPORT_FILE} under {args.reports}: pass the --out directories of `catalog-embed probe`"
        raise ConfigError(msg)
    table = results_table(json.loads(p.read_text()) for p in paths)
    if args.out:
        Path(args.out).write_text(table)
        _log(f"results of {len(paths)} probe(s) -> {args.out}")
    else:
        print(table, end="")
    return 0
