"""The ANN index beside tables on S3 (moto's server): built, used by `similar`, refreshed after a new run."""

from __future__ import annotations

import numpy as np

from catalog_embed.pipelines.analysts.index import AnnIndex, index_folder
from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.tables import EMBEDDINGS
from tests.helpers.tables import commit, ids, mixture
from tests.objectstore.conftest import BUCKET


def test_index_on_s3_is_built_used_and_refreshed(s3_catalog, capsys, tmp_path):
    out = f"s3://{BUCKET}/tables-analysts"
    options = ["--storage-option", f"AWS_ENDPOINT_URL={s3_catalog.endpoint}", "--storage-option", "AWS_ALLOW_HTTP=true"]
    store = TableStore(out, {"AWS_ENDPOINT_URL": s3_catalog.endpoint, "AWS_ALLOW_HTTP": "true"})
    store.ensure_tables()
    commit(store, "s1", "m", dict(zip(ids(60), mixture(60, 8, 0), strict=True)))
    assert main(["index", "--out", out, "--model", "m", *options]) == 0
    written = tmp_path / "n.parquet"
    assert main(["similar", "--out", out, "--model", "m", "--track", "t0001", "--search", "index", "--recall",
                 "--output", str(written), *options]) == 0
    assert "recall@10" in capsys.readouterr().err and written.exists()
    commit(store, "s2", "m", {"n0001": np.ones(8, np.float32)}, gone=["t0002"])
    assert main(["index", "--out", out, "--model", "m", *options]) == 0
    assert "added 1, replaced 0, removed 1" in capsys.readouterr().err
    folder = index_folder(store, "m", "pooled")
    meta = AnnIndex.load_meta(store, folder)
    assert meta["count"] == 60 and meta["table_version"] == store.table(EMBEDDINGS).version()
    assert s3_catalog.fs.exists(f"{folder}/{meta['graph']}")


