"""The probe jobs' table reading and writing: embeddings of one model and layer, labels, predictions."""

from __future__ import annotations

import numpy as np
import pytest

from catalog_embed.pipelines.probes.tables import EmbeddingsSource, predictions_table, read_labels, tagged
from catalog_embed.schemas.errors import ConfigError, TableError
from tests.helpers.probe_fixtures import embeddings_rows, latent, write_embeddings


def test_deleted_rows_are_ignored(tmp_path):
    n = 40
    uri = write_embeddings(tmp_path / "embeddings", embeddings_rows(latent(n), deleted=5))
    embeddings = EmbeddingsSource(uri).read()
    assert len(embeddings.track_ids) == n - 5
    assert embeddings.vectors.shape == (n - 5, 32)
    assert embeddings.vectors.dtype == np.float32
    assert f"t{n - 1:05d}" not in set(embeddings.track_ids)


def test_several_models_need_model(tmp_path):
    z = latent(20)
    uri = write_embeddings(tmp_path / "e", embeddings_rows(z, model="a"), embeddings_rows(z, model="b", dim=8))
    with pytest.raises(ConfigError, match=r"several models \(a, b\): pass --model"):
        EmbeddingsSource(uri)
    assert EmbeddingsSource(uri, "b").read().vectors.shape == (20, 8)
    with pytest.raises(ConfigError, match="model 'c' has no live rows"):
        EmbeddingsSource(uri, "c")


def test_numeric_track_ids_in_csv_stay_strings(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("track_id,genre\n00042,rock\n")
    assert read_labels(str(path))["track_id"].to_pylist() == ["00042"]


def test_the_out_folder_of_embed_is_read_like_its_embeddings_table(tmp_path):
    uri = write_embeddings(tmp_path / "embeddings", embeddings_rows(latent(20), dim=8))
    assert EmbeddingsSource(str(tmp_path)).uri == uri
    with pytest.raises(TableError, match="no Delta table at"):
        EmbeddingsSource(str(tmp_path / "nothing"))


def test_a_table_that_is_not_a_predictions_table_is_refused(tmp_path):
    uri = write_embeddings(tmp_path / "embeddings", embeddings_rows(latent(20), dim=8))
    store, spec = predictions_table(uri)
    with pytest.raises(TableError, match="lacks column.*probe_id"):
        tagged(store, spec, "p1", "toy")
