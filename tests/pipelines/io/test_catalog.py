"""Catalog manifests: formats, URIs, validation before any audio is read, fingerprints."""

from __future__ import annotations

import json
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_embed.pipelines.io.catalog import UriPolicy, fingerprint_from_info, fingerprints, read_catalog
from catalog_embed.schemas.errors import ManifestError
from catalog_embed.schemas.records import MISSING_FINGERPRINT


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



@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"track_id": "a", "uri": {"path": "a.mp3"}}, "column uri holds struct<path: string> values"),
        ({"track_id": ["a"], "uri": "a.mp3"}, "column track_id holds list<item: string> values"),
    ],
)
def test_a_jsonl_manifest_with_nested_ids_or_uris_fails_naming_the_column(tmp_path, row, needle):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ManifestError) as err:
        read_catalog(str(path))
    assert needle in str(err.value) and "one string (or number) per row" in str(err.value)

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


def test_local_fingerprints_in_bulk_are_what_fsspec_info_tells_per_file(linked_catalog):
    """Local files are stat-ed without a filesystem object each; symlinks count as their targets."""
    uris = [str(linked_catalog / name) for name in ("a.mp3", "sub/b.mp3", "inside.mp3", "escape.mp3", "sub")]
    uris += [str(linked_catalog / "linked_dir" / "c.mp3"), f"file://{linked_catalog / 'a.mp3'}"]
    fs = fsspec.filesystem("file")
    expected = [fingerprint_from_info(fs.info(uri)) for uri in uris]
    assert fingerprints([*uris, str(linked_catalog / "gone.mp3")]) == [*expected, MISSING_FINGERPRINT]


def test_a_memory_filesystem_is_listed_once_per_folder(monkeypatch):
    fs = fsspec.filesystem("memory")
    for name in ("a.ogg", "b.ogg", "sub/c.ogg"):
        fs.pipe(f"/bulk/{name}", name.encode())
    uris = ["memory://bulk/a.ogg", "memory://bulk/sub/c.ogg", "memory://bulk/b.ogg", "memory://bulk/gone.ogg"]
    listed, original = [], type(fs).ls
    monkeypatch.setattr(type(fs), "ls", lambda self, path, **kw: listed.append(path) or original(self, path, **kw))
    monkeypatch.setattr(type(fs), "info", lambda *_, **__: pytest.fail("a fingerprint asked info() of one file"))
    prints = fingerprints(uris)
    # The memory filesystem's `info()` dates `created` as a datetime and its listing as a timestamp, so only the
    # sizes are compared here (it holds nothing across processes); S3 and GCS list what `info()` tells.
    assert [p.split(";")[0] for p in prints] == ["size=5", "size=9", "size=5", MISSING_FINGERPRINT]
    assert sorted(listed) == ["/bulk", "/bulk/sub"]


def test_relative_uris_are_normalised_and_absolute_ones_kept(tmp_path):
    (tmp_path / "m.csv").write_text("track_id,uri\n1,audio/./a.mp3\n2,audio//b.mp3\n3,./c.mp3\n4,d/\n5,/x//y.mp3\n")
    table = read_catalog(str(tmp_path / "m.csv"), UriPolicy(allow_prefixes=("/x",)))
    assert table["uri"].to_pylist() == [
        str(tmp_path / "audio/a.mp3"), str(tmp_path / "audio/b.mp3"), str(tmp_path / "c.mp3"), str(tmp_path / "d"),
        "/x//y.mp3",
    ]  # fmt: skip
    assert table["refused"].to_pylist() == [None] * 5


def test_fingerprint_prefers_object_generation_or_etag():
    assert fingerprint_from_info({"size": 3, "generation": "17", "mtime": 5}) == "size=3;generation=17"
    assert fingerprint_from_info({"size": 3, "ETag": '"abc"'}) == "size=3;etag=abc"


@pytest.fixture
def linked_catalog(tmp_path):
    """A catalog folder with symlinks that stay inside it and symlinks that point outside."""
    catalog, outside = tmp_path / "catalog", tmp_path / "outside"
    (catalog / "sub").mkdir(parents=True)
    (outside / "deep").mkdir(parents=True)
    for path in (catalog / "a.mp3", catalog / "sub" / "b.mp3", outside / "secret.mp3", outside / "deep" / "c.mp3"):
        path.write_bytes(b"x" * 10)
    (catalog / "inside.mp3").symlink_to(catalog / "sub" / "b.mp3")
    (catalog / "escape.mp3").symlink_to(outside / "secret.mp3")
    (catalog / "relative_escape.mp3").symlink_to("../outside/secret.mp3")
    (catalog / "linked_dir").symlink_to(outside / "deep", target_is_directory=True)
    return catalog


def test_symlinks_out_of_the_allowed_prefixes_are_refused_per_row(linked_catalog):
    listed = read_catalog(str(linked_catalog))
    refused = dict(zip(listed["track_id"].to_pylist(), listed["refused"].to_pylist(), strict=True))
    assert {t for t, reason in refused.items() if reason is None} == {"a.mp3", "inside.mp3", "sub/b.mp3"}
    for track_id in ("escape.mp3", "relative_escape.mp3"):
        assert "resolves to" in refused[track_id] and "outside the allowed prefixes" in refused[track_id]
    (linked_catalog / "m.csv").write_text("track_id,uri\n1,inside.mp3\n2,escape.mp3\n3,linked_dir/c.mp3\n")
    manifest = read_catalog(str(linked_catalog / "m.csv"))
    assert [r is None for r in manifest["refused"].to_pylist()] == [True, False, False]
    # The target's folder allowed explicitly: the links work.
    allowed = read_catalog(str(linked_catalog / "m.csv"), UriPolicy(allow_prefixes=(str(linked_catalog.parent),)))
    assert allowed["refused"].to_pylist() == [None, None, None]


def test_a_catalog_reached_through_a_symlinked_folder_keeps_working(linked_catalog, tmp_path):
    (tmp_path / "alias").symlink_to(linked_catalog, target_is_directory=True)
    (linked_catalog / "m.csv").write_text("track_id,uri\n1,a.mp3\n2,inside.mp3\n")
    for catalog in (str(tmp_path / "alias"), str(tmp_path / "alias" / "m.csv")):
        table = read_catalog(catalog)
        refused = dict(zip(table["track_id"].to_pylist(), table["refused"].to_pylist(), strict=True))
        assert refused["1" if catalog.endswith(".csv") else "a.mp3"] is None, catalog
        assert refused["2" if catalog.endswith(".csv") else "inside.mp3"] is None, catalog


def test_relative_catalog_paths_give_absolute_uris(tmp_path, monkeypatch):
    (tmp_path / "cat" / "audio").mkdir(parents=True)
    (tmp_path / "cat" / "audio" / "a.mp3").write_bytes(b"x")
    (tmp_path / "cat" / "m.csv").write_text("track_id,uri\n1,audio/a.mp3\n")
    (tmp_path / "cat" / "audio" / "m.csv").write_text("track_id,uri\n1,a.mp3\n")
    monkeypatch.chdir(tmp_path)
    expected = [str(tmp_path / "cat" / "audio" / "a.mp3")]
    assert read_catalog("cat/m.csv")["uri"].to_pylist() == expected
    assert read_catalog("cat")["uri"].to_pylist() == expected
    monkeypatch.chdir(tmp_path / "cat" / "audio")
    assert read_catalog("m.csv")["uri"].to_pylist() == expected
    assert read_catalog("./m.csv")["refused"].to_pylist() == [None]


def test_existing_paths_with_glob_characters_are_not_globs(tmp_path):
    folder = tmp_path / "live [2024]"
    folder.mkdir()
    for name in ("a.mp3", "b.mp3"):
        (folder / name).write_bytes(b"x")
    listed = read_catalog(str(folder))
    assert listed["track_id"].to_pylist() == ["a.mp3", "b.mp3"]
    assert listed["refused"].to_pylist() == [None, None]
    assert listed["uri"].to_pylist() == [str(folder / "a.mp3"), str(folder / "b.mp3")]
    # A path that does not exist is still a glob, brackets included.
    globbed = read_catalog(f"{tmp_path}/live [[]2024]/[a].mp3")
    assert globbed["track_id"].to_pylist() == ["live [2024]/a.mp3"]  # ids are relative to the fixed part


def test_a_repeated_header_column_is_one_clear_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("track_id,uri,uri\nt1,a.mp3,b.mp3\n")
    with pytest.raises(ManifestError, match="uri appear more than once in the header"):
        read_catalog(str(manifest))
