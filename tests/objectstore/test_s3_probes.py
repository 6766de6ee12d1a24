"""Probes on tables in S3 (moto's server), reached only through `--storage-option`, as `embed` reaches them."""

from __future__ import annotations

import pyarrow.csv as pacsv

from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.tables import PREDICTIONS
from tests.helpers.probe_fixtures import embeddings_rows, labels_for, latent
from tests.helpers.tables import commit
from tests.objectstore.conftest import BUCKET


def test_probe_tag_and_query_reach_s3_through_storage_options(s3_catalog, monkeypatch, tmp_path, capsys):
    options = {"AWS_ENDPOINT_URL": s3_catalog.endpoint, "AWS_ALLOW_HTTP": "true"}
    out = f"s3://{BUCKET}/tables-probes"
    z = latent(120)
    rows = embeddings_rows(z, dim=8)
    store = TableStore(out, options)
    store.ensure_tables()
    vectors = rows["embedding"].to_numpy(zero_copy_only=False)
    commit(store, "r1", "toy", dict(zip(rows["track_id"].to_pylist(), vectors, strict=True)))
    pacsv.write_csv(labels_for("multiclass", z), tmp_path / "labels.csv")
    # Only the flags point at the emulator: without them the commands would go to AWS.
    for name in options:
        monkeypatch.delenv(name)
    flags = [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]
    probe = tmp_path / "probe"
    assert main(["probe", "--embeddings", out, "--labels", str(tmp_path / "labels.csv"), "--task", "genre",
                 "--kind", "multiclass", "--out", str(probe), "--max-epochs", "2", *flags]) == 0
    predictions = f"s3://{BUCKET}/predictions"
    assert main(["tag", "--probe", str(probe), "--embeddings", out, "--out", predictions, *flags]) == 0
    assert main(["tag", "--probe", str(probe), "--embeddings", out, "--out", predictions, *flags]) == 0
    assert "120 already tagged, 0 tagged" in capsys.readouterr().err
    assert TableStore(f"s3://{BUCKET}", options).read(PREDICTIONS, ["track_id"]).num_rows == 120
    assert main(["query", "--out", out, "--json", "SELECT count(*) AS n FROM embeddings", *flags]) == 0
    assert '"n": 120' in capsys.readouterr().out
