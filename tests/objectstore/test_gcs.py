"""GCS through gcsfs and gcp-storage-emulator: manifests, listings, fingerprints, audio and staged parts.

Delta commits on gs:// are not exercised here: deltalake's own GCS client lists through the XML API, which the
emulator lacks, so table commits are tested on S3 (moto) and everything fsspec-level on both.
"""

from __future__ import annotations

import gcsfs
import pytest

from catalog_embed.pipelines.embed.lifecycle.staging import RUN_META
from catalog_embed.pipelines.io.catalog import UriPolicy, catalog_fingerprints, read_catalog
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import MISSING_FINGERPRINT, TrackFailure, WorkItem
from catalog_embed.schemas.tables import FAILURES
from catalog_embed.workers.audio import load_audio
from catalog_embed.workers.rows import RowContext, failure_rows
from catalog_embed.workers.stages import DecodeStage, EncoderConfig, TrackFeatures
from tests.objectstore.conftest import BUCKET


def _another_writer() -> gcsfs.GCSFileSystem:
    # Its own instance: writes through it are not announced to the filesystem our code shares in this process.
    return gcsfs.GCSFileSystem(skip_instance_cache=True)


def _prints(catalog) -> dict[str, str]:
    return dict(zip(catalog["track_id"].to_pylist(), catalog_fingerprints(catalog), strict=True))


def test_manifest_and_listing_read_from_the_bucket_with_generation_fingerprints(gcs_catalog, small_labels):
    catalog = read_catalog(gcs_catalog.manifest)
    assert catalog.num_rows == len(small_labels)
    assert all(uri.startswith(f"{gcs_catalog.audio}/") for uri in catalog["uri"].to_pylist())
    assert catalog["refused"].null_count == catalog.num_rows
    prints = _prints(catalog)
    missing = {la["track_id"] for la in small_labels if la["broken"] == "missing"}
    assert {t for t, p in prints.items() if p == MISSING_FINGERPRINT} == missing
    assert all(";generation=" in p for t, p in prints.items() if t not in missing), prints

    # A directory catalog: every object under the folder, its track id the path relative to the folder.
    listed = read_catalog(gcs_catalog.audio)
    present = {t: uri for t, uri in zip(catalog["track_id"].to_pylist(), catalog["uri"].to_pylist(), strict=True)
               if t not in missing}
    assert listed["uri"].to_pylist() == sorted(present.values())
    assert listed["track_id"].to_pylist() == [uri.rsplit("/", 1)[1] for uri in sorted(present.values())]
    by_uri = {uri: prints[t] for t, uri in present.items()}
    assert catalog_fingerprints(listed) == [by_uri[uri] for uri in listed["uri"].to_pylist()]


def test_overwriting_an_object_changes_its_fingerprint(gcs_catalog):
    before = _prints(read_catalog(gcs_catalog.audio))  # this process now holds a listing of the folder
    name = min(before)
    writer = _another_writer()
    path = f"{BUCKET}/catalog/audio/{name}"
    writer.pipe(path, writer.cat(path))  # same bytes, new object generation
    after = _prints(read_catalog(gcs_catalog.audio))
    assert after[name] != before[name] and after[name].split(";")[0] == before[name].split(";")[0]
    assert {t: p for t, p in after.items() if t != name} == {t: p for t, p in before.items() if t != name}


def test_audio_decodes_from_the_bucket(gcs_catalog, small_labels):
    catalog = read_catalog(gcs_catalog.manifest)
    uris = dict(zip(catalog["track_id"].to_pylist(), catalog["uri"].to_pylist(), strict=True))
    good = next(la["track_id"] for la in small_labels if la["broken"] is None and uris[la["track_id"]].endswith(".ogg"))
    broken = next(la["track_id"] for la in small_labels if la["broken"] == "not_audio")
    audio = load_audio(uris[good], 22_050)
    assert audio.codec == "vorbis" and audio.duration_s == pytest.approx(4.0, abs=0.05)
    stage = DecodeStage(EncoderConfig(model="chroma-stats"))
    features = stage(WorkItem(good, uris[good], "size=1"))
    assert isinstance(features, TrackFeatures) and features.windows.shape[0] == 1
    failure = stage(WorkItem(broken, uris[broken], "size=1"))
    assert isinstance(failure, TrackFailure) and failure.error_type == "AudioDecodeError"


def test_parts_are_staged_and_listed_on_gcs(gcs_catalog):
    store = TableStore(f"gs://{BUCKET}/tables")
    ctx = RowContext("run-1", "chroma-stats", ("stats",), "v1", "h1")
    rows = failure_rows(
        [TrackFailure(WorkItem(f"t{i}", f"gs://{BUCKET}/catalog/audio/t{i}.mp3", "size=1"), "decode", "E", "m")
         for i in range(3)],
        ctx,
    )
    written = store.write_part("run-1", FAILURES, "000-000000", rows.slice(0, 2))
    assert written == f"{BUCKET}/tables/_staging/run-1/failures/part-000-000000.parquet"
    store.write_staged_json("run-1", RUN_META, {"model": "chroma-stats"})
    # A part another process writes (a Ray or Beam worker) is seen by the store that listed the folder before.
    assert len(store.staged_parts("run-1", FAILURES)) == 1
    other = TableStore(f"gs://{BUCKET}/tables")
    other.fs = _another_writer()
    other.write_part("run-1", FAILURES, "001-000000", rows.slice(2))
    assert [p.rsplit("/", 1)[1] for p in store.staged_parts("run-1", FAILURES)] == [
        "part-000-000000.parquet", "part-001-000000.parquet"
    ]
    assert sorted(store.read_staged("run-1", FAILURES)["track_id"].to_pylist()) == ["t0", "t1", "t2"]
    assert store.staged_runs() == ["run-1"]
    store.drop_staging("run-1")
    assert store.staged_runs() == []


def test_the_uri_policy_allows_the_catalog_folder_of_a_bucket_and_refuses_other_buckets(gcs_catalog):
    manifest = f"{BUCKET}/catalog/policy.jsonl"
    gcs_catalog.fs.pipe(
        manifest,
        b'{"track_id": "inside", "uri": "gs://catalog-bucket/catalog/audio/demo-0001.mp3"}\n'
        b'{"track_id": "relative", "uri": "audio/demo-0001.mp3"}\n'
        b'{"track_id": "other-bucket", "uri": "gs://another-bucket/catalog/audio/demo-0001.mp3"}\n'
        b'{"track_id": "s3", "uri": "s3://catalog-bucket/catalog/audio/demo-0001.mp3"}\n',
    )
    catalog = read_catalog(f"gs://{manifest}")
    refused = dict(zip(catalog["track_id"].to_pylist(), catalog["refused"].to_pylist(), strict=True))
    assert refused["inside"] is None and refused["relative"] is None
    assert "--allow-prefix" in refused["other-bucket"] and "--allow-prefix" in refused["s3"]
    prints = catalog_fingerprints(catalog)
    assert ";generation=" in prints[0] and prints[2:] == ["refused", "refused"]
    allowed = read_catalog(f"gs://{manifest}", UriPolicy(allow_prefixes=("gs://another-bucket/",)))
    assert allowed["refused"].to_pylist()[2] is None
