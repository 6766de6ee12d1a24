"""Rows of the predictions table (`catalog_embed.schemas.tables.PREDICTIONS`) for embeddings a probe scored.

The job layer writes them (`catalog_embed.pipelines.probes.job`: a probe job's test split, and `tag` over a whole table).
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from catalog_embed.schemas.tables import PREDICTIONS
from catalog_embed.workers.probes.data import Embeddings
from catalog_embed.workers.probes.models import Probe
from catalog_embed.workers.probes.tasks import TaskKind


def _vectors(matrix: np.ndarray) -> pa.Array:
    n, width = matrix.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1).astype(np.float32)))


def prediction_table(
    probe: Probe,
    embeddings: Embeddings,
    scores: np.ndarray,
    split: str | None = None,
    top_k: int = 3,
    predicted_at: datetime | None = None,
) -> pa.Table:
    """Rows of the predictions table for `embeddings` scored by `probe`.

    `top_labels` are the `top_k` highest-scoring labels (none for regression, whose scores are the values).
    """
    n = len(embeddings.track_ids)
    spec = probe.spec
    if spec.kind is TaskKind.REGRESSION:
        top = np.zeros((n, 0), dtype=np.int64)
    else:
        top = np.argsort(-scores, axis=1, kind="stable")[:, : min(top_k, scores.shape[1])]
    names = np.asarray(spec.label_names, dtype=object)
    stamp = predicted_at or datetime.now(UTC)
    ts = PREDICTIONS.schema.field("predicted_at").type
    columns = {
        "probe_id": pa.array([probe.probe_id] * n, pa.string()),
        "task": pa.array([spec.task] * n, pa.string()),
        "kind": pa.array([str(spec.kind)] * n, pa.string()),
        "model": pa.array([spec.model] * n, pa.string()),
        "layer": pa.array([spec.layer] * n, pa.string()),
        "track_id": pa.array(embeddings.track_ids.tolist(), pa.string()),
        "scores": _vectors(scores),
        "top_labels": pa.array(names[top].tolist(), pa.list_(pa.string())),
        "top_scores": _vectors(np.take_along_axis(scores, top, axis=1)),
        "split": pa.array([split] * n, pa.string()),
        "embedded_at": pa.array(embeddings.embedded_at.astype("datetime64[us]"), ts),
        "predicted_at": pa.array([stamp] * n, ts),
    }
    return pa.Table.from_pydict(columns, schema=PREDICTIONS.schema)
