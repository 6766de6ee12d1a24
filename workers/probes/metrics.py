"""Probe metrics from scikit-learn and mir_eval, overall and per label.

multilabel: macro ROC-AUC and PR-AUC (average precision) over the tags that have both positives and negatives in
the evaluated split (others are undefined and listed as excluded); multiclass: accuracy; regression: R2 averaged
over targets; key: the MIREX weighted score (mir_eval.key.weighted_score) averaged over tracks, plus accuracy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import mir_eval
import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, r2_score, roc_auc_score

from catalog_embed.workers.probes.tasks import KEY_CLASSES, TaskKind

PRIMARY_METRIC = {
    TaskKind.MULTILABEL: "roc_auc",
    TaskKind.MULTICLASS: "accuracy",
    TaskKind.REGRESSION: "r2",
    TaskKind.KEY: "key_weighted_score",
}

# mir_eval's weighted score gives each relation between estimated and reference key one value.
_KEY_RELATIONS = {1.0: "correct", 0.5: "fifth", 0.3: "relative", 0.2: "parallel", 0.0: "other"}


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one split.

    Attributes:
        metrics: overall metrics by name (see the module docstring).
        per_label: metrics by label name: roc_auc/pr_auc/positives (multilabel), recall/support (multiclass),
            key_weighted_score/support (key), r2 (regression).
        excluded: labels left out of the macro averages because the split has only one class of them.
        confusion: confusion matrix (rows: truth, columns: prediction) for multiclass and key.
    """

    metrics: dict[str, float]
    per_label: dict[str, dict[str, float]] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()
    confusion: list[list[int]] | None = None


def primary_score(kind: TaskKind, y: np.ndarray, scores: np.ndarray) -> float:
    """The metric early stopping and the search maximise; NaN where it is undefined."""
    if kind is TaskKind.MULTILABEL:
        usable = _two_class_columns(y)
        if not usable.any():
            return float("nan")
        return float(roc_auc_score(y[:, usable], scores[:, usable], average="macro"))
    if kind is TaskKind.REGRESSION:
        return float(r2_score(y, scores, multioutput="uniform_average"))
    predicted = scores.argmax(axis=1)
    if kind is TaskKind.KEY:
        return float(np.mean(_key_scores(y, predicted)))
    return float(accuracy_score(y, predicted))


def evaluate(kind: TaskKind, y: np.ndarray, scores: np.ndarray, label_names: tuple[str, ...]) -> Evaluation:
    """All metrics of one split, with per-label breakdowns."""
    if kind is TaskKind.MULTILABEL:
        usable = _two_class_columns(y)
        excluded = tuple(name for name, ok in zip(label_names, usable, strict=True) if not ok)
        per_label = {}
        for i in np.flatnonzero(usable):
            per_label[label_names[i]] = {
                "roc_auc": float(roc_auc_score(y[:, i], scores[:, i])),
                "pr_auc": float(average_precision_score(y[:, i], scores[:, i])),
                "positives": int(y[:, i].sum()),
            }
        metrics = {
            "roc_auc": float(roc_auc_score(y[:, usable], scores[:, usable], average="macro")),
            "pr_auc": float(average_precision_score(y[:, usable], scores[:, usable], average="macro")),
        }
        return Evaluation(metrics, per_label, excluded)
    if kind is TaskKind.REGRESSION:
        per_target = r2_score(y, scores, multioutput="raw_values")
        per_label = {name: {"r2": float(v)} for name, v in zip(label_names, per_target, strict=True)}
        return Evaluation({"r2": float(np.mean(per_target))}, per_label)
    predicted = scores.argmax(axis=1)
    classes = np.arange(len(label_names))
    confusion = confusion_matrix(y, predicted, labels=classes)
    support = confusion.sum(axis=1)
    metrics = {"accuracy": float(accuracy_score(y, predicted))}
    if kind is TaskKind.MULTICLASS:
        per_label = {
            label_names[c]: {"recall": float(confusion[c, c] / support[c]), "support": int(support[c])}
            for c in classes
            if support[c]
        }
        return Evaluation(metrics, per_label, confusion=confusion.tolist())
    key_scores = _key_scores(y, predicted)
    metrics["key_weighted_score"] = float(np.mean(key_scores))
    relations = Counter(_KEY_RELATIONS[float(s)] for s in key_scores)
    for relation in _KEY_RELATIONS.values():
        metrics[f"key_{relation}"] = relations[relation] / len(key_scores)
    per_label = {
        label_names[c]: {"key_weighted_score": float(np.mean(key_scores[y == c])), "support": int(support[c])}
        for c in classes
        if support[c]
    }
    return Evaluation(metrics, per_label, confusion=confusion.tolist())


def _two_class_columns(y: np.ndarray) -> np.ndarray:
    positives = y.sum(axis=0)
    return (positives > 0) & (positives < len(y))


# mir_eval's score of every (reference, estimate) pair of the 24 key classes: a lookup per track instead of
# parsing two key strings per track on every validation pass.
_KEY_SCORE_TABLE = np.array([[mir_eval.key.weighted_score(ref, est) for est in KEY_CLASSES] for ref in KEY_CLASSES])


def _key_scores(y: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return _KEY_SCORE_TABLE[y, predicted]
