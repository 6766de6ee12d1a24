"""Catalog manifests: formats, URIs, validation before any audio is read, fingerprints."""

from __future__ import annotations

import json
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.errors import ManifestError
from schemas.manifest import MISSING_FINGERPRINT, fingerprint_from_info, fingerprints, read_catalog


@pytest.fixture
def audio_dir(tmp_path):
    (tmp_path / "rock").mkdir()
    for name in ("rock/a.mp3", "rock/b.flac", "c.wav", "notes.txt"):
        (tmp_path / name).write_bytes(b"x" * 10)
    return tmp_path


def test_csv_parquet_jsonl_manifests_resolve_relative_uris_and_keep_extra_columns(tmp_path):
    rows = [{"track_id": "007", "uri": "audio/a.mp3", "artist": "x"}, {"track_id": "8", "uri": "/abs/b.flac", "artist": "y"}]
    (tmp_path / "m.csv").write_text("track_id,uri,artist\n007,audio/a.mp3,x\n8,/abs/b.flac,y\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("m.csv", "m.parquet", "m.jsonl"):
        table = read_catalog(str(tmp_path / name))
        assert table["track_id"].to_pylist() == ["007", "8"], name  # ids stay strings: "007" is not 7
        assert table["uri"].to_pylist() == [str(tmp_path / "audio/a.mp3"), "/abs/b.flac"], name
        assert table["artist"].to_pylist() == ["x", "y"], name


def test_directory_and_glob_catalogs_take_ids_from_relative_paths(audio_dir):
    table = read_catalog(str(audio_dir))
    assert table["track_id"].to_pylist() == ["c.wav", "rock/a.mp3", "rock/b.flac"]
    assert table["uri"].to_pylist()[0] == str(audio_dir / "c.wav")
    globbed = read_catalog(f"{audio_dir}/rock/*.mp3")
    assert globbed["track_id"].to_pylist() == ["a.mp3"]
    assert read_catalog(f"file://{audio_dir}")["track_id"].to_pylist() == ["c.wav", "rock/a.mp3", "rock/b.flac"]


def test_memory_filesystem_manifest_and_listing():
    fs = fsspec.filesystem("memory")
    fs.pipe("/cat/audio/x.ogg", b"1234")
    fs.pipe("/cat/manifest.csv", b"track_id,uri\nx,audio/x.ogg\n")
    table = read_catalog("memory://cat/manifest.csv")
    assert table["uri"].to_pylist() == ["memory://cat/audio/x.ogg"]
    listed = read_catalog("memory://cat/audio")
    assert listed["track_id"].to_pylist() == ["x.ogg"]
    assert fingerprints(listed["uri"].to_pylist())[0].startswith("size=4")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("track_id,path\n1,a.mp3\n", "missing column(s) uri"),
        ("track_id,uri\n", "no rows"),
        ("track_id,uri\n1,a.mp3\n,b.mp3\n3,\n", "row(s) 1, 2"),
        ("track_id,uri\n1,a.mp3\n2,b.mp3\n1,c.mp3\n", "'1' (rows 0 and 2)"),
    ],
)
def test_bad_manifests_fail_naming_the_problem(tmp_path, content, needle):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(ManifestError) as err:
        read_catalog(str(path))
    assert needle in str(err.value)


def test_unreadable_or_missing_catalogs_fail_clearly(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_catalog(str(tmp_path / "nope.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="cannot parse"):
        read_catalog(str(tmp_path / "bad.parquet"))
    with pytest.raises(ManifestError, match="neither a manifest"):
        read_catalog(str(tmp_path / "file.xyz"))


def test_fingerprints_change_with_content_and_mark_missing_files(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(b"abc")
    first = fingerprints([str(path), str(tmp_path / "gone.wav")])
    assert first[1] == MISSING_FINGERPRINT
    path.write_bytes(b"abcd")
    os.utime(path, ns=(1, 2_000_000_000))
    assert fingerprints([str(path)])[0] != first[0]


def test_fingerprint_prefers_object_generation_or_etag():
    assert fingerprint_from_info({"size": 3, "generation": "17", "mtime": 5}) == "size=3;generation=17"
    assert fingerprint_from_info({"size": 3, "ETag": '"abc"'}) == "size=3;etag=abc"
