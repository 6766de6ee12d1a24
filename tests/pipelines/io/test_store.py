"""The Delta table store: staged parts, idempotent merge commits, replacement by key, schema checks."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from catalog_embed.pipelines.embed.lifecycle.commit import commit_run
from catalog_embed.pipelines.embed.lifecycle.shards import prune_torn_shards
from catalog_embed.pipelines.embed.lifecycle.staging import RUN_META, is_committed
from catalog_embed.pipelines.io.store import TableStore, app_id
from catalog_embed.schemas.errors import TableError
from catalog_embed.schemas.records import TrackEmbedding, TrackFailure, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES, RUNS, WINDOWS
from catalog_embed.workers.rows import RowContext, embedding_rows, failure_rows, window_rows
from tests.helpers.tables import run_row


def _embedded(track: str, value: float, layers=("penultimate",), n_windows=2) -> TrackEmbedding:
    return TrackEmbedding(
        item=WorkItem(track, f"/audio/{track}.mp3", "size=1"),
        duration_s=6.0,
        n_windows=n_windows,
        pooled={layer: np.full(4, value, np.float32) for layer in layers},
        timeline=np.full((n_windows, 4), value, np.float32),
        starts=[3.0 * i for i in range(n_windows)],
    )


def _stage(store, run_id, embedded, failed, layers=("penultimate",)):
    ctx = RowContext(run_id, "enc", layers, "v1", "h1")
    store.write_part(run_id, EMBEDDINGS, "000000", embedding_rows(embedded, ctx))
    store.write_part(run_id, FAILURES, "000000", failure_rows(failed, ctx))
    store.write_part(run_id, WINDOWS, "000000", window_rows(embedded, ctx))


@pytest.fixture
def store(tmp_path):
    store = TableStore(str(tmp_path / "out"))
    store.ensure_tables()
    return store


def test_staged_parts_are_invisible_until_commit_and_commit_is_idempotent(store):
    bad = TrackFailure(WorkItem("t9", "/audio/t9.mp3", "size=0"), "decode", "AudioDecodeError", "empty")
    _stage(store, "r1", [_embedded("t1", 1.0), _embedded("t2", 2.0)], [bad])
    assert store.read(EMBEDDINGS).num_rows == 0
    assert not is_committed(store, "r1")
    commit_run(store, "r1", run_row("r1"))
    commit_run(store, "r1", run_row("r1"))  # a retried commit adds nothing
    assert is_committed(store, "r1")
    assert store.read(EMBEDDINGS).num_rows == 2
    assert store.read(FAILURES)["track_id"].to_pylist() == ["t9"]
    assert store.read(RUNS).num_rows == 1
    assert store.read(WINDOWS)["start_s"].to_pylist() == [[0.0, 3.0], [0.0, 3.0]]
    # The transaction's version identifies the content committed (a digest), and the retry committed nothing.
    embeddings = DeltaTable(store.uri(EMBEDDINGS))
    assert embeddings.transaction_version(app_id("r1")) is not None
    assert [c["operation"] for c in embeddings.history()].count("MERGE") == 1
    assert not store.fs.exists(store.staging_dir("r1"))


def test_reembedded_tracks_replace_their_rows_and_clear_their_failures(store):
    bad = TrackFailure(WorkItem("t2", "/audio/t2.mp3", "size=0"), "decode", "AudioDecodeError", "empty")
    _stage(store, "r1", [_embedded("t1", 1.0, n_windows=3)], [bad])
    commit_run(store, "r1", run_row("r1"))
    _stage(store, "r2", [_embedded("t1", 5.0, n_windows=1), _embedded("t2", 2.0)], [])
    commit_run(store, "r2", run_row("r2"))
    rows = {r["track_id"]: r for r in store.read(EMBEDDINGS).to_pylist()}
    assert sorted(rows) == ["t1", "t2"]
    assert rows["t1"]["embedding"] == [5.0] * 4
    assert rows["t1"]["run_id"] == "r2"
    assert store.read(FAILURES).num_rows == 0
    windows = {r["track_id"]: r for r in store.read(WINDOWS).to_pylist()}
    assert len(windows["t1"]["embedding"]) == 1  # the shorter timeline replaced the old one whole


def test_extra_layers_become_columns_and_keep_the_schema_version(store):
    _stage(store, "r1", [_embedded("t1", 1.0, layers=("penultimate", "pool"))], [], layers=("penultimate", "pool"))
    commit_run(store, "r1", run_row("r1"))
    table = store.read(EMBEDDINGS)
    assert table["embedding_pool"].to_pylist() == [[1.0] * 4]
    store.ensure_tables()  # still recognised as ours after schema evolution


def test_foreign_tables_are_refused(tmp_path):
    write_deltalake(str(tmp_path / "embeddings"), pa.table({"x": [1]}))
    with pytest.raises(TableError, match="schema version None"):
        TableStore(str(tmp_path)).ensure_tables()


def test_missing_table_error_says_what_to_run(tmp_path):
    with pytest.raises(TableError, match="catalog-embed embed"):
        TableStore(str(tmp_path)).table(EMBEDDINGS)


def test_tables_read_from_duckdb_without_our_code(store):
    _stage(store, "r1", [_embedded("t1", 1.0), _embedded("t2", 2.0)], [])
    commit_run(store, "r1", run_row("r1"))
    _stage(store, "r2", [_embedded("t1", 3.0)], [])
    commit_run(store, "r2", run_row("r2"))
    embeddings = DeltaTable(store.uri(EMBEDDINGS)).to_pyarrow_dataset()  # noqa: F841 (DuckDB scans it by name)
    rows = duckdb.sql("SELECT track_id, embedding::FLOAT[4] AS v FROM embeddings ORDER BY track_id").fetchall()
    assert rows == [("t1", (3.0,) * 4), ("t2", (2.0,) * 4)]


def _gone(*tracks: str) -> pa.Table:
    return pa.table({"model": ["enc"] * len(tracks), "track_id": list(tracks)})


@pytest.mark.parametrize("prune", [False, True])
def test_tracks_gone_from_the_catalog_are_marked_deleted_or_pruned(store, prune):
    bad = TrackFailure(WorkItem("t3", "/audio/t3.mp3", "size=0"), "decode", "AudioDecodeError", "empty")
    _stage(store, "r1", [_embedded("t1", 1.0), _embedded("t2", 2.0)], [bad])
    commit_run(store, "r1", run_row("r1"))
    _stage(store, "r2", [], [])
    commit_run(store, "r2", run_row("r2"), gone=_gone("t2", "t3"), prune=prune)
    rows = {r["track_id"]: r["deleted"] for r in store.read(EMBEDDINGS).to_pylist()}
    assert rows == ({"t1": False} if prune else {"t1": False, "t2": True})
    assert store.read(FAILURES).num_rows == 0
    assert store.read(WINDOWS)["track_id"].to_pylist() == (["t1"] if prune else ["t1", "t2"])


def test_a_commit_killed_midway_finishes_on_retry_without_duplicates(store, tmp_path):
    _stage(store, "r1", [_embedded("t1", 1.0), _embedded("t2", 2.0)], [])
    script = (
        "import sys, pyarrow as pa; sys.path[:0] = sys.argv[1:3]\n"
        "from tests.helpers.tables import run_row\n"
        "from catalog_embed.pipelines.io.store import TableStore\n"
        "from catalog_embed.pipelines.embed.lifecycle.commit import commit_run\n"
        f"commit_run(TableStore({store.root!r}), 'r1', run_row('r1'))\n"
    )
    env = dict(os.environ, CATALOG_EMBED_FAILPOINTS="commit.embeddings=exit")
    root = str(Path(__file__).resolve().parents[3])
    done = subprocess.run([sys.executable, "-c", script, root, root], env=env, check=False, timeout=120)
    assert done.returncode == 137  # died like kill -9 between the windows and embeddings commits
    assert store.read(WINDOWS).num_rows == 2 and store.read(EMBEDDINGS).num_rows == 0
    commit_run(store, "r1", run_row("r1"))
    assert store.read(EMBEDDINGS).num_rows == 2 and store.read(WINDOWS).num_rows == 2
    assert store.read(RUNS).num_rows == 1


def test_concurrent_commits_to_one_table_both_land_intact(store):
    runs = [f"r{i}" for i in range(4)]
    for i, run in enumerate(runs):
        _stage(store, run, [_embedded(f"{run}-t{j}", float(i)) for j in range(3)] + [_embedded("shared", float(i))], [])
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(lambda run: commit_run(store, run, run_row(run)), runs))
    table = store.read(EMBEDDINGS)
    assert table.num_rows == 3 * len(runs) + 1  # the track every run wrote exists once
    assert sorted(store.read(RUNS)["run_id"].to_pylist()) == runs
    assert DeltaTable(store.uri(EMBEDDINGS)).history()  # the log is readable after the races


def test_a_key_staged_twice_commits_once_with_its_last_row(store):
    ctx = RowContext("r1", "enc", ("penultimate",), "v1", "h1")
    store.write_part("r1", EMBEDDINGS, "000-000000", embedding_rows([_embedded("t1", 1.0), _embedded("t2", 2.0)], ctx))
    store.write_part("r1", EMBEDDINGS, "001-000000", embedding_rows([_embedded("t1", 5.0)], ctx))
    commit_run(store, "r1", run_row("r1"))
    rows = {r["track_id"]: r["embedding"][0] for r in store.read(EMBEDDINGS).to_pylist()}
    assert rows == {"t1": 5.0, "t2": 2.0}


def test_pruning_torn_shards_keeps_complete_shards_and_drops_torn_ones(store):
    ctx = RowContext("r1", "enc", ("penultimate",), "v1", "h1")
    bad = TrackFailure(WorkItem("t9", "/audio/t9.mp3", "size=0"), "decode", "AudioDecodeError", "empty")
    store.write_part("r1", FAILURES, "000-000000", failure_rows([bad], ctx))
    store.write_part("r1", EMBEDDINGS, "000-000000", embedding_rows([_embedded("t1", 1.0)], ctx))
    store.write_part("r1", FAILURES, "000-000001", failure_rows([], ctx))  # its embeddings part never came
    done, attempt = prune_torn_shards(store, "r1", lambda: {t: (f"/audio/{t}.mp3", "size=" + s) for t, s in (("t1", "1"), ("t9", "0"))})
    assert done == {"t1", "t9"}
    assert attempt == 1
    assert [p.rsplit("/", 1)[1] for p in store.staged_parts("r1", FAILURES)] == ["part-000-000000.parquet"]
    store.write_staged_json("r1", RUN_META, {"model": "enc"})
    assert store.read_staged_json("r1", RUN_META) == {"model": "enc"}
    assert store.read_staged_json("r2", RUN_META) is None


def test_filters_work_on_tables_written_by_both_merges_and_appends(store):
    _stage(store, "r1", [_embedded("t1", 1.0), _embedded("t2", 2.0)], [])
    commit_run(store, "r1", run_row("r1"))
    _stage(store, "r2", [_embedded("t1", 3.0)], [])
    commit_run(store, "r2", run_row("r2"))
    assert store.read(EMBEDDINGS, ["track_id"], pa.compute.field("track_id") == "t1")["track_id"].to_pylist() == ["t1"]
    assert store.read(RUNS, ["run_id"], pa.compute.field("run_id") == "r2").num_rows == 1
    con = duckdb.connect()
    con.register("embeddings", store.scan(EMBEDDINGS))
    con.register("runs", store.scan(RUNS))
    assert con.execute("SELECT embedding[1] FROM embeddings WHERE track_id = 't1'").fetchall() == [(3.0,)]
    assert con.execute("SELECT count(*) FROM runs WHERE run_id = 'r1'").fetchall() == [(1,)]


def test_a_write_that_fails_midway_leaves_no_temporary_file(store):
    # A real failing write: the child may not grow a file past 64 KiB (RLIMIT_FSIZE), as on a full disk.
    script = (
        "import resource, signal, sys; sys.path[:0] = sys.argv[1:2]\n"
        "import numpy as np, pyarrow as pa\n"
        "from catalog_embed.pipelines.io.store import TableStore\n"
        "from catalog_embed.schemas.tables import EMBEDDINGS\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        f"store = TableStore({store.root!r})\n"
        "try:\n"
        "    store.write_part('r1', EMBEDDINGS, '000-000000', pa.table({'x': np.random.rand(100_000)}))\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    root = str(Path(__file__).resolve().parents[3])
    done = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "27", done.stderr  # EFBIG: the write failed
    assert sorted(p.name for p in Path(store.staging_dir("r1", EMBEDDINGS)).iterdir()) == []


def test_two_removers_of_one_staging_at_once_both_succeed(store):
    """The commit and the lease's heartbeat can remove a run's staging at the same moment (`make demo` once failed
    on a part file the other remover had just deleted): both finish, and the folder is gone."""
    parts = Path(store.staging_dir("r1", EMBEDDINGS))
    parts.mkdir(parents=True)
    for shard in range(3000):
        (parts / f"part-{shard:06d}.parquet").write_bytes(b"x")
    with ThreadPoolExecutor(max_workers=2) as pool:
        for removal in [pool.submit(store.drop_staging, "r1") for _ in range(2)]:
            removal.result()
    assert not Path(store.staging_dir("r1")).exists()
