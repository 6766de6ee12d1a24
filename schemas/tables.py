"""Arrow schemas of every table this project writes, with their keys and partitioning.

Schemas are explicit, never inferred. Each Delta table carries `SCHEMA_VERSION` in its metadata; bump it when a
schema changes incompatibly. Readers need none of our code: these are plain Delta tables of Parquet files.

Embedding columns are `list<float32>`: one table holds several models whose dims differ (musicnn 200, MULE 1728),
which a single `fixed_size_list` column cannot. `dim` says the length; DuckDB users cast with
`embedding::FLOAT[200]` to use the array functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1

_TS = pa.timestamp("us", tz="UTC")
_VECTOR = pa.list_(pa.float32())


@dataclass(frozen=True)
class TableSpec:
    """A table's name (its folder under the output root), schema, merge key and partition columns."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    partition_by: tuple[str, ...] = ()


EMBEDDINGS = TableSpec(
    name="embeddings",
    schema=pa.schema(
        [
            pa.field("model", pa.string(), nullable=False),
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("layer", pa.string(), nullable=False),
            pa.field("dim", pa.int32(), nullable=False),
            pa.field("embedding", _VECTOR, nullable=False),
            pa.field("n_windows", pa.int32(), nullable=False),
            pa.field("duration_s", pa.float64(), nullable=False),
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("source_fingerprint", pa.string(), nullable=False),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("feature_hash", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("embedded_at", _TS, nullable=False),
            pa.field("deleted", pa.bool_(), nullable=False),
        ]
    ),
    key=("model", "track_id"),
    partition_by=("model",),
)

# Extra layers asked for with `--layer a,b` land in nullable columns `embedding_<layer>` added by schema evolution.
EXTRA_LAYER_PREFIX = "embedding_"

# One row per track holding its whole timeline, so re-embedding a track replaces its windows atomically (a track
# that got shorter leaves no stale windows behind). Analysts UNNEST `start_s` and `embedding` together.
WINDOWS = TableSpec(
    name="windows",
    schema=pa.schema(
        [
            pa.field("model", pa.string(), nullable=False),
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("layer", pa.string(), nullable=False),
            pa.field("start_s", pa.list_(pa.float64()), nullable=False),
            pa.field("embedding", pa.list_(_VECTOR), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
        ]
    ),
    key=("model", "track_id"),
    partition_by=("model",),
)

FAILURES = TableSpec(
    name="failures",
    schema=pa.schema(
        [
            pa.field("model", pa.string(), nullable=False),
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("source_fingerprint", pa.string(), nullable=False),
            pa.field("stage", pa.string(), nullable=False),
            pa.field("error_type", pa.string(), nullable=False),
            pa.field("message", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("failed_at", _TS, nullable=False),
        ]
    ),
    key=("model", "track_id"),
)

RUNS = TableSpec(
    name="runs",
    schema=pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("runner", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("licence_code", pa.string(), nullable=False),
            pa.field("licence_weights", pa.string(), nullable=False),
            pa.field("feature_hash", pa.string(), nullable=False),
            pa.field("config_json", pa.string(), nullable=False),
            pa.field("code_version", pa.string(), nullable=False),
            pa.field("started_at", _TS, nullable=False),
            pa.field("finished_at", _TS, nullable=False),
            pa.field("n_catalog", pa.int64(), nullable=False),
            pa.field("n_planned", pa.int64(), nullable=False),
            pa.field("n_skipped", pa.int64(), nullable=False),
            pa.field("n_embedded", pa.int64(), nullable=False),
            pa.field("n_failed", pa.int64(), nullable=False),
            pa.field("n_deleted", pa.int64(), nullable=False),
            pa.field("audio_seconds", pa.float64(), nullable=False),
            pa.field("wall_seconds", pa.float64(), nullable=False),
            pa.field("compute_s_per_audio_hour", pa.float64(), nullable=True),
            pa.field("stage_seconds_json", pa.string(), nullable=False),
        ]
    ),
    key=("run_id",),
)

# The tables an embed run writes under its output root.
TABLES = {spec.name: spec for spec in (EMBEDDINGS, WINDOWS, FAILURES, RUNS)}

# One row per (probe, model, track): a trained probe's outputs on one embedding. `scores` follow the probe's label
# order (its probe.json names them): sigmoid scores (multilabel), class probabilities (multiclass, key) or
# predicted values (regression). `embedded_at` is that of the embedding scored, so re-embedded tracks are re-tagged.
PREDICTIONS = TableSpec(
    name="predictions",
    schema=pa.schema(
        [
            pa.field("probe_id", pa.string(), nullable=False),
            pa.field("task", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("layer", pa.string(), nullable=False),
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("scores", _VECTOR, nullable=False),
            pa.field("top_labels", pa.list_(pa.string()), nullable=False),
            pa.field("top_scores", _VECTOR, nullable=False),
            pa.field("split", pa.string(), nullable=True),
            pa.field("embedded_at", _TS, nullable=False),
            pa.field("predicted_at", _TS, nullable=False),
        ]
    ),
    key=("probe_id", "model", "track_id"),
    partition_by=("probe_id",),
)
