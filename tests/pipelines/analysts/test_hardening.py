"""The analysts' commands against hostile tables, SQL fragments, index folders and output paths (issue 17 items 3, 6,
7, 8, 11, 12 and the analysts' part of 13), on tables written through the real TableStore and, where exit codes
and signals matter, in real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catalog_embed.pipelines.analysts.index import META, AnnIndex, index_folder
from catalog_embed.pipelines.io.store import ROOT_ENTRIES, TableStore
from catalog_embed.schemas.tables import EMBEDDINGS
from tests.helpers.cli import run_cli
from tests.helpers.tables import commit, ids, mixture

ROOT = Path(__file__).resolve().parents[3]
DIM = 8


def _strict_json(line: str) -> object:
    """json.loads that refuses NaN and infinities, as every JSON reader but Python's does."""
    def refuse(token: str) -> None:
        raise ValueError(token)

    return json.loads(line, parse_constant=refuse)


def _cli_process(*argv: str, prefix: tuple[str, ...] = (), **kwargs) -> subprocess.CompletedProcess:
    """`catalog-embed argv...` as a process of its own (exit codes, signals, crashes at exit)."""
    return subprocess.run([*prefix, sys.executable, "-m", "catalog_embed.pipelines.cli", *argv], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300,
                          **kwargs)


def _one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert err.startswith("catalog-embed: error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err, err


def _store(path: Path) -> TableStore:
    store = TableStore(str(path))
    store.ensure_tables()
    return store


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """60 good tracks of `m` and three whose vectors hold NaN, +inf and -inf (as another tool could write them)."""
    out = tmp_path_factory.mktemp("poisoned") / "tables"
    store = _store(out)
    vectors = dict(zip(ids(60), mixture(60, DIM, 0), strict=True))
    nan = np.ones(DIM, np.float32)
    nan[3] = np.nan
    vectors |= {"bad-nan": nan, "bad-inf": np.full(DIM, np.inf, np.float32),
                "bad-neginf": np.full(DIM, -np.inf, np.float32)}
    commit(store, "r1", "m", vectors)
    return out


def test_non_finite_vectors_are_left_out_of_similar_with_one_warning_and_jsonl_stays_json(poisoned, capsys, tmp_path):
    written = tmp_path / "n.jsonl"
    code, _, err = run_cli(capsys, "similar", "--out", str(poisoned), "--model", "m", "--track", "t0000",
                           "--track", "t0001", "--k", "10", "--output", str(written))
    assert code == 0, err
    assert err.count("warning: left out 3 row(s) of m/pooled") == 1, err
    rows = [_strict_json(line) for line in written.read_text().splitlines()]
    assert len(rows) == 20
    for query in ("t0000", "t0001"):
        found = [r["track_id"] for r in rows if r["query_track_id"] == query]
        assert len(set(found)) == 10 and not any(t.startswith("bad-") for t in found)
    assert all(-1.0 <= r["similarity"] <= 1.0 for r in rows)
    # A query track whose own vector is unusable has no neighbours: said in one line.
    code, _, err = run_cli(capsys, "similar", "--out", str(poisoned), "--model", "m", "--track", "bad-nan")
    assert code == 2 and "bad-nan" in err and "NaN or infinite" in err
    assert err.strip().splitlines()[-1].startswith("catalog-embed: error: ")


def test_non_finite_vectors_are_left_out_of_index_map_and_compare(poisoned, capsys, tmp_path):
    code, _, err = run_cli(capsys, "index", "--out", str(poisoned), "--model", "m")
    assert code == 0 and "60 tracks" in err, err
    code, _, err = run_cli(capsys, "similar", "--out", str(poisoned), "--model", "m", "--track", "t0002",
                           "--search", "index", "--output", str(tmp_path / "i.jsonl"))
    assert code == 0, err
    found = [_strict_json(line)["track_id"] for line in (tmp_path / "i.jsonl").read_text().splitlines()]
    assert len(set(found)) == 10 and not any(t.startswith("bad-") for t in found)
    code, _, err = run_cli(capsys, "similar", "--out", str(poisoned), "--model", "m", "--track", "bad-inf",
                           "--search", "index")
    assert code == 2 and "bad-inf" in err and "NaN or infinite" in err

    code, _, err = run_cli(capsys, "map", "--out", str(poisoned), "--model", "m", "--method", "pca",
                           "--png", str(tmp_path / "m.png"), "--html", str(tmp_path / "m.html"))
    assert code == 0 and "map of 60 tracks" in err, err
    assert (tmp_path / "m.html").read_text().count("<circle ") == 60

    code, _, err = run_cli(capsys, "compare", "--out", str(poisoned), "--a", "m", "--b", "m", "--k", "5",
                           "--report", str(tmp_path / "r"), "--fail-under", "overlap=1")
    assert code == 0, err
    report = _strict_json((tmp_path / "r" / "report.json").read_text())
    assert report["shared_tracks"] == 60 and report["overlap"]["mean"] == 1.0


def test_an_index_refresh_leaves_out_non_finite_rows_and_keeps_them_out(tmp_path, capsys):
    out = tmp_path / "tables"
    store = _store(out)
    commit(store, "a", "m", dict(zip(ids(40), mixture(40, DIM, 1), strict=True)))
    assert run_cli(capsys, "index", "--out", str(out), "--model", "m")[0] == 0
    new = mixture(2, DIM, 2)
    commit(store, "b", "m", {"n0": new[0], "n1": new[1], "bad": np.full(DIM, np.nan, np.float32)})
    code, _, err = run_cli(capsys, "index", "--out", str(out), "--model", "m")
    assert code == 0 and "added 2, replaced 0, removed 0, skipped 1" in err, err
    # A later commit of other tracks: the unusable row is not looked for again (no "rebuild it" error).
    commit(store, "c", "m", {"n2": mixture(1, DIM, 3)[0]})
    code, _, err = run_cli(capsys, "index", "--out", str(out), "--model", "m")
    assert code == 0 and "added 1, replaced 0, removed 0" in err, err
    meta = AnnIndex.load_meta(store, index_folder(store, "m", "pooled"))
    assert meta["count"] == 43 and list(meta["skipped"]) == ["bad"]


# -- item 6: --where ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "tables"
    store = _store(out)
    commit(store, "r1", "m", dict(zip(ids(30), mixture(30, DIM, 4), strict=True)))
    commit(store, "r2", "other", dict(zip(ids(30), mixture(30, DIM, 5), strict=True)))
    return out


def test_where_is_one_expression_over_the_columns_and_reaches_nothing_else(small, capsys, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("the-first-line-is-secret\n")
    copied, attached = tmp_path / "copied.csv", tmp_path / "attached.db"
    attacks = [
        f"1=1; COPY (SELECT 'x' AS x) TO '{copied}'; SELECT 1 WHERE 1=1",
        f"1=1; ATTACH '{attached}' AS a; SELECT 1 WHERE 1=1",
        f"track_id IN (SELECT * FROM read_csv('{secret}', header=false))",
        f"length(track_id) < (SELECT count(*) FROM read_csv('{secret}'))",
        "track_id IN (SELECT 't0001' FROM duckdb_settings())",
        "1=1) UNION (SELECT 't0001'",
        "1=1 ORDER BY 1",
        "duration_s > 1;",
        "",
    ]
    for where in attacks:
        code, _, err = run_cli(capsys, "similar", "--out", str(small), "--model", "m", "--track", "t0000",
                               "--where", where)
        _one_line_error(code, err, "--where must be one boolean SQL expression over the table's columns")
        assert "the-first-line-is-secret" not in err
    assert not copied.exists() and not attached.exists()
    # What a --where is for still works: columns, literals (a ';' inside a string is text), scalar functions.
    code, printed, err = run_cli(capsys, "similar", "--out", str(small), "--model", "m", "--track", "t0000",
                                 "--where", "track_id <> 'a;b' AND lower(track_id) >= 't0020'", "--k", "3")
    assert code == 0, err
    assert "t0020" in printed or "t0025" in printed


# -- item 7: index.json names ------------------------------------------------------------------------------------


def _indexed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, TableStore, Path, dict]:
    """30 tracks of `m` and their index: the root, its store, the index folder and its index.json."""
    out = tmp_path / "tables"
    store = _store(out)
    commit(store, "a", "m", dict(zip(ids(30), mixture(30, DIM, 6), strict=True)))
    assert run_cli(capsys, "index", "--out", str(out), "--model", "m")[0] == 0
    folder = Path(index_folder(store, "m", "pooled"))
    return out, store, folder, json.loads((folder / META).read_text())


def test_index_json_naming_files_outside_its_folder_is_refused_and_nothing_is_deleted(tmp_path, capsys):
    out, store, folder, meta = _indexed(tmp_path, capsys)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x.usearch").write_bytes(b"precious")
    (victim / "k.parquet").write_bytes(b"precious")
    meta["graph"] = os.path.relpath(victim / "x.usearch", folder)
    meta["keys"] = str(victim / "k.parquet")
    (folder / META).write_text(json.dumps(meta))
    commit(store, "b", "m", {"n0": mixture(1, DIM, 7)[0]})  # so that `index` refreshes (and would drop old files)
    for argv in (("index",), ("similar", "--track", "t0000", "--search", "index")):
        code, _, err = run_cli(capsys, argv[0], "--out", str(out), "--model", "m", *argv[1:])
        _one_line_error(code, err, "not a graph-*.usearch file of its own folder")
    assert (victim / "x.usearch").read_bytes() == b"precious" and (victim / "k.parquet").read_bytes() == b"precious"


def test_a_damaged_index_is_never_up_to_date(tmp_path, capsys):
    out, _, folder, meta = _indexed(tmp_path, capsys)
    (folder / meta["graph"]).write_bytes(b"garbage" * 100)
    for argv in (("index",), ("similar", "--track", "t0000", "--search", "index")):
        code, _, err = run_cli(capsys, argv[0], "--out", str(out), "--model", "m", *argv[1:])
        _one_line_error(code, err, "is damaged")
        assert "--rebuild" in err
    (folder / META).write_text("{not json")
    code, _, err = run_cli(capsys, "index", "--out", str(out), "--model", "m")
    _one_line_error(code, err, "is damaged")
    code, _, err = run_cli(capsys, "index", "--out", str(out), "--model", "m", "--rebuild")
    assert code == 0 and "built at version" in err, err
    code, _, err = run_cli(capsys, "index", "--out", str(out), "--model", "m", "--threads", "-1")
    _one_line_error(code, err, "--threads must be 0")


# -- item 8: output paths ----------------------------------------------------------------------------------------


def _part_files(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (out / EMBEDDINGS.name).rglob("*.parquet")}


def test_output_options_never_write_into_the_tables(small, capsys, tmp_path):
    before = _part_files(small)
    part = next(p for p in before if "model=other" in str(p))
    attempts = [
        (("similar", "--track", "t0000", "--output", str(part)), "inside the tables' folder"),
        (("map", "--method", "pca", "--png", str(tmp_path / "m.png"), "--html", str(part.with_suffix(".html"))),
         "inside the tables' folder"),
        (("similar", "--track", "t0000", "--output", str(small / "n.csv")), "write it elsewhere"),
        (("map", "--method", "pca", "--png", str(small / "m.png")), "write it elsewhere"),
    ]
    for argv, expected in attempts:
        code, _, err = run_cli(capsys, argv[0], "--out", str(small), "--model", "m", *argv[1:])
        _one_line_error(code, err, expected)
    code, _, err = run_cli(capsys, "compare", "--out", str(small), "--a", "m", "--b", "other", "--k", "3",
                           "--report", str(small / "report"))
    _one_line_error(code, err, "write it elsewhere")
    # A Delta table anywhere, not only under --out, is refused as well.
    elsewhere = tmp_path / "copy"
    shutil.copytree(small / EMBEDDINGS.name, elsewhere / EMBEDDINGS.name)
    code, _, err = run_cli(capsys, "similar", "--out", str(small), "--model", "m", "--track", "t0000", "--output",
                           str(elsewhere / EMBEDDINGS.name / "n.csv"))
    _one_line_error(code, err, "is inside the Delta table")
    assert _part_files(small) == before
    assert {p.name for p in small.iterdir()} <= set(ROOT_ENTRIES)
    TableStore(str(small)).check_root()  # what the next `embed` checks first: nothing foreign was left there


def test_output_paths_that_cannot_be_written_fail_in_one_line_before_any_work(small, capsys, tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "existing.csv").write_text("old")
    report_file = tmp_path / "report-file"
    report_file.write_text("keep")
    checks = [
        (("similar", "--track", "t0000", "--output", str(tmp_path)), "is a folder"),
        (("similar", "--track", "t0000", "--output", str(tmp_path / "missing" / "n.csv")), "does not exist"),
        (("similar", "--track", "t0000", "--output", str(tmp_path / "a-file" / "n.csv")), "is a file, not a folder"),
        (("similar", "--track", "t0000", "--output", str(tmp_path / "n.txt")), "use a .csv, .parquet, .jsonl"),
        (("map", "--png", str(tmp_path)), "is a folder"),
        (("map", "--png", str(tmp_path / "dir.png")), "is a folder"),
        (("map", "--png", str(tmp_path / "m.json")), "use a .png file name"),
    ]
    (tmp_path / "dir.png").mkdir()
    for argv, expected in checks:
        code, _, err = run_cli(capsys, argv[0], "--out", str(small), "--model", "m", *argv[1:])
        _one_line_error(code, err, expected)
    code, _, err = run_cli(capsys, "compare", "--out", str(small), "--a", "m", "--b", "other", "--k", "3",
                           "--report", str(report_file))
    _one_line_error(code, err, "is a file: name a folder")
    assert report_file.read_text() == "keep"
    # A file the user named is replaced.
    code, _, err = run_cli(capsys, "similar", "--out", str(small), "--model", "m", "--track", "t0000", "--k", "3",
                           "--output", str(tmp_path / "existing.csv"))
    assert code == 0, err
    assert (tmp_path / "existing.csv").read_text().startswith('"query_track_id"')
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_user_who_cannot_write_gets_one_line_from_every_command(small, tmp_path):
    """Root ignores permission bits, so as root the commands run without the capabilities that let it (as a second
    user would); elsewhere the folder's mode alone stops them."""
    tables = tmp_path / "tables"
    shutil.copytree(small, tables)
    (tables / "_indexes").mkdir()
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    for folder in (read_only, tables / "_indexes"):
        folder.chmod(0o555)
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--") if os.geteuid() == 0 else ()
    runs = {
        ("index", "--model", "m"): "cannot write the index at",
        ("similar", "--model", "m", "--track", "t0000", "--output", str(read_only / "n.csv")): "cannot write in",
        ("map", "--model", "m", "--method", "pca", "--png", str(read_only / "m.png")): "cannot write in",
        ("compare", "--a", "m", "--b", "other", "--k", "3", "--report", str(read_only / "r")): "cannot write in",
    }
    try:
        for argv, expected in runs.items():
            done = _cli_process(argv[0], "--out", str(tables), *argv[1:], prefix=prefix)
            _one_line_error(done.returncode, done.stderr, expected)
    finally:
        for folder in (read_only, tables / "_indexes"):
            folder.chmod(0o755)
    assert not list(read_only.iterdir()) and not list((tables / "_indexes").iterdir())


# -- items 11 and 13: exit codes of real processes ---------------------------------------------------------------


def test_a_stale_index_exits_2_every_time(tmp_path):
    """The refusal used to be followed by an abort at exit (134) in most runs: Arrow's I/O threads were still inside
    deltalake's Python filesystem when the interpreter finalized."""
    out = tmp_path / "tables"
    store = _store(out)
    commit(store, "a", "m", dict(zip(ids(2000), mixture(2000, 64, 9), strict=True)))
    assert _cli_process("index", "--out", str(out), "--model", "m").returncode == 0
    commit(store, "b", "m", {"t0001": np.ones(64, np.float32)})
    codes = [_cli_process("similar", "--out", str(out), "--model", "m", "--track", "t0000", "--search",
                          "index").returncode for _ in range(6)]
    assert codes == [2] * 6


def test_sigterm_while_index_builds_exits_143(tmp_path):
    """usearch turns the SIGTERM handler's exception into its own RuntimeError when the signal lands in its C++ loop
    (not always: it also runs Python between batches), so the build is interrupted several times."""
    out = tmp_path / "tables"
    store = _store(out)
    commit(store, "a", "m", dict(zip(ids(20000), mixture(20000, 64, 10), strict=True)))
    command = [sys.executable, "-m", "catalog_embed.pipelines.cli", "index", "--out", str(out), "--model", "m",
               "--threads", "1"]
    for _ in range(3):
        proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE,
                                text=True)
        try:
            first = proc.stderr.readline()  # printed just before the graph is built
            assert first.startswith("indexing 20000 tracks"), first
            proc.send_signal(signal.SIGTERM)
            rest = proc.stderr.read()
            assert proc.wait(timeout=120) == 143, rest
        finally:
            proc.kill()
            proc.wait()
        assert "Traceback" not in rest and "interrupted" in rest
        assert not Path(index_folder(store, "m", "pooled"), META).exists()


# -- item 12: compare --------------------------------------------------------------------------------------------


def test_compare_refuses_too_few_shared_tracks_for_k_instead_of_passing(tmp_path, capsys):
    out = tmp_path / "tables"
    store = _store(out)
    x = mixture(6, DIM, 11)
    commit(store, "a", "a", dict(zip(ids(6), x, strict=True)))
    commit(store, "b", "b", dict(zip(ids(6), x[::-1].copy(), strict=True)))
    code, _, err = run_cli(capsys, "compare", "--out", str(out), "--a", "a", "--b", "b", "--report",
                           str(tmp_path / "r"), "--fail-under", "overlap=0.9")
    _one_line_error(code, err, "needs at least 12")
    assert "lower --k to at most 4" in err
    commit(store, "c", "c", dict(zip(ids(2), x[:2], strict=True)))
    code, _, err = run_cli(capsys, "compare", "--out", str(out), "--a", "a", "--b", "c", "--k", "1",
                           "--report", str(tmp_path / "r"))
    _one_line_error(code, err, "share 2 usable track(s)")
    assert not (tmp_path / "r").exists()


def test_compare_of_identical_vectors_reports_an_undefined_rank_correlation(tmp_path, capsys):
    out = tmp_path / "tables"
    store = _store(out)
    same = np.ones(DIM, np.float32)
    commit(store, "a", "a", dict.fromkeys(ids(20), same))
    commit(store, "b", "b", dict.fromkeys(ids(20), same))
    code, _, err = run_cli(capsys, "compare", "--out", str(out), "--a", "a", "--b", "b", "--k", "3",
                           "--report", str(tmp_path / "r"), "--fail-under", "overlap=0")
    assert code == 0, err
    report = _strict_json((tmp_path / "r" / "report.json").read_text())
    assert report["rank_corr"] == {"count": 0} and report["passed"]
    code, _, err = run_cli(capsys, "compare", "--out", str(out), "--a", "a", "--b", "b", "--k", "3",
                           "--report", str(tmp_path / "r"), "--fail-under", "rank_corr=0.5")
    assert code == 1 and "gate failed: rank_corr = nan" in err, err
    assert _strict_json((tmp_path / "r" / "report.json").read_text())["gates"][0]["value"] is None


def test_tracks_naming_a_folder_or_a_garbage_file_fails_in_one_line(small, capsys, tmp_path):
    garbage = tmp_path / "ids.parquet"
    garbage.write_bytes(b"not parquet at all")
    binary = tmp_path / "ids.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    for path, expected in ((tmp_path, "a folder"), (garbage, "cannot be read"), (binary, "cannot be read")):
        code, _, err = run_cli(capsys, "similar", "--out", str(small), "--model", "m", "--tracks", str(path))
        _one_line_error(code, err, expected)

