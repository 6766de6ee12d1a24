"""The predictions table (`schemas.tables.PREDICTIONS`): building rows, and tagging a whole embeddings table.

Tagging is incremental: tracks whose current embedding the same probe already scored are skipped, every batch is
upserted by (probe_id, model, track_id) in its own commit, so an interrupted run resumes where it stopped and a
re-embedded track (newer `embedded_at`) is scored again. The probe's rows for tracks no longer live in the
embeddings table (deleted since) are removed at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from schemas.errors import TableError
from schemas.store import arrow_dataset
from schemas.tables import PREDICTIONS
from workers.probes.data import Embeddings, EmbeddingsSource
from workers.probes.models import Probe
from workers.probes.tasks import TaskKind

_MERGE_PREDICATE = " AND ".join(f"t.{k} = s.{k}" for k in PREDICTIONS.key)


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


def write_predictions(uri: str, table: pa.Table) -> None:
    """Replace the Delta table at `uri` with `table` (a probe job's test-split predictions)."""
    write_deltalake(uri, table, mode="overwrite", partition_by=list(PREDICTIONS.partition_by))


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


def tag(probe: Probe, source: EmbeddingsSource, out_uri: str, batch_rows: int = 65536, top_k: int = 3) -> TagSummary:
    """Score every live embedding of `source` with `probe` and upsert the rows into the predictions table.

    Raises:
        TableError: `out_uri` holds a table that is not a predictions table.
    """
    started = time.perf_counter()
    done = _tagged(out_uri, probe)
    embedded = already = tagged = commits = 0
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
        _upsert(out_uri, rows)
        tagged += rows.num_rows
        commits += 1
    gone = sorted(set(done) - live)
    if gone:
        _delete(out_uri, probe, gone)
        commits += 1
    return TagSummary(probe.probe_id, embedded, already, tagged, len(gone), commits, time.perf_counter() - started)


def _tagged(out_uri: str, probe: Probe) -> dict[str, np.datetime64]:
    """track_id -> embedded_at of the rows this probe already wrote for its model."""
    if not DeltaTable.is_deltatable(out_uri):
        return {}
    table = DeltaTable(out_uri)
    schema = pa.schema(table.schema())
    if set(schema.names) != set(PREDICTIONS.schema.names):
        msg = f"{out_uri!r} is not a predictions table (columns {schema.names}): pass another --out"
        raise TableError(msg)
    rows = arrow_dataset(table).to_table(
        columns=["track_id", "embedded_at"],
        filter=(pc.field("probe_id") == probe.probe_id) & (pc.field("model") == probe.spec.model),
    )
    stamps = rows.column("embedded_at").to_numpy(zero_copy_only=False).astype("datetime64[us]")
    return dict(zip(rows.column("track_id").to_pylist(), stamps, strict=True))


def _sql(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _delete(out_uri: str, probe: Probe, track_ids: list[str]) -> None:
    listed = ", ".join(_sql(t) for t in track_ids)
    predicate = f"probe_id = {_sql(probe.probe_id)} AND model = {_sql(probe.spec.model)} AND track_id IN ({listed})"
    DeltaTable(out_uri).delete(predicate)


def _upsert(out_uri: str, rows: pa.Table) -> None:
    if not DeltaTable.is_deltatable(out_uri):
        write_deltalake(out_uri, rows, mode="append", partition_by=list(PREDICTIONS.partition_by))
        return
    (
        DeltaTable(out_uri)
        .merge(rows, predicate=_MERGE_PREDICATE, source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )
