"""The analysts' commands (`similar`, `index`, `compare`) on tables written through the real TableStore.

Vectors are controlled here (a Gaussian mixture written as embedding rows and committed like a run), so the
expected answers are known: exact neighbours from numpy, a rotated copy that must compare as identical, a
shuffled copy that must fail a gate. `test_analysts_real.py` runs them on tracks embedded by the real job.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog_embed.pipelines.analysts.index import INDEXES, AnnIndex, index_folder
from catalog_embed.pipelines.analysts.vectors import ModelLayer
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.tables import EMBEDDINGS
from catalog_embed.workers.analysis import exact_neighbours, linear_cka, unit_rows
from tests.helpers.cli import run_cli
from tests.helpers.tables import commit, ids, mixture

N, DIM = 400, 24


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """synth (clustered), synth-rotated (an orthogonal rotation of it), synth-shuffled (its vectors dealt to other
    tracks) and elsewhere (other tracks)."""
    out = tmp_path_factory.mktemp("analysts") / "tables"
    store = TableStore(str(out))
    store.ensure_tables()
    x = mixture(N, DIM, 0)
    rotation, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((DIM, DIM)))
    shuffled = x[np.random.default_rng(2).permutation(N)]
    commit(store, "r1", "synth", dict(zip(ids(N), x, strict=True)))
    commit(store, "r2", "synth-rotated", dict(zip(ids(N), (x @ rotation).astype(np.float32), strict=True)))
    commit(store, "r3", "synth-shuffled", dict(zip(ids(N), shuffled, strict=True)))
    commit(store, "r4", "elsewhere", dict(zip(ids(50, "u"), mixture(50, DIM, 3), strict=True)))
    return out, x


def test_exact_similar_matches_numpy_and_writes_the_neighbours(tables, capsys, tmp_path):
    out, x = tables
    written = tmp_path / "n.parquet"
    code, printed, _ = run_cli(capsys, "similar", "--out", str(out), "--model", "synth", "--track", "t0007",
                               "--track", "t0100", "--k", "5", "--output", str(written))
    assert code == 0 and "t0007" in printed
    unit = unit_rows(x)
    truth, sims = exact_neighbours(unit[[7, 100]], unit, 5, exclude=np.array([7, 100]))
    rows = pq.read_table(written).to_pylist()
    assert [r["track_id"] for r in rows] == [f"t{i:04d}" for i in truth.ravel()]
    np.testing.assert_allclose([r["similarity"] for r in rows], sims.ravel(), rtol=1e-5)
    assert [r["query_track_id"] for r in rows] == ["t0007"] * 5 + ["t0100"] * 5


def test_where_restricts_the_candidates(tables, capsys, tmp_path):
    out, _ = tables
    written = tmp_path / "n.csv"
    queries = tmp_path / "queries.txt"
    queries.write_text("t0001\n")
    code, _, _ = run_cli(capsys, "similar", "--out", str(out), "--model", "synth", "--tracks", str(queries),
                         "--where", "track_id >= 't0300'", "--output", str(written))
    assert code == 0
    found = [line.split(",")[2].strip('"') for line in written.read_text().splitlines()[1:]]
    assert len(found) == 10 and all(t >= "t0300" for t in found)


def test_the_index_answers_like_exact_search_and_records_what_it_was_built_from(tables, capsys, tmp_path):
    out, x = tables
    code, _, err = run_cli(capsys, "index", "--out", str(out), "--model", "synth")
    assert code == 0 and "recall@10" in err
    store = TableStore(str(out))
    meta = AnnIndex.load_meta(store, index_folder(store, "synth", "pooled"))
    assert (meta["model"], meta["layer"], meta["dim"], meta["count"]) == ("synth", "pooled", DIM, N)
    assert meta["table_version"] == store.table(EMBEDDINGS).version()
    assert meta["recall_at_10"] >= 0.9
    written = tmp_path / "index.parquet"
    queries = ids(40)
    code, _, err = run_cli(capsys, "similar", "--out", str(out), "--model", "synth", "--search", "index", "--recall",
                           *[a for t in queries for a in ("--track", t)], "--output", str(written))
    assert code == 0 and "recall@10 against exact search" in err
    # Above --exact-below live rows, auto search goes through the index.
    code, printed, _ = run_cli(capsys, "similar", "--out", str(out), "--model", "synth", "--track", "t0000",
                               "--exact-below", "100")
    assert code == 0 and "index (usearch" in printed
    got = pq.read_table(written).to_pylist()
    unit = unit_rows(x)
    truth, _ = exact_neighbours(unit[:40], unit, 10, exclude=np.arange(40))
    same = sum({r["track_id"] for r in got if r["query_track_id"] == q} == {f"t{i:04d}" for i in truth[j]}
               for j, q in enumerate(queries))
    print(f"index top-10 == exact top-10 for {same} of 40 tracks")
    assert same >= 32


def test_a_stale_index_is_refused_and_a_refresh_applies_only_the_changes(tmp_path, capsys):
    out = tmp_path / "tables"
    store = TableStore(str(out))
    store.ensure_tables()
    x = mixture(200, 8, 5)
    commit(store, "a", "m", dict(zip(ids(200), x, strict=True)))
    assert run_cli(capsys, "index", "--out", str(out), "--model", "m")[0] == 0
    # Another model's commit leaves this model's index fresh.
    commit(store, "b", "other", {"z0": np.ones(8, np.float32)})
    query = ("similar", "--out", str(out), "--model", "m", "--track", "t0000", "--search", "index")
    assert run_cli(capsys, *query)[0] == 0
    # A nightly run: two tracks re-embedded, one new, one gone.
    new = mixture(3, 8, 9)
    commit(store, "c", "m", {"t0003": new[0], "t0004": new[1], "n0000": new[2]}, gone=["t0005"])
    code, _, err = run_cli(capsys, *query)
    assert code == 2 and "catalog-embed index --out" in err and "refresh" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "index", "--out", str(out), "--model", "m")
    assert code == 0 and "added 1, replaced 2, removed 1" in err, err
    folder = index_folder(store, "m", "pooled")
    meta = AnnIndex.load_meta(store, folder)
    index = AnnIndex.load(store, folder, meta)
    assert sorted(index.keys["track_id"].to_pylist()) == sorted([*ids(200)[:5], *ids(200)[6:], "n0000"])
    np.testing.assert_allclose(index.vectors_of(["t0003"])[0], unit_rows(new[:1])[0], atol=1e-6)
    assert meta["table_version"] == store.table(EMBEDDINGS).version()
    # Only the graph, keys and index.json of the current version remain.
    assert len(store.fs.ls(folder)) == 3
    # The refreshed index answers like exact search on the current rows.
    vectors = ModelLayer(store, "m").read()
    assert index.measure_recall(vectors) >= 0.9


def test_bad_input_fails_in_one_line_naming_the_fix(tables, capsys, tmp_path):
    out, _ = tables
    checks = {
        ("similar", "--model", "synth", "--track", "nope"): "not among the live tracks",
        ("similar", "--model", "absent", "--track", "t0000"): "fix --model",
        ("similar", "--model", "synth", "--layer", "taggram", "--track", "t0000"): "choose --layer from: pooled",
        ("similar", "--model", "synth", "--track", "t0000", "--where", "no_such_column > 1"): "--where",
        ("compare", "--a", "synth", "--b", "elsewhere"): "compare embeddings of one catalog",
        ("compare", "--a", "synth@99", "--b", "synth"): "fix MODEL@VERSION",
        ("compare", "--a", "synth", "--b", "synth", "--fail-under", "accuracy=1"): "METRIC one of overlap",
    }
    for argv, expected in checks.items():
        code, _, err = run_cli(capsys, argv[0], "--out", str(out), *argv[1:], "--report", str(tmp_path)) \
            if argv[0] == "compare" else run_cli(capsys, argv[0], "--out", str(out), *argv[1:])
        assert code == 2, (argv, err)
        assert expected in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("catalog-embed: error: ")
    # An index built for another model (and dimension) is refused for this one.
    store = TableStore(str(out))
    other = tmp_path / "elsewhere-index"
    assert run_cli(capsys, "index", "--out", str(out), "--model", "elsewhere")[0] == 0
    shutil.copytree(index_folder(store, "elsewhere", "pooled"), other)
    code, _, err = run_cli(capsys, "similar", "--out", str(out), "--model", "synth", "--track", "t0000", "--search",
                           "index", "--index", str(other))
    assert code == 2 and "was built for elsewhere/pooled" in err and "--rebuild" in err
    code, _, err = run_cli(capsys, "similar", "--out", str(out), "--model", "synth-shuffled", "--track", "t0000",
                           "--search", "index")
    assert code == 2 and "no index at" in err and "catalog-embed index" in err
    assert (out / INDEXES).is_dir()


def test_compare_identical_rotated_and_shuffled(tables, capsys, tmp_path):
    out, _ = tables
    code, printed, _ = run_cli(capsys, "compare", "--out", str(out), "--a", "synth", "--b", "synth-rotated", "--report",
                               str(tmp_path / "same"), "--fail-under", "overlap=0.99", "--fail-under", "cka=0.99")
    assert code == 0, printed
    report = json.loads((tmp_path / "same" / "report.json").read_text())
    assert report["overlap"]["mean"] == pytest.approx(1.0)
    assert report["cka"] == pytest.approx(1.0, abs=1e-6)
    assert report["rank_corr"]["median"] == pytest.approx(1.0)
    assert report["shared_tracks"] == N and report["passed"]
    assert "overlap@10" in (tmp_path / "same" / "report.md").read_text()

    code, _, err = run_cli(capsys, "compare", "--out", str(out), "--a", "synth", "--b", "synth-shuffled",
                           "--report", str(tmp_path / "bad"), "--fail-under", "overlap=0.5")
    assert code == 1 and "gate failed: overlap" in err
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["overlap"]["mean"] < 0.2 and not report["passed"]
    assert report["cka"] < 0.5


def test_compare_reaches_earlier_versions_through_time_travel(tmp_path, capsys):
    out = tmp_path / "tables"
    store = TableStore(str(out))
    store.ensure_tables()
    x = mixture(120, 8, 11)
    commit(store, "v1", "m", dict(zip(ids(120), x, strict=True)))
    before = store.table(EMBEDDINGS).version()
    noisy = x + 2.0 * np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    commit(store, "v2", "m", dict(zip(ids(120), noisy, strict=True)))
    code, _, _ = run_cli(capsys, "compare", "--out", str(out), "--a", f"m@{before}", "--b", "m", "--report",
                         str(tmp_path / "r"))
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["a"]["table_version"] == before and report["b"]["table_version"] > before
    assert 0.0 < report["overlap"]["mean"] < 1.0
    assert report["cka"] == pytest.approx(linear_cka(x, noisy), rel=1e-5)


def test_an_index_asked_for_more_neighbours_than_it_holds_returns_each_track_once(tmp_path, capsys):
    out = tmp_path / "tables"
    store = TableStore(str(out))
    store.ensure_tables()
    commit(store, "a", "m", dict(zip(ids(30), mixture(30, 8, 4), strict=True)))
    assert run_cli(capsys, "index", "--out", str(out), "--model", "m")[0] == 0
    written = tmp_path / "n.parquet"
    code, _, _ = run_cli(capsys, "similar", "--out", str(out), "--model", "m", "--track", "t0003", "--k", "50",
                         "--search", "index", "--output", str(written))
    assert code == 0
    found = pq.read_table(written)["track_id"].to_pylist()
    assert sorted(found) == sorted(set(ids(30)) - {"t0003"})
