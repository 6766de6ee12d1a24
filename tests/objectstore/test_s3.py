"""The embed job on S3 through moto's server: catalog and audio in a bucket, Delta tables committed to it.

Covers what nightly runs on S3 do: a first run, an unchanged re-run that embeds nothing, a re-run after one
object was overwritten that re-embeds exactly that track, runs and commits racing on the same tables, an
endpoint given only as a storage option, a long-lived process whose filesystem cached earlier listings, and the
URI policy on bucket URIs.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import boto3
import numpy as np
import pyarrow.parquet as pq
import s3fs
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.embed.lifecycle.commit import commit_run
from catalog_embed.pipelines.embed.lifecycle.staging import RUN_META, RunState, StagedRun
from catalog_embed.pipelines.io.catalog import (
    UriPolicy,
    catalog_fingerprints,
    fingerprint_from_info,
    fingerprints,
    read_catalog,
)
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import TrackEmbedding, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, RUNS
from catalog_embed.workers.rows import RowContext, embedding_rows
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers.tables import run_row
from tests.objectstore.conftest import BUCKET

QUIET = Console(quiet=True)
# A cheap real encoder whose embedding of a track does not depend on the tracks batched with it, so a
# re-embedded track can be compared exactly with the run that first embedded the same bytes.
ENCODER = EncoderConfig(model="chroma-stats")


def _storage_options(endpoint: str) -> dict[str, str]:
    # With conditional_put=etag each Delta commit is a put-if-absent that moto's server honours, so concurrent
    # writers need no lock service; AWS_S3_ALLOW_UNSAFE_RENAME=true also commits here but is, as named, unsafe.
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}


def _config(s3_catalog, out: str, **changes) -> EmbedConfig:
    return EmbedConfig(
        catalog=s3_catalog.manifest,
        out=out,
        encoder=ENCODER,
        workers=1,
        storage_options=_storage_options(s3_catalog.endpoint),
        **changes,
    )


def _expected(labels: list[dict]) -> tuple[list[str], list[str]]:
    good = sorted(la["track_id"] for la in labels if la["broken"] is None)
    bad = sorted(la["track_id"] for la in labels if la["broken"] is not None)
    return good, bad


def _rows(out: str, endpoint: str, sql: str, *params) -> list[tuple]:
    return connect(out, _storage_options(endpoint)).execute(sql, list(params)).fetchall()


def _counts(out: str, endpoint: str) -> tuple[list[str], list[str]]:
    embedded = [r[0] for r in _rows(out, endpoint, "SELECT track_id FROM embeddings WHERE NOT deleted ORDER BY 1")]
    failed = [r[0] for r in _rows(out, endpoint, "SELECT track_id FROM failures ORDER BY 1")]
    return embedded, failed


def test_runs_read_the_bucket_commit_to_it_and_re_embed_only_an_overwritten_object(s3_catalog, small_labels):
    out = f"s3://{BUCKET}/tables-incremental"
    endpoint = s3_catalog.endpoint
    good, bad = _expected(small_labels)

    first = run_embed(_config(s3_catalog, out), QUIET)
    assert first.status == "succeeded"
    assert _counts(out, endpoint) == (good, bad)
    assert _rows(out, endpoint, "SELECT count(*) FROM embeddings") == [(len(good),)]
    prints = dict(_rows(out, endpoint, "SELECT track_id, source_fingerprint FROM embeddings"))
    assert all(";etag=" in p for p in prints.values()), prints
    # The Delta logs are in the bucket and the run's staging is gone once committed.
    fs = s3_catalog.fs
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/tables-incremental/embeddings/_delta_log/00000000000000000000.json")
    assert not fs.exists(f"{BUCKET}/tables-incremental/_staging/{first.run_id}")

    unchanged = run_embed(_config(s3_catalog, out), QUIET)
    assert unchanged.plan.has_work is False and unchanged.stats.n_embedded == 0
    assert _rows(out, endpoint, "SELECT count(*) FROM embeddings") == [(len(good),)]

    # Another writer (not our filesystem instance, whose caches must not hide the change) replaces one track's
    # bytes with another recording in the same codec.
    catalog = read_catalog(s3_catalog.manifest)
    uris = dict(zip(catalog["track_id"].to_pylist(), catalog["uri"].to_pylist(), strict=True))
    flacs = [t for t in good if uris[t].endswith(".flac")]
    changed, donor = flacs[0], flacs[1]
    keys = {t: uris[t].removeprefix(f"s3://{BUCKET}/") for t in (changed, donor)}
    s3 = boto3.client("s3")
    body = s3.get_object(Bucket=BUCKET, Key=keys[donor])["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=keys[changed], Body=body)

    again = run_embed(_config(s3_catalog, out), QUIET)
    assert [item.track_id for item in again.plan.items] == [changed]
    assert _counts(out, endpoint) == (good, bad)
    assert _rows(out, endpoint, "SELECT count(*) FROM embeddings") == [(len(good),)]
    query = "SELECT track_id, run_id, source_fingerprint FROM embeddings"
    rows = {track: (run_id, fingerprint) for track, run_id, fingerprint in _rows(out, endpoint, query)}
    assert rows[changed][0] == again.run_id and rows[changed][1] != prints[changed]
    assert all(rows[t] == (first.run_id, prints[t]) for t in good if t != changed)
    # The replaced row holds the new bytes' embedding. Compared here rather than in SQL: DuckDB pushes string
    # filters into the Arrow scan, which rejects the mix of string and string_view files that merges leave.
    vectors = dict(_rows(out, endpoint, "SELECT track_id, embedding FROM embeddings"))
    assert vectors[changed] == vectors[donor]
    statuses = _rows(out, endpoint, "SELECT status, n_embedded FROM runs ORDER BY started_at")
    assert statuses == [("succeeded", len(good)), ("succeeded", 0), ("succeeded", 1)]


def test_two_runs_started_together_on_the_same_tables_leave_each_track_once(s3_catalog, small_labels):
    out = f"s3://{BUCKET}/tables-race"
    # Each run plans the whole catalog before the other commits, so both embed every track and both merge them.
    with ThreadPoolExecutor(2) as pool:
        summaries = list(pool.map(lambda i: run_embed(_config(s3_catalog, out, run_id=f"racer-{i}"), QUIET), range(2)))
    assert [s.status for s in summaries] == ["succeeded", "succeeded"]
    good, bad = _expected(small_labels)
    assert _counts(out, s3_catalog.endpoint) == (good, bad)
    assert _rows(out, s3_catalog.endpoint, "SELECT count(*) FROM embeddings") == [(len(good),)]
    assert _rows(out, s3_catalog.endpoint, "SELECT count(*) FROM failures") == [(len(bad),)]
    runs = _rows(out, s3_catalog.endpoint, "SELECT run_id, status FROM runs ORDER BY run_id")
    assert runs == [("racer-0", "succeeded"), ("racer-1", "succeeded")]
    assert TableStore(out, _storage_options(s3_catalog.endpoint)).staged_runs() == []


def _stage(store: TableStore, run_id: str, tracks: list[str], value: float) -> None:
    ctx = RowContext(run_id, "enc", ("stats",), "v1", "h1")
    embedded = [
        TrackEmbedding(WorkItem(t, f"s3://{BUCKET}/catalog/audio/{t}.flac", "size=1"), 4.0, 1,
                       {"stats": np.full(4, value, np.float32)})
        for t in tracks
    ]
    store.write_part(run_id, EMBEDDINGS, "000-000000", embedding_rows(embedded, ctx))


def test_commits_released_at_the_same_instant_all_land_once(s3_catalog):
    out = f"s3://{BUCKET}/tables-commit-race"
    options = _storage_options(s3_catalog.endpoint)
    store = TableStore(out, options)
    store.ensure_tables()
    runs = [f"r{i}" for i in range(3)]
    for i, run in enumerate(runs):
        _stage(store, run, [f"{run}-a", f"{run}-b", "shared"], float(i))
    # Released together, the writers open the same table version and race on every commit step.
    start = threading.Barrier(len(runs))

    def commit(run: str) -> None:
        writer = TableStore(out, options)
        start.wait()
        commit_run(writer, run, run_row(run))

    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(commit, runs))
    tracks = store.read(EMBEDDINGS)["track_id"].to_pylist()
    assert sorted(tracks) == sorted([f"{run}-{x}" for run in runs for x in "ab"] + ["shared"])
    assert sorted(store.read(RUNS)["run_id"].to_pylist()) == runs
    merges = [c for c in store.table(EMBEDDINGS).history() if c.get("operation") == "MERGE"]
    assert len(merges) == len(runs)


def test_a_dead_run_in_a_bucket_is_claimed_by_one_conditional_put(s3_catalog):
    store = TableStore(f"s3://{BUCKET}/tables-claim", _storage_options(s3_catalog.endpoint))
    store.write_staged_json("r1", RUN_META, {"model": "m"})  # its process died before it wrote a lease
    seen = StagedRun.read(store, "r1")
    assert seen.state is RunState.DEAD
    assert seen.claim(store, "first", 60)
    assert not seen.claim(store, "second", 60)  # saw it dead too: S3 refuses its put (If-None-Match)
    assert StagedRun.read(store, "r1").lease.owner == "first"
    absent = StagedRun.read(store, "r2")  # a new run id: its lease is created only if absent
    assert absent.state is RunState.ABSENT
    assert absent.claim(store, "first", 60) and not absent.claim(store, "second", 60)


def test_the_store_reaches_an_endpoint_given_only_as_a_storage_option(s3_catalog, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()  # drop filesystems made while the environment named the endpoint
    out = f"s3://{BUCKET}/tables-options-only"
    store = TableStore(out, _storage_options(s3_catalog.endpoint))
    store.ensure_tables()
    _stage(store, "r1", ["t1"], 1.0)
    # A part another process wrote after this one listed the folder (a Ray or Beam worker) is committed too.
    assert len(store.staged_parts("r1", EMBEDDINGS)) == 1
    other = s3fs.S3FileSystem(endpoint_url=s3_catalog.endpoint, skip_instance_cache=True)
    ctx = RowContext("r1", "enc", ("stats",), "v1", "h1")
    late = TrackEmbedding(WorkItem("t2", f"s3://{BUCKET}/catalog/audio/t2.flac", "size=1"), 4.0, 1,
                          {"stats": np.full(4, 2.0, np.float32)})
    with other.open(f"{store.staging_dir('r1', EMBEDDINGS)}/part-001-000000.parquet", "wb") as fh:
        pq.write_table(embedding_rows([late], ctx), fh)
    commit_run(store, "r1", run_row("r1"))
    assert sorted(store.read(EMBEDDINGS)["track_id"].to_pylist()) == ["t1", "t2"]


def test_a_long_lived_process_sees_objects_as_they_are_now(s3_catalog):
    s3 = boto3.client("s3")
    for name in ("demo-0002.mp3", "demo-0005.flac"):
        s3.copy_object(Bucket=BUCKET, Key=f"fresh/audio/{name}", CopySource=f"{BUCKET}/catalog/audio/{name}")
    folder = f"s3://{BUCKET}/fresh/audio"
    listed = read_catalog(folder)  # this process now holds a listing of the folder
    before = dict(zip(listed["track_id"].to_pylist(), catalog_fingerprints(listed), strict=True))
    assert sorted(before) == ["demo-0002.mp3", "demo-0005.flac"] and all(";etag=" in p for p in before.values())
    s3.put_object(Bucket=BUCKET, Key="fresh/audio/demo-0002.mp3", Body=b"replaced")
    s3.put_object(Bucket=BUCKET, Key="fresh/audio/new.flac", Body=b"new")
    relisted = read_catalog(folder)
    after = dict(zip(relisted["track_id"].to_pylist(), catalog_fingerprints(relisted), strict=True))
    assert after == {
        "demo-0002.mp3": f"size=8;etag={hashlib.md5(b'replaced').hexdigest()}",
        "demo-0005.flac": before["demo-0005.flac"],
        "new.flac": f"size=3;etag={hashlib.md5(b'new').hexdigest()}",
    }
    # A manifest overwritten since this process listed its folder is read as it is now, not as listed.
    s3.put_object(Bucket=BUCKET, Key="fresh/manifest.csv", Body=b"track_id,uri\na,audio/new.flac\n")
    read_catalog(f"s3://{BUCKET}/fresh")
    s3.put_object(Bucket=BUCKET, Key="fresh/manifest.csv", Body=b"track_id,uri\na,audio/new.flac\nb,audio/b.flac\n")
    assert read_catalog(f"s3://{BUCKET}/fresh/manifest.csv")["track_id"].to_pylist() == ["a", "b"]


def test_fingerprints_list_each_prefix_once_instead_of_a_head_per_object(s3_catalog, monkeypatch):
    fs = s3_catalog.fs
    s3 = boto3.client("s3")
    s3.copy_object(Bucket=BUCKET, Key="bulk/deeper/x.flac", CopySource=f"{BUCKET}/catalog/audio/demo-0005.flac")
    objects = sorted(f"s3://{path}" for path in fs.find(f"{BUCKET}/catalog/audio"))
    uris = [*objects, f"s3://{BUCKET}/bulk/deeper/x.flac", f"{s3_catalog.audio}/absent.mp3", f"s3://{BUCKET}/nowhere/y.mp3"]
    fs.invalidate_cache()
    per_object = [fingerprint_from_info(fs.info(uri)) for uri in uris[:-2]]  # a HEAD each: what it replaces
    requests: list[str] = []
    call_s3 = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        requests.append(method)
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    assert fingerprints(uris) == [*per_object, "missing", "missing"]
    # No HEAD: one listing per distinct prefix however many objects it holds (audio, bulk/deeper), and two for
    # the prefix that does not exist (s3fs looks again before it says so).
    assert requests == ["list_objects_v2"] * 4, requests


def test_the_uri_policy_allows_the_catalog_folder_of_a_bucket_and_refuses_other_buckets(s3_catalog):
    fs = s3_catalog.fs
    manifest = f"{BUCKET}/catalog/policy.csv"
    audio = s3_catalog.audio
    fs.pipe(
        manifest,
        (
            "track_id,uri\n"
            f"absolute,{audio}/demo-0005.flac\n"
            "relative,audio/demo-0005.flac\n"
            "other-bucket,s3://another-bucket/catalog/audio/demo-0005.flac\n"
            f"sibling-prefix,s3://{BUCKET}/catalog-private/demo-0005.flac\n"
            f"climb,{audio}/../../secrets/key.flac\n"
        ).encode(),
    )
    catalog = read_catalog(f"s3://{manifest}")
    refused = dict(zip(catalog["track_id"].to_pylist(), catalog["refused"].to_pylist(), strict=True))
    assert refused["absolute"] is None and refused["relative"] is None
    assert catalog["uri"].to_pylist()[1] == f"{audio}/demo-0005.flac"
    assert "--allow-prefix" in refused["other-bucket"] and "--allow-prefix" in refused["sibling-prefix"]
    assert "'..' segment" in refused["climb"]
    prints = catalog_fingerprints(catalog)
    assert prints[:2] == [prints[0]] * 2 and ";etag=" in prints[0]
    assert set(prints[2:]) == {"refused"}  # refused objects are never touched
    allowed = read_catalog(f"s3://{manifest}", UriPolicy(allow_prefixes=("s3://another-bucket/catalog",)))
    assert allowed["refused"].to_pylist()[2] is None
