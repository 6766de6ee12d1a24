"""`catalog-embed compare`: how far two embeddings of one catalog differ, and a gate on it.

A and B are two models, or two versions of one model (`MODEL@VERSION`: the embeddings table at that Delta
version), compared on the tracks both hold:

- overlap@k: per track, the share of its k nearest neighbours (cosine, exact) in A that are also its k nearest in
  B; 1.0 when both spaces agree on every neighbourhood.
- CKA: linear centred kernel alignment of the two matrices (as stored); 1.0 when one is a rotation/scaling of
  the other.
- rank correlation: per track, Spearman's correlation of its similarities to the union of its neighbours in A and
  B, measured in each space; its distribution says whether neighbourhoods were reordered or replaced.
- probe delta: given labels, a linear probe (the `probe` command's `linear` preset and its training, on the
  vectors as stored) per task on each side, on the same split; B's test score minus A's.

Writes report.json and report.md; each `--fail-under METRIC=VALUE` that fails makes the command exit 1 (2 stays
for a usage error), so a nightly schedule can hold a new encoder version back before it replaces the catalog's rows.
Exit 1 means a gate failed and nothing else: too few shared tracks for k is a usage error (2), a metric that is
undefined (NaN, e.g. every similarity equal) fails its gate, and a crash of this command exits 70, never 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_embed.pipelines.analysts.outputs import OutputFile, make_folder, output_folder
from catalog_embed.pipelines.analysts.vectors import ModelLayer, ModelRef, Vectors, add_table_arguments, store_from_args
from catalog_embed.schemas.errors import CatalogEmbedError, ConfigError, LabelsError
from catalog_embed.workers.analysis import (
    distribution,
    exact_neighbours,
    linear_cka,
    neighbour_rank_correlation,
    overlap_at_k,
)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# Gate metrics: what `--fail-under` accepts (probe_delta:<task> too).
GATES = ("overlap", "cka", "rank_corr")
# A crash (a bug) exits EX_SOFTWARE (sysexits.h): never 1, which infra/nightly-gate.sh reads as a failed gate.
EXIT_CRASH = 70


@dataclass(frozen=True)
class CompareConfig:
    """What to compare and how.

    Attributes:
        a, b: the two embeddings.
        layer_a, layer_b: their layers (None: the model's only one).
        k: neighbours per track.
        sample: query tracks for the neighbour metrics and rows for CKA (seeded sample of the shared tracks).
        seed: seed of the sample and of the probes.
        labels: labels file for probe deltas (None: no probes).
        tasks: (label column, task kind) per probe.
        gates: metric -> lowest acceptable value.
        report: folder for report.json and report.md.
    """

    a: ModelRef
    b: ModelRef
    layer_a: str | None = None
    layer_b: str | None = None
    k: int = 10
    sample: int = 10_000
    seed: int = 0
    labels: str | None = None
    tasks: tuple[tuple[str, str], ...] = ()
    gates: tuple[tuple[str, float], ...] = ()
    report: Path = Path("compare")


def parse_gates(pairs: list[str], tasks: tuple[tuple[str, str], ...]) -> tuple[tuple[str, float], ...]:
    """`--fail-under METRIC=VALUE` pairs; metrics are overlap, cka, rank_corr (median) or probe_delta:<task>."""
    gates = []
    names = [*GATES, *(f"probe_delta:{task}" for task, _ in tasks)]
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = None
        if not sep or threshold is None or name not in names:
            msg = f"--fail-under {pair!r}: use METRIC=NUMBER with METRIC one of {', '.join(names)}"
            raise ConfigError(msg)
        gates.append((name, threshold))
    return tuple(gates)


def compare(config: CompareConfig, a_source: ModelLayer, b_source: ModelLayer) -> dict[str, Any]:
    """Compute the report (see the module docstring); every input check runs before a vector is read."""
    a_keys, b_keys = a_source.keys()["track_id"], b_source.keys()["track_id"]
    shared = pc.filter(a_keys, pc.is_in(a_keys, value_set=b_keys)).combine_chunks()
    if len(shared) < 2:
        msg = (
            f"{config.a} and {config.b} share {len(shared)} track(s) ({len(a_keys)} vs {len(b_keys)} live; e.g. "
            f"{a_keys.slice(0, 2).to_pylist()} vs {b_keys.slice(0, 2).to_pylist()}): compare embeddings of one "
            f"catalog"
        )
        raise ConfigError(msg)
    _require_enough(config, len(shared))
    labels = _labels(config, shared)
    a, b = a_source.read(shared, raw=True), b_source.read(shared, raw=True)
    # Rows left out of one side (NaN or infinite values) are left out of the other: both sides stay aligned.
    both = np.intersect1d(a.track_ids, b.track_ids)
    a, b = a.take(a.rows_of(both.tolist())), b.take(b.rows_of(both.tolist()))
    n = len(a.track_ids)
    _require_enough(config, n, left_out=len(shared) - n)
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.permutation(n)[: config.sample])
    a_nn, _ = exact_neighbours(a.vectors[rows], a.vectors, config.k, exclude=rows)
    b_nn, _ = exact_neighbours(b.vectors[rows], b.vectors, config.k, exclude=rows)
    overlap = overlap_at_k(a_nn, b_nn)
    rank_corr = neighbour_rank_correlation(a.vectors, b.vectors, rows, a_nn, b_nn)
    report: dict[str, Any] = {
        "a": _side(config.a, a), "b": _side(config.b, b),
        "shared_tracks": n, "only_a": len(a_keys) - n, "only_b": len(b_keys) - n,
        "k": int(a_nn.shape[1]), "query_tracks": len(rows),
        "overlap": distribution(overlap),
        "cka": linear_cka(a.raw[rows], b.raw[rows]),
        "cka_rows": len(rows),
        "rank_corr": distribution(rank_corr),
        "worst_tracks": [
            {"track_id": a.track_ids[rows[i]], "overlap": float(overlap[i]), "rank_corr": float(rank_corr[i])}
            for i in np.argsort(overlap, kind="stable")[:10]
        ],
        "probes": [_probe_delta(task, kind, labels, a, b, config.seed) for task, kind in config.tasks],
    }
    # A distribution with no finite value has no median: its gate sees NaN, and fails.
    values = {"overlap": report["overlap"]["mean"], "cka": report["cka"],
              "rank_corr": report["rank_corr"].get("median", math.nan),
              **{f"probe_delta:{p['task']}": p["delta"] for p in report["probes"]}}
    report["gates"] = [
        {"metric": name, "value": values[name], "fail_under": threshold,
         "passed": bool(np.isfinite(values[name]) and values[name] >= threshold)}
        for name, threshold in config.gates
    ]
    report["passed"] = all(g["passed"] for g in report["gates"])
    return report


def _require_enough(config: CompareConfig, shared: int, left_out: int = 0) -> None:
    """Refuse fewer than k + 2 shared tracks: with k >= n - 1 every track's neighbours are all the other tracks in
    both spaces, and any two embeddings would overlap 1.0, a vacuous pass."""
    if shared < config.k + 2:
        why = f" ({left_out} left out for NaN or infinite values)" if left_out else ""
        msg = (
            f"{config.a} and {config.b} share {shared} usable track(s){why}: overlap@{config.k} needs at least "
            f"{config.k + 2} (k neighbours and one that is not); lower --k to at most {max(shared - 2, 0)} or embed "
            "more tracks"
        )
        raise ConfigError(msg)


def _side(ref: ModelRef, v: Vectors) -> dict[str, Any]:
    return {"ref": str(ref), "model": v.model, "layer": v.layer, "dim": v.dim, "table_version": v.table_version}


def _labels(config: CompareConfig, shared: pa.Array) -> pa.Table | None:
    """The labels table, checked to have the task columns and to join the shared tracks."""
    if config.labels is None:
        return None
    from catalog_embed.pipelines.probes.tables import (
        read_labels,  # scikit-learn and torch load only when probes are asked for
    )

    labels = read_labels(config.labels)
    missing = [task for task, _ in config.tasks if task not in labels.column_names]
    if missing:
        msg = f"labels {config.labels} lack column(s) {missing} (columns: {', '.join(labels.column_names)}): fix --task"
        raise LabelsError(msg)
    ids = pc.cast(labels["track_id"], pa.string())
    if not pc.any(pc.is_in(ids, value_set=shared)).as_py():
        msg = (
            f"none of the {labels.num_rows} track ids in {config.labels} (e.g. {ids.slice(0, 2).to_pylist()}) is "
            f"among the {len(shared)} shared tracks (e.g. {shared.slice(0, 2).to_pylist()}): the labels' track_id "
            f"must use the catalog's ids"
        )
        raise LabelsError(msg)
    return labels


def _probe_delta(task: str, kind: str, labels: pa.Table, a: Vectors, b: Vectors, seed: int) -> dict[str, Any]:
    """Train the `linear` preset on each side with the same split; B's test score minus A's."""
    from catalog_embed.workers.probes.data import Embeddings, LabelSpec, build_dataset
    from catalog_embed.workers.probes.metrics import PRIMARY_METRIC, primary_score
    from catalog_embed.workers.probes.models import predict_scores
    from catalog_embed.workers.probes.search import preset, run_trial
    from catalog_embed.workers.probes.tasks import TaskKind
    from catalog_embed.workers.probes.train import restore

    spec = LabelSpec(kind=TaskKind(kind), columns=(task,), seed=seed)
    scores = {}
    for side, v in (("a", a), ("b", b)):
        embeddings = Embeddings(v.track_ids, v.raw, v.embedded_at.astype("datetime64[us]"))
        dataset = build_dataset(embeddings, labels, spec, v.model, v.layer)
        result = run_trial(dataset, replace(preset("linear"), seed=seed), threads=1)
        test = dataset.splits["test"]
        predicted = predict_scores(restore(dataset, result), dataset.kind, test.x)
        scores[side] = primary_score(dataset.kind, test.y, predicted)
        scores["n_test"] = len(test.track_ids)
    return {"task": task, "kind": kind, "metric": PRIMARY_METRIC[TaskKind(kind)], "a": scores["a"], "b": scores["b"],
            "delta": scores["b"] - scores["a"], "n_test": scores["n_test"]}


def markdown(report: dict[str, Any]) -> str:
    """The report as a short Markdown summary."""
    a, b = report["a"], report["b"]
    o, r = report["overlap"], report["rank_corr"]
    lines = [
        f"# {a['ref']} ({a['layer']}, {a['dim']}-d) vs {b['ref']} ({b['layer']}, {b['dim']}-d)",
        "",
        f"{report['shared_tracks']} shared tracks ({report['only_a']} only in A, {report['only_b']} only in B); "
        f"neighbour metrics over {report['query_tracks']} query tracks, k = {report['k']}.",
        "",
        "| metric | mean | p10 | median | p90 |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| overlap@{report['k']} | {o['mean']:.3f} | {o['p10']:.3f} | {o['median']:.3f} | {o['p90']:.3f} |",
    ]
    if r.get("count"):
        lines.append(f"| rank correlation | {r['mean']:.3f} | {r['p10']:.3f} | {r['median']:.3f} | {r['p90']:.3f} |")
    lines += ["", f"Linear CKA: {report['cka']:.3f} (over {report['cka_rows']} tracks)."]
    if report["probes"]:
        lines += ["", "| task | metric | A | B | B - A |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {p['task']} | {p['metric']} | {p['a']:.3f} | {p['b']:.3f} | {p['delta']:+.3f} |"
                  for p in report["probes"]]
    if report["gates"]:
        lines += ["", "| gate | value | fail under | |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {g['metric']} | {g['value']:.3f} | {g['fail_under']} | {'pass' if g['passed'] else 'FAIL'} |"
                  for g in report["gates"]]
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand."""
    parser = subparsers.add_parser(
        "compare",
        help="compare two embeddings of one catalog (models or versions); gate on the result",
        description="Neighbour overlap@k, linear CKA, per-track neighbour-rank correlation and, given labels, "
        "probe-score deltas between A and B on their shared tracks. Exits 1 when a --fail-under gate fails.",
    )
    add_table_arguments(parser)
    parser.add_argument("--a", required=True, metavar="MODEL[@VERSION]", help="the reference (e.g. musicnn-msd@4)")
    parser.add_argument("--b", required=True, metavar="MODEL[@VERSION]", help="the candidate")
    parser.add_argument("--b-out", metavar="URI", help="B's output root, when not --out (a candidate's tables)")
    parser.add_argument("--layer-a", help="A's layer (default: the model's only layer)")
    parser.add_argument("--layer-b", help="B's layer (default: the model's only layer)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per track (default: 10)")
    parser.add_argument("--sample", type=int, default=CompareConfig.sample,
                        help="query tracks for the neighbour metrics and CKA (default: 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", metavar="FILE", help="labels (CSV, Parquet, Delta) for probe deltas")
    parser.add_argument("--task", action="append", default=[], metavar="COLUMN",
                        help="label column to probe; repeatable, one --kind each")
    parser.add_argument("--kind", action="append", default=[],
                        choices=("multilabel", "multiclass", "regression", "key"))
    parser.add_argument("--fail-under", action="append", default=[], metavar="METRIC=VALUE",
                        help="gate: overlap, cka, rank_corr (median) or probe_delta:TASK; repeatable")
    parser.add_argument("--report", metavar="DIR",
                        help="folder for report.json and report.md (default: compare/A-vs-B)")
    parser.set_defaults(handler=_handle)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """Parse the namespace into a CompareConfig (no other logic)."""
    if len(args.task) != len(args.kind):
        msg = f"give one --kind per --task ({len(args.task)} task(s), {len(args.kind)} kind(s))"
        raise ConfigError(msg)
    if args.task and not args.labels:
        msg = "--task needs --labels FILE"
        raise ConfigError(msg)
    if args.k < 1 or args.sample < 2:
        msg = f"--k must be at least 1 and --sample at least 2, got {args.k} and {args.sample}"
        raise ConfigError(msg)
    a, b = ModelRef.parse(args.a), ModelRef.parse(args.b)
    tasks = tuple(zip(args.task, args.kind, strict=True))
    name = f"{a}-vs-{b}".replace("/", "_")
    return CompareConfig(
        a=a, b=b, layer_a=args.layer_a, layer_b=args.layer_b, k=args.k, sample=args.sample, seed=args.seed,
        labels=args.labels, tasks=tasks, gates=parse_gates(args.fail_under, tasks),
        report=Path(args.report or Path("compare") / name),
    )


def _handle(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (CatalogEmbedError, ImportError, OSError):
        raise  # the CLI reports these: one line, exit 2 (a missing extra, a fixable condition)
    except Exception:
        traceback.print_exc()
        print(f"catalog-embed: error: `compare` crashed (a bug, not a failed gate): exit {EXIT_CRASH}", file=sys.stderr)
        return EXIT_CRASH


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    a_store = store_from_args(args)
    b_store = store_from_args(args, args.b_out)
    report_folder = output_folder("--report", str(config.report), [a_store, b_store])
    a_source = ModelLayer(a_store, config.a.model, config.layer_a, config.a.version)
    b_source = ModelLayer(b_store, config.b.model, config.layer_b, config.b.version)
    report = compare(config, a_source, b_source)
    summary = markdown(report)
    make_folder("--report", report_folder)
    for name, text in ((REPORT_JSON, json.dumps(_finite(report), indent=1, default=str, allow_nan=False)),
                       (REPORT_MD, summary)):
        target = OutputFile.check("--report", str(report_folder / name), [a_store, b_store])
        target.write(lambda path, text=text: path.write_text(text))
    print(summary, end="")
    failed = [g for g in report["gates"] if not g["passed"]]
    for gate in failed:
        print(f"catalog-embed: gate failed: {gate['metric']} = {gate['value']:.4f} < {gate['fail_under']}",
              file=sys.stderr)
    print(f"report -> {config.report / REPORT_JSON}", file=sys.stderr)
    return 1 if failed else 0


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as None: report.json stays JSON (which has no NaN) for every reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
