"""Generated embeddings and labels tables for probe tests: labels are learnable functions of the embeddings."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake

from catalog_embed.schemas.tables import EMBEDDINGS
from catalog_embed.workers.probes.tasks import KEY_CLASSES

# Enharmonic spellings the key labels use now and then: the probe must treat them as the same class.
_ENHARMONIC = {"C#": "Db", "Eb": "D#", "F#": "Gb", "Ab": "G#", "Bb": "A#"}


def latent(n: int, seed: int = 0, k: int = 8) -> np.ndarray:
    """The hidden factors that both the embeddings and the labels derive from."""
    return np.random.default_rng(seed).normal(size=(n, k))


def embeddings_rows(
    z: np.ndarray, model: str = "toy", dim: int = 32, seed: int = 0, deleted: int = 0, layer: str = "pool"
) -> pa.Table:
    """EMBEDDINGS rows whose vectors are a noisy linear map of `z`; the last `deleted` rows are tombstones."""
    rng = np.random.default_rng(seed + 1)
    mixing = rng.normal(size=(z.shape[1], dim))
    vectors = (z @ mixing + 0.3 * rng.normal(size=(len(z), dim))).astype(np.float32)
    n = len(z)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    columns = {
        "model": [model] * n,
        "track_id": [f"t{i:05d}" for i in range(n)],
        "layer": [layer] * n,
        "dim": [dim] * n,
        "embedding": list(vectors),
        "n_windows": [4] * n,
        "duration_s": [12.0] * n,
        "source_uri": [f"file:///audio/t{i:05d}.flac" for i in range(n)],
        "source_fingerprint": ["fp"] * n,
        "model_version": ["v1"] * n,
        "feature_hash": ["fh"] * n,
        "run_id": ["run-1"] * n,
        "embedded_at": [now] * n,
        "deleted": [i >= n - deleted for i in range(n)],
    }
    return pa.Table.from_pydict(columns, schema=EMBEDDINGS.schema)


def write_embeddings(path: Path, *tables: pa.Table) -> str:
    """Write the rows as a Delta table partitioned like the real one; returns its URI."""
    for table in tables:
        write_deltalake(str(path), table, mode="append", partition_by=list(EMBEDDINGS.partition_by))
    return str(path)


def labels_for(kind: str, z: np.ndarray, seed: int = 0) -> pa.Table:
    """A labels table for the first `len(z)` tracks whose labels depend on `z`."""
    rng = np.random.default_rng(seed + 2)
    ids = [f"t{i:05d}" for i in range(len(z))]
    if kind == "multiclass":
        classes = np.array(["blues", "jazz", "rock", "pop"])
        return pa.table({"track_id": ids, "genre": classes[(z @ rng.normal(size=(z.shape[1], 4))).argmax(1)]})
    if kind == "key":
        keys = np.array(KEY_CLASSES)[(z @ rng.normal(size=(z.shape[1], 24))).argmax(1)]
        spelled = [
            f"{_ENHARMONIC.get(k.split()[0], k.split()[0])} {k.split()[1]}" if i % 3 == 0 else k
            for i, k in enumerate(keys)
        ]
        return pa.table({"track_id": ids, "key": spelled})
    if kind == "regression":
        weights = rng.normal(size=(z.shape[1], 2))
        values = z @ weights + 0.1 * rng.normal(size=(len(z), 2))
        return pa.table({"track_id": ids, "arousal": values[:, 0], "valence": values[:, 1]})
    if kind == "multilabel":
        logits = z @ rng.normal(size=(z.shape[1], 5))
        tags = np.array(["guitar", "piano", "vocal", "drums", "synth"])
        on = logits > 0.5
        return pa.table({"track_id": ids, "tags": [list(tags[row]) for row in on]})
    msg = f"unknown kind {kind}"
    raise ValueError(msg)
