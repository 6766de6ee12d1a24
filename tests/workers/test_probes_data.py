"""Probe data: reading labels in every format, joining with live embeddings, splitting, and bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake

from catalog_embed.pipelines.probes.tables import EmbeddingsSource, read_labels
from catalog_embed.schemas.errors import LabelsError
from catalog_embed.workers.probes.data import LabelSpec, build_dataset, encode_targets
from catalog_embed.workers.probes.tasks import KEY_CLASSES, TaskKind
from tests.helpers.probe_fixtures import embeddings_rows, labels_for, latent, write_embeddings

N = 300


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    z = latent(N)
    uri = write_embeddings(tmp_path_factory.mktemp("emb") / "embeddings", embeddings_rows(z, deleted=5))
    return z, uri


def _dataset(uri, labels, spec, model=None):
    source = EmbeddingsSource(uri, model)
    return build_dataset(source.read(), labels, spec, source.model, source.layer)


def test_multilabel_formats_read_alike(tmp_path, table):
    z, uri = table
    tags = labels_for("multilabel", z)
    pq.write_table(tags, tmp_path / "list.parquet")
    joined = pa.table({"track_id": tags["track_id"], "tags": ["|".join(t) for t in tags["tags"].to_pylist()]})
    pacsv.write_csv(joined, tmp_path / "sep.csv")
    names = sorted({t for row in tags["tags"].to_pylist() for t in row})
    wide = {"track_id": tags["track_id"], **{n: [n in row for row in tags["tags"].to_pylist()] for n in names}}
    write_deltalake(str(tmp_path / "wide"), pa.table(wide))
    spec = LabelSpec(TaskKind.MULTILABEL)
    a = _dataset(uri, read_labels(str(tmp_path / "list.parquet")), spec)
    b = _dataset(uri, read_labels(str(tmp_path / "sep.csv")), LabelSpec(TaskKind.MULTILABEL, label_sep="|"))
    c = _dataset(uri, read_labels(str(tmp_path / "wide")), spec)
    assert a.label_names == b.label_names == c.label_names == tuple(names)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(a.splits[split].y, b.splits[split].y)
        np.testing.assert_array_equal(a.splits[split].y, c.splits[split].y)
        np.testing.assert_array_equal(a.splits[split].track_ids, c.splits[split].track_ids)


def test_grouped_split_keeps_artists_apart(table):
    z, uri = table
    labels = labels_for("multiclass", z).append_column("artist", pa.array([f"a{i % 40}" for i in range(N)]))
    data = _dataset(uri, labels, LabelSpec(TaskKind.MULTICLASS, seed=3))
    artist_of = {f"t{i:05d}": f"a{i % 40}" for i in range(N)}
    seen = [{artist_of[t] for t in data.splits[s].track_ids} for s in ("train", "valid", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert "grouped by 'artist'" in data.info["split"]


def test_stratified_split_is_seeded_and_trains_every_class(table):
    z, uri = table
    labels = labels_for("key", z)
    first = _dataset(uri, labels, LabelSpec(TaskKind.KEY, seed=1))
    again = _dataset(uri, labels, LabelSpec(TaskKind.KEY, seed=1))
    other = _dataset(uri, labels, LabelSpec(TaskKind.KEY, seed=2))
    np.testing.assert_array_equal(first.splits["test"].track_ids, again.splits["test"].track_ids)
    assert set(first.splits["test"].track_ids) != set(other.splits["test"].track_ids)
    assert set(np.unique(first.splits["train"].y)) >= set(np.unique(first.splits["test"].y))
    assert first.label_names == KEY_CLASSES
    assert sum(first.info[f"n_{s}"] for s in ("train", "valid", "test")) == N - 5


def test_enharmonic_keys_share_a_class():
    labels = pa.table({"track_id": ["t00000", "t00001"], "key": ["C# minor", "Db minor"]})
    y = encode_targets(labels, LabelSpec(TaskKind.KEY)).y
    assert y[0] == y[1] == KEY_CLASSES.index("C# minor")


def test_split_column_aliases(table):
    z, uri = table
    names = np.array(["training", "validation", "test"])[np.arange(N) % 3]
    labels = labels_for("regression", z).append_column("split", pa.array(names))
    data = _dataset(uri, labels, LabelSpec(TaskKind.REGRESSION))
    assert data.info["split"] == "column 'split'"
    assert data.label_names == ("arousal", "valence")
    assert data.splits["valid"].y.shape[1] == 2


def test_labels_matching_no_track_fail(table):
    _, uri = table
    labels = pa.table({"track_id": ["x1", "x2"], "genre": ["a", "b"]})
    with pytest.raises(LabelsError, match="none of the 2 labelled track ids matches.*must use the catalog's ids"):
        _dataset(uri, labels, LabelSpec(TaskKind.MULTICLASS))


@pytest.mark.parametrize(
    ("kind", "column", "message"),
    [
        ("multiclass", pa.array(np.linspace(0, 1, N)), "type double.*use --kind regression"),
        ("multilabel", pa.array(["rock"] * N), "type string.*pass --label-sep"),
        ("regression", pa.array(["1.5"] * N), "type string.*needs numbers"),
        ("key", pa.array(["C major", "X"] * (N // 2)), r"not '<tonic> major\|minor' keys: \['X'\]"),
    ],
)
def test_wrong_label_types_fail(table, kind, column, message):
    _, uri = table
    labels = pa.table({"track_id": [f"t{i:05d}" for i in range(N)], "label": column})
    with pytest.raises(LabelsError, match=message):
        _dataset(uri, labels, LabelSpec(TaskKind(kind)))


def test_class_missing_from_training_fails(table):
    z, uri = table
    labels = labels_for("multiclass", z)
    genre = labels["genre"].to_pylist()
    split = np.array(["train", "valid", "test"])[np.arange(N) % 3].astype(object)
    genre[2] = "polka"  # a test-split track of a class nowhere else
    labels = pa.table({"track_id": labels["track_id"], "genre": genre, "split": split})
    with pytest.raises(LabelsError, match=r"class\(es\) \['polka'\].*Move some of their tracks to the train split"):
        _dataset(uri, labels, LabelSpec(TaskKind.MULTICLASS))


def test_labels_only_on_unembedded_tracks_are_left_out(table):
    z, uri = table
    tags = labels_for("multilabel", z).to_pylist()
    tags.append({"track_id": "not-embedded", "tags": ["theremin", "guitar"]})
    data = _dataset(uri, pa.Table.from_pylist(tags), LabelSpec(TaskKind.MULTILABEL))
    assert "theremin" not in data.label_names and data.info["labels_only_on_unembedded_tracks"] == ["theremin"]
    assert data.splits["train"].y.shape[1] == len(data.label_names)
    genres = labels_for("multiclass", z).to_pylist() + [{"track_id": "not-embedded", "genre": "polka"}]
    data = _dataset(uri, pa.Table.from_pylist(genres), LabelSpec(TaskKind.MULTICLASS))
    assert data.label_names == ("blues", "jazz", "pop", "rock")
    assert data.splits["train"].y.max() == 3


def test_empty_and_nan_label_cells_are_missing_not_classes(tmp_path, table):
    z, uri = table
    genre = labels_for("multiclass", z)["genre"].to_pylist()
    blank = {3: "", 10: "NaN", 17: "nan", 24: " "}
    rows = ["track_id,genre"] + [f"t{i:05d},{blank.get(i, g)}" for i, g in enumerate(genre)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    genres = [blank.get(i, g) for i, g in enumerate(genre)]
    parquet = pa.table({"track_id": [f"t{i:05d}" for i in range(N)], "genre": genres})
    for labels in (read_labels(str(tmp_path / "labels.csv")), parquet):
        data = _dataset(uri, labels, LabelSpec(TaskKind.MULTICLASS))
        assert data.label_names == ("blues", "jazz", "pop", "rock")
        assert data.info["rows_missing_label"] == len(blank)
        assert data.info["missing_by_column"] == {"genre": len(blank)}
        used = {t for s in data.splits.values() for t in s.track_ids}
        assert not used & {f"t{i:05d}" for i in blank}


def test_nan_regression_targets_are_missing_and_infinite_ones_named(table):
    z, uri = table
    labels = labels_for("regression", z)
    arousal = labels["arousal"].to_numpy().copy()
    arousal[[5, 6, 7]] = np.nan
    labels = labels.set_column(1, "arousal", pa.array(arousal))
    data = _dataset(uri, labels, LabelSpec(TaskKind.REGRESSION))
    assert data.info["missing_by_column"] == {"arousal": 3, "valence": 0}
    assert all(np.isfinite(s.y).all() for s in data.splits.values())
    arousal[9] = np.inf
    with pytest.raises(LabelsError, match=r"infinite for 1 track\(s\) \(e.g. \['t00009'\]\)"):
        _dataset(uri, labels.set_column(1, "arousal", pa.array(arousal)), LabelSpec(TaskKind.REGRESSION))


@pytest.mark.parametrize(
    ("kind", "column", "message"),
    [
        ("multiclass", ["rock"] * (N - 2) + ["", None], r"single class \('rock'\).*needs at least two classes"),
        ("key", ["C major"] * N, r"single class \('C major'\)"),
        ("multilabel", [["rock"]] * N, "no tag .* both applies to some and not to other"),
        ("regression", [1.0] * N, "constant"),
    ],
)
def test_a_task_without_two_classes_is_refused(table, kind, column, message):
    _, uri = table
    labels = pa.table({"track_id": [f"t{i:05d}" for i in range(N)], "label": column})
    with pytest.raises(LabelsError, match=message):
        _dataset(uri, labels, LabelSpec(TaskKind(kind)))
