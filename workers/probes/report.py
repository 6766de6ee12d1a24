"""A probe job's report: report.json, a Markdown summary and PNG plots; and a results table across reports.

report.json's `test` object holds the test metrics by name (accuracy, roc_auc, pr_auc, r2, key_weighted_score,
as the task kind has them). Plots use matplotlib's object API (no pyplot), so no global backend state is touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve

from catalog_embed.workers.probes.metrics import PRIMARY_METRIC, Evaluation
from catalog_embed.workers.probes.tasks import TaskKind
from catalog_embed.workers.probes.train import TrialResult

REPORT_FILE = "report.json"
SUMMARY_FILE = "report.md"
_MAX_PR_CURVES = 12


def write_report(
    out_dir: str | Path,
    report: dict[str, Any],
    chosen: TrialResult,
    test: Evaluation,
    y_test: np.ndarray,
    scores_test: np.ndarray,
) -> dict[str, Any]:
    """Write report.json, report.md and the plots into `out_dir`.

    Args:
        out_dir: the probe job's output directory.
        report: the job's facts (task, kind, label_names, probe_id, model, layer, data, search, trials, valid
            and test metrics, ...); the plot file names are added under `plots`.
        chosen: the chosen trial, for its validation curve.
        test: the test evaluation, for the per-label and confusion plots.
        y_test: test targets.
        scores_test: test scores.

    Returns:
        The report as written to report.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = TaskKind(report["kind"])
    metric = PRIMARY_METRIC[kind]
    plots = {"validation_curve": _validation_curve(out_dir, chosen, metric)}
    if kind is TaskKind.MULTILABEL:
        plots["per_label_auc"] = _per_label_auc(out_dir, test)
        plots["pr_curves"] = _pr_curves(out_dir, report["label_names"], y_test, scores_test, test)
    elif kind in (TaskKind.MULTICLASS, TaskKind.KEY):
        plots["confusion_matrix"] = _confusion(out_dir, report["label_names"], test)
    report = {**report, "plots": plots}
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=_json_default))
    (out_dir / SUMMARY_FILE).write_text(_markdown(report))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    msg = f"cannot serialise {type(value).__name__} to JSON"
    raise TypeError(msg)


def _save(fig: Figure, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    return name


def _validation_curve(out_dir: Path, chosen: TrialResult, metric: str) -> str:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in chosen.history]
    ax.plot(epochs, [h["valid"] for h in chosen.history], marker="o", ms=3, color="tab:blue", label=f"valid {metric}")
    if chosen.best_epoch:
        ax.axvline(chosen.best_epoch, color="tab:green", ls="--", lw=1, label=f"kept: epoch {chosen.best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"valid {metric}")
    loss_ax = ax.twinx()
    loss_ax.plot(epochs, [h["train_loss"] for h in chosen.history], color="tab:orange", lw=1, label="train loss")
    loss_ax.set_ylabel("train loss")
    handles = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title(chosen.config.label(), fontsize=9)
    return _save(fig, out_dir, "validation_curve.png")


def _per_label_auc(out_dir: Path, test: Evaluation) -> str:
    names = sorted(test.per_label, key=lambda n: test.per_label[n]["roc_auc"])
    fig = Figure(figsize=(7, max(3.0, 0.22 * len(names) + 1)))
    ax = fig.add_subplot()
    rows = np.arange(len(names))
    ax.barh(rows + 0.2, [test.per_label[n]["roc_auc"] for n in names], height=0.4, label="ROC-AUC")
    ax.barh(rows - 0.2, [test.per_label[n]["pr_auc"] for n in names], height=0.4, label="PR-AUC")
    ax.set_yticks(rows, names, fontsize=7)
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("test AUC per label")
    return _save(fig, out_dir, "per_label_auc.png")


def _pr_curves(out_dir: Path, label_names: list[str], y: np.ndarray, scores: np.ndarray, test: Evaluation) -> str:
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    # The most frequent labels get a coloured, labelled curve; the rest are drawn faintly behind them.
    ranked = sorted(test.per_label, key=lambda n: -test.per_label[n]["positives"])
    highlighted = set(ranked[:_MAX_PR_CURVES])
    for i, name in enumerate(label_names):
        if name not in test.per_label:
            continue
        precision, recall, _ = precision_recall_curve(y[:, i], scores[:, i])
        if name in highlighted:
            ax.plot(recall, precision, lw=1.2, label=f"{name} ({test.per_label[name]['pr_auc']:.2f})")
        else:
            ax.plot(recall, precision, lw=0.6, color="0.8")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("test precision-recall curves (PR-AUC)")
    return _save(fig, out_dir, "pr_curves.png")


def _confusion(out_dir: Path, label_names: list[str], test: Evaluation) -> str:
    matrix = np.asarray(test.confusion)
    size = max(4.0, 0.3 * len(label_names) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(label_names))
    ax.set_xticks(ticks, label_names, rotation=90, fontsize=7)
    ax.set_yticks(ticks, label_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(label_names) <= 12:
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > matrix.max() / 2 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("test confusion matrix")
    return _save(fig, out_dir, "confusion_matrix.png")


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Probe `{report['task']}` ({report['kind']}) on `{report['model']}` / `{report['layer']}`",
        "",
        (
            f"Probe `{report['probe_id']}`; {report['search']['description']}; chosen: "
            f"`{report['chosen']['label']}` (epoch {report['chosen']['best_epoch']} of {report['chosen']['epochs_run']})."
        ),
        "",
        "| metric | valid | test |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {_fmt(report['valid'].get(name, ''))} | {_fmt(value)} |" for name, value in report["test"].items()
    ]
    data = report["data"]
    lines += [
        "",
        (
            f"Data: {data['n_train']} train, {data['n_valid']} valid, {data['n_test']} test tracks "
            f"(split: {data['split']}); {data['labelled_not_embedded']} labelled tracks had no embedding, "
            f"{data['rows_missing_label']} had no label (empty, null or NaN)."
        ),
    ]
    if report.get("excluded_labels"):
        lines += [
            "",
            f"Left out of the test averages (one class only in test): {', '.join(report['excluded_labels'])}.",
        ]
    trials = sorted(report["trials"], key=lambda t: np.inf if t["best_valid"] is None else -t["best_valid"])
    lines += [
        "",
        "## Trials (best first)",
        "",
        "| config | valid | best epoch | epochs | s/epoch |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {t['label']} | {_fmt(t['best_valid'])} | {t['best_epoch']} | {t['epochs_run']} | {t['seconds_per_epoch']:.2f} |"
        for t in trials[:20]
    ]
    if report["per_label"]:
        columns = list(next(iter(report["per_label"].values())))
        lines += [
            "",
            "## Per label (test)",
            "",
            "| label | " + " | ".join(columns) + " |",
            "| --- |" + " --- |" * len(columns),
        ]
        lines += [
            f"| {name} | " + " | ".join(_fmt(values[c]) for c in columns) + " |"
            for name, values in report["per_label"].items()
        ]
    lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in report["plots"].items()]
    return "\n".join(lines) + "\n"


def results_table(reports: Iterable[dict[str, Any]]) -> str:
    """A Markdown table of test metrics: one row per embedding (model/layer), one column per task and metric.

    The primary metric of each task is shown, plus PR-AUC for multilabel tasks; missing cells are blank.
    """
    cells: dict[tuple[str, str], dict[str, float]] = {}
    columns: list[str] = []
    for report in reports:
        kind = TaskKind(report["kind"])
        names = [PRIMARY_METRIC[kind]] + (["pr_auc"] if kind is TaskKind.MULTILABEL else [])
        for name in names:
            column = f"{report['task']} {name}"
            if column not in columns:
                columns.append(column)
            cells.setdefault((report["model"], report["layer"]), {})[column] = report["test"][name]
    lines = ["| model | layer | " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * len(columns)]
    for (model, layer), values in sorted(cells.items()):
        row = [f"{values[c]:.3f}" if c in values else "" for c in columns]
        lines.append(f"| {model} | {layer} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
