"""Stage results -> Arrow rows in the table schemas, identical for every runner."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from catalog_embed.schemas.records import TrackEmbedding, TrackFailure
from catalog_embed.schemas.tables import EMBEDDINGS, EXTRA_LAYER_PREFIX, FAILURES, WINDOWS


@dataclass(frozen=True)
class RowContext:
    """What every row of one run shares."""

    run_id: str
    model: str
    layers: tuple[str, ...]
    model_version: str
    feature_hash: str


def embedding_rows(results: list[TrackEmbedding], ctx: RowContext) -> pa.Table:
    """One `embeddings` row per track; extra layers in `embedding_<layer>` columns."""
    now = datetime.now(UTC)
    primary = ctx.layers[0]
    n = len(results)
    columns = {
        "model": pa.array([ctx.model] * n, pa.string()),
        "track_id": pa.array([r.item.track_id for r in results], pa.string()),
        "layer": pa.array([primary] * n, pa.string()),
        "dim": pa.array([len(r.pooled[primary]) for r in results], pa.int32()),
        "embedding": _vectors([r.pooled[primary] for r in results]),
        "n_windows": pa.array([r.n_windows for r in results], pa.int32()),
        "duration_s": pa.array([r.duration_s for r in results], pa.float64()),
        "source_uri": pa.array([r.item.uri for r in results], pa.string()),
        "source_fingerprint": pa.array([r.item.fingerprint for r in results], pa.string()),
        "model_version": pa.array([ctx.model_version] * n, pa.string()),
        "feature_hash": pa.array([ctx.feature_hash] * n, pa.string()),
        "run_id": pa.array([ctx.run_id] * n, pa.string()),
        "embedded_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        "deleted": pa.array([False] * n, pa.bool_()),
    }
    table = pa.table(columns, schema=EMBEDDINGS.schema)
    for layer in ctx.layers[1:]:
        table = table.append_column(
            pa.field(EXTRA_LAYER_PREFIX + layer, pa.list_(pa.float32())), _vectors([r.pooled[layer] for r in results])
        )
    return table


def window_rows(results: list[TrackEmbedding], ctx: RowContext) -> pa.Table:
    """One `windows` row per track holding its timeline of the first layer."""
    n = len(results)
    timelines = [r.timeline if r.timeline is not None else np.zeros((0, 0), np.float32) for r in results]
    return pa.table(
        {
            "model": pa.array([ctx.model] * n, pa.string()),
            "track_id": pa.array([r.item.track_id for r in results], pa.string()),
            "layer": pa.array([ctx.layers[0]] * n, pa.string()),
            "start_s": pa.array([list(r.starts) for r in results], pa.list_(pa.float64())),
            "embedding": pa.ListArray.from_arrays(
                pa.array(_offsets([len(t) for t in timelines])), _vectors([w for t in timelines for w in t])
            ),
            "run_id": pa.array([ctx.run_id] * n, pa.string()),
        },
        schema=WINDOWS.schema,
    )


def failure_rows(failures: list[TrackFailure], ctx: RowContext) -> pa.Table:
    """One `failures` row per failed track."""
    now = datetime.now(UTC)
    n = len(failures)
    return pa.table(
        {
            "model": pa.array([ctx.model] * n, pa.string()),
            "track_id": pa.array([f.item.track_id for f in failures], pa.string()),
            "source_uri": pa.array([f.item.uri for f in failures], pa.string()),
            "source_fingerprint": pa.array([f.item.fingerprint for f in failures], pa.string()),
            "stage": pa.array([f.stage for f in failures], pa.string()),
            "error_type": pa.array([f.error_type for f in failures], pa.string()),
            "message": pa.array([f.message for f in failures], pa.string()),
            "run_id": pa.array([ctx.run_id] * n, pa.string()),
            "failed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        },
        schema=FAILURES.schema,
    )


def _vectors(vectors: list[np.ndarray]) -> pa.Array:
    """float32 vectors -> list<float32> without a Python-level loop over values."""
    if not vectors:
        return pa.array([], pa.list_(pa.float32()))
    values = np.concatenate([np.asarray(v, np.float32).ravel() for v in vectors])
    return pa.ListArray.from_arrays(pa.array(_offsets([len(v) for v in vectors])), pa.array(values))


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
