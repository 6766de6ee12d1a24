"""Tables written through the real TableStore for tests: a runs row, and a run of known vectors committed."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from catalog_embed.pipelines.embed.lifecycle.commit import commit_run
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import TrackEmbedding, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, RUNS
from catalog_embed.workers.rows import RowContext, embedding_rows


def run_row(run_id: str) -> pa.Table:
    """A `runs` row for `run_id` with placeholder values in every other column."""
    now = datetime.now(UTC)
    values = {
        f.name: now if pa.types.is_timestamp(f.type) else 0 if pa.types.is_integer(f.type)
        else 0.0 if pa.types.is_floating(f.type) else "x"
        for f in RUNS.schema
    }
    return pa.Table.from_pylist([values | {"run_id": run_id}], schema=RUNS.schema)


def mixture(n: int, dim: int, seed: int) -> np.ndarray:
    """Clustered vectors: 20 centres, noise about half their spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    return (centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def commit(store: TableStore, run_id: str, model: str, vectors: dict[str, np.ndarray], gone: list[str] = (),
           version: str = "v1") -> None:
    """Commit `vectors` (track id -> vector) as one run of `model` at model version `version`, retiring `gone`."""
    ctx = RowContext(run_id, model, ("pooled",), version, "h1")
    rows = [TrackEmbedding(WorkItem(t, f"/audio/{t}.wav", "size=1"), 6.0, 2, {"pooled": v}) for t, v in vectors.items()]
    if rows:
        store.write_part(run_id, EMBEDDINGS, "000000", embedding_rows(rows, ctx))
    keys = pa.table({"model": [model] * len(gone), "track_id": list(gone)},
                    schema=pa.schema([("model", pa.string()), ("track_id", pa.string())]))
    commit_run(store, run_id, run_row(run_id), gone=keys)


def ids(n: int, prefix: str = "t") -> list[str]:
    """`n` track ids, sorted as they are numbered."""
    return [f"{prefix}{i:04d}" for i in range(n)]
