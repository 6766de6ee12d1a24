"""Nothing lost, nothing reached: run ids, live staging, reused ids, output roots, and plans that follow the request.

Each test runs the real job on real audio into real Delta tables; runs that must overlap run as real processes
(`tests.helpers.faults.embed_process`), held open by a decoder that hangs until its timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.embed.lifecycle.staging import LEASE_FILE, TTL_ENV, read_lease
from catalog_embed.pipelines.embed.vacuum import vacuum
from catalog_embed.pipelines.io.store import STAGING, TableStore
from catalog_embed.schemas.errors import ConfigError, TableError
from catalog_embed.schemas.tables import EMBEDDINGS
from catalog_embed.workers.audio import DecodeConfig
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers.faults import (
    catalog_of,
    embed_process,
    expected_tracks,
    finish,
    kill_session,
    staged_embedding_parts,
    table_tracks,
    wait_for,
)

QUIET = Console(quiet=True)
FAST = EncoderConfig(model="chroma-stats")
MFCC = EncoderConfig(model="mfcc-stats")
# A run held open: shards of 2 tracks, one worker, and a decoder that hangs on one track until this timeout.
HOLD_S = "25"


def _held_run(catalog: str, out: str, hang: str):
    """An `embed` process that stages shards, then hangs on `hang` for HOLD_S seconds before it finishes."""
    proc = embed_process(
        catalog, out, "--model", "chroma-stats", "--shard-size", "2", "--workers", "1", "--decode-timeout", HOLD_S,
        failpoints=f"decode=hang:{hang}",
    )
    wait_for(lambda: staged_embedding_parts(out) >= 2, proc, "two shards were staged")
    return proc


def _staged_run(out: str) -> str:
    runs = TableStore(out).staged_runs()
    assert len(runs) == 1, runs
    return runs[0]


class Held(NamedTuple):
    """A held run (see `_held_run`) on the first 10 good tracks, and a second catalog of the other good ones."""

    good: list[str]
    catalog: str
    other_catalog: str
    out: str
    proc: subprocess.Popen
    run_id: str


@pytest.fixture
def held(small_catalog, small_labels, tmp_path) -> Held:
    good, _ = expected_tracks(small_labels)
    catalog = catalog_of(small_catalog, tmp_path / "first", lambda t: t in good[:10])
    other = catalog_of(small_catalog, tmp_path / "second", lambda t: t in good[10:])
    out = str(tmp_path / "out")
    proc = _held_run(catalog, out, hang=good[6])
    return Held(good, catalog, other, out, proc, _staged_run(out))


# -- 1: run ids are names, never paths ------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["..", "/tmp/victim", "a/b", ".hidden", "", "x" * 200])
def test_a_run_id_that_could_name_a_path_is_refused_before_any_work(small_catalog, tmp_path, capsys, run_id):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    rc = main(["embed", "--catalog", str(small_catalog.manifest_path), "--out", str(out), "--run-id", run_id])
    assert rc == 2
    assert "--run-id" in capsys.readouterr().err
    assert (victim / "keep.txt").read_text() == "mine"
    assert not out.exists()


def test_the_store_never_resolves_a_run_id_outside_its_staging(tmp_path):
    store = TableStore(str(tmp_path / "out"))
    for run_id in ("..", "../..", "/etc", "a/../../b"):
        with pytest.raises(TableError, match="not allowed"):
            store.drop_staging(run_id)
    assert tmp_path.exists()


# -- 2: no run adopts another's live staging; a run that loses its staging fails loudly ---------------------------


def test_a_run_on_another_catalog_does_not_adopt_a_live_run(held):
    good, second, out, proc, live = held.good, held.other_catalog, held.out, held.proc, held.run_id
    other = run_embed(EmbedConfig(catalog=second, out=out, encoder=FAST), QUIET)
    assert other.run_id != live and other.status == "succeeded"
    assert other.stats.n_embedded == len(good[10:])
    log = finish(proc)
    assert proc.returncode == 0, log
    assert "succeeded: 9 embedded, 1 failed" in log  # the hung track failed by its timeout; nothing went missing
    embedded, failed = table_tracks(out)
    assert embedded == sorted(set(good) - {good[6]}) and failed == [good[6]]


def test_an_interrupted_run_is_resumed_only_by_a_run_of_the_same_work(held):
    good, first, second, out, proc, interrupted = held
    os.killpg(proc.pid, signal.SIGINT)
    finish(proc)
    other = run_embed(EmbedConfig(catalog=second, out=out, encoder=FAST), QUIET)
    assert other.run_id != interrupted
    assert table_tracks(out) == (sorted(good[10:]), [])  # none of the interrupted run's staged tracks
    again = run_embed(EmbedConfig(catalog=first, out=out, encoder=FAST, decode_timeout_s=float(HOLD_S)), QUIET)
    assert again.run_id == interrupted
    # The out holds one catalog: the other run's tracks, absent from this one, are marked deleted.
    assert table_tracks(out) == (sorted(good[:10]), [])


def test_a_run_whose_staging_is_taken_over_commits_nothing_and_fails(held):
    out, proc, run_id = held.out, held.proc, held.run_id
    lease_path = Path(out, STAGING, run_id, LEASE_FILE)
    lease = json.loads(lease_path.read_text())
    lease_path.write_text(json.dumps(lease | {"owner": "someone-else"}))
    log = finish(proc)
    assert proc.returncode == 75, log  # EX_TEMPFAIL: run again and it resumes (issue 18; it was 2, "fix the command")
    assert "committed nothing" in log and "succeeded" not in log
    assert table_tracks(out) == ([], [])


def test_a_live_run_id_is_refused_to_a_second_run(held, capsys):
    catalog, out, proc, run_id = held.catalog, held.out, held.proc, held.run_id
    rc = main(["embed", "--catalog", catalog, "--out", out, "--model", "chroma-stats", "--run-id", run_id])
    assert rc == 2 and "running now" in capsys.readouterr().err
    assert finish(proc) and proc.returncode == 0


# -- 3: vacuum leaves live runs and foreign folders alone -----------------------------------------------------------


def test_vacuum_during_a_run_skips_its_staging_and_folders_it_did_not_write(held):
    good, out, proc, run_id = held.good, held.out, held.proc, held.run_id
    foreign = Path(out, STAGING, "notes")
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    report = vacuum(out, staging_hours=0, retention_hours=168, dry_run=False)
    assert report.staging_removed == [] and report.staging_live == [run_id] and report.staging_foreign == ["notes"]
    assert (foreign / "todo.txt").read_text() == "mine"
    log = finish(proc)
    assert proc.returncode == 0, log
    assert table_tracks(out)[0] == sorted(set(good[:10]) - {good[6]})


def test_vacuum_removes_the_staging_of_a_dead_run(held):
    out, proc, run_id = held.out, held.proc, held.run_id
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not read_lease(TableStore(out), run_id).alive()  # its process is gone: dead at once, not after the TTL
    assert vacuum(out, staging_hours=0, retention_hours=168, dry_run=False).staging_removed == [run_id]


# -- 4: a run id names one run ----------------------------------------------------------------------------------


def test_a_committed_run_id_is_refused_so_new_work_is_never_dropped(small_catalog, small_labels, tmp_path):
    good, _ = expected_tracks(small_labels)
    catalog_dir = tmp_path / "catalog"
    catalog = catalog_of(small_catalog, catalog_dir, lambda t: t in good)
    out = str(tmp_path / "out")
    table = pq.read_table(catalog)
    pq.write_table(table.slice(0, 6), catalog)
    run_embed(EmbedConfig(catalog=catalog, out=out, encoder=FAST, run_id="nightly"), QUIET)
    pq.write_table(table, catalog)
    with pytest.raises(ConfigError, match="already committed"):
        run_embed(EmbedConfig(catalog=catalog, out=out, encoder=FAST, run_id="nightly"), QUIET)
    run_embed(EmbedConfig(catalog=catalog, out=out, encoder=FAST), QUIET)
    assert table_tracks(out)[0] == sorted(table["track_id"].to_pylist())


# -- 5: --out is a table set of ours, and `plan` only reads ---------------------------------------------------------


def test_an_out_that_is_not_a_table_set_is_refused(small_catalog, tmp_path, capsys):
    catalog = str(small_catalog.manifest_path)
    users = tmp_path / "documents"
    users.mkdir()
    (users / "thesis.txt").write_text("mine")
    assert main(["embed", "--catalog", catalog, "--out", str(users), "--model", "chroma-stats"]) == 2
    assert "thesis.txt" in capsys.readouterr().err
    assert sorted(p.name for p in users.iterdir()) == ["thesis.txt"]
    a_file = tmp_path / "file.parquet"
    a_file.write_bytes(b"x")
    assert main(["embed", "--catalog", catalog, "--out", str(a_file), "--model", "chroma-stats"]) == 2
    assert "is a file" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["embed", "--catalog", catalog, "--out", str(out), "--model", "chroma-stats"]) == 0
    capsys.readouterr()
    for inside in (out / "embeddings", out / "embeddings" / "sub"):
        assert main(["embed", "--catalog", catalog, "--out", str(inside), "--model", "chroma-stats"]) == 2
        assert "Delta table" in capsys.readouterr().err
    assert not (out / "embeddings" / "sub").exists() and not (out / "embeddings" / "failures").exists()


def test_plan_creates_no_tables(small_catalog, tmp_path):
    out = tmp_path / "out"
    assert main(["plan", "--catalog", str(small_catalog.manifest_path), "--out", str(out)]) == 0
    assert not out.exists() or not any(out.iterdir())


# -- 9: a new layer or the timeline is embedded, not reported unchanged ---------------------------------------------


def test_a_new_layer_or_the_timeline_re_embeds_what_lacks_it(small_catalog, small_labels, tmp_path):
    good, _ = expected_tracks(small_labels)
    out = str(tmp_path / "out")
    catalog = str(small_catalog.manifest_path)
    musicnn = EncoderConfig(model="musicnn-msd")
    run_embed(EmbedConfig(catalog=catalog, out=out, encoder=musicnn), QUIET)
    two = EncoderConfig(model="musicnn-msd", layers=("penultimate", "taggram"))
    layered = run_embed(EmbedConfig(catalog=catalog, out=out, encoder=two), QUIET)
    assert layered.stats.n_embedded == len(good)
    con = connect(out)
    assert con.execute("SELECT count(*) FROM embeddings WHERE embedding_taggram IS NOT NULL").fetchone() == (len(good),)
    # Asking for fewer layers than a row has is already satisfied; asking for the timeline is not.
    assert run_embed(EmbedConfig(catalog=catalog, out=out, encoder=musicnn), QUIET).plan.has_work is False
    timeline = run_embed(EmbedConfig(catalog=catalog, out=out, encoder=musicnn, write_windows=True), QUIET)
    assert timeline.stats.n_embedded == len(good)
    assert connect(out).execute("SELECT count(*) FROM windows").fetchone() == (len(good),)
    assert run_embed(EmbedConfig(catalog=catalog, out=out, encoder=musicnn, write_windows=True), QUIET).plan.has_work is False


# -- 10: duration limits -------------------------------------------------------------------------------------------


def test_min_duration_above_max_duration_is_refused(small_catalog, tmp_path, capsys):
    args = ["embed", "--catalog", str(small_catalog.manifest_path), "--out", str(tmp_path / "out")]
    assert main([*args, "--min-duration", "10", "--max-duration", "5"]) == 2
    assert "--min-duration 10 is above --max-duration 5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tracks_that_failed_a_limit_are_retried_once_the_limit_changes(small_catalog, small_labels, tmp_path):
    good, bad = expected_tracks(small_labels)
    out = str(tmp_path / "out")
    catalog = str(small_catalog.manifest_path)
    strict = EmbedConfig(
        catalog=catalog, out=out, encoder=FAST, decode=DecodeConfig(max_duration_s=2.0), max_failure_ratio=1.0
    )
    first = run_embed(strict, QUIET)
    assert first.stats.n_embedded == 0
    assert run_embed(strict, QUIET).plan.has_work is False  # same limits: still known bad
    relaxed = run_embed(EmbedConfig(catalog=catalog, out=out, encoder=FAST), QUIET)
    assert set(good) <= {i.track_id for i in relaxed.plan.items}
    assert table_tracks(out) == (good, bad)


def test_an_absurd_worker_count_is_refused_before_any_process_starts(small_catalog, tmp_path, capsys):
    args = ["embed", "--catalog", str(small_catalog.manifest_path), "--out", str(tmp_path / "out")]
    assert main([*args, "--workers", "100000"]) == 2
    assert "--workers 100000 is more than" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- 11: a commit that stalls past the lease TTL still belongs to its live process ------------------------------------


def _embedded_tracks(out: str) -> list[str]:
    store = TableStore(out)
    return sorted(store.read(EMBEDDINGS, ["track_id"])["track_id"].to_pylist()) if store.exists(EMBEDDINGS) else []


def test_a_commit_stalled_past_its_lease_is_not_adopted_and_a_rerun_loses_nothing(small_catalog, small_labels, tmp_path):
    good, _ = expected_tracks(small_labels)
    catalog = catalog_of(small_catalog, tmp_path / "catalog", lambda t: t in good[:3])
    table = pq.read_table(catalog)
    pq.write_table(table.slice(0, 2), catalog)
    out = str(tmp_path / "out")
    stalled = embed_process(catalog, out, "--model", "mfcc-stats", failpoints="commit.runs=hang", env={TTL_ENV: "2"})
    wait_for(lambda: len(_embedded_tracks(out)) == 2, stalled, "the run committed its rows and stalled before its runs row")
    run_id = _staged_run(out)
    seen = read_lease(TableStore(out), run_id)
    wait_for(lambda: time.time() > seen.expires_at + 1, stalled, "the lease seen during the commit expired")
    pq.write_table(table, catalog)  # the catalog gained a track meanwhile
    rerun = run_embed(EmbedConfig(catalog=catalog, out=out, encoder=MFCC), QUIET)
    assert rerun.run_id != run_id and rerun.stats.n_embedded == 1
    assert table_tracks(out) == (sorted(good[:3]), [])
    kill_session(stalled)
    resumed = run_embed(EmbedConfig(catalog=catalog, out=out, encoder=MFCC), QUIET)
    assert resumed.run_id == run_id  # the killed run is resumed: its commit finishes with its runs row
    con = connect(out)
    assert sorted(r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()) == sorted([run_id, rerun.run_id])
    assert con.execute("SELECT count(*) FROM embeddings").fetchone() == (3,)


# -- 12: a resume re-checks what it staged against the catalog as it is now -----------------------------------------


def test_a_resume_after_the_catalog_was_edited_in_place_commits_what_the_catalog_now_says(
    small_catalog, small_labels, tmp_path
):
    good, _ = expected_tracks(small_labels)
    catalog = catalog_of(small_catalog, tmp_path / "catalog", lambda t: t in good[:4])
    table = pq.read_table(catalog)
    a, b, stall, d = table["track_id"].to_pylist()
    out = str(tmp_path / "out")
    proc = embed_process(
        catalog, out, "--model", "mfcc-stats", "--shard-size", "2", "--workers", "1", failpoints=f"decode=hang:{stall}"
    )
    wait_for(lambda: staged_embedding_parts(out) >= 1, proc, "the shard of a and b was staged")
    kill_session(proc)
    killed = _staged_run(out)
    other_file = table["uri"].to_pylist()[3]
    edited = [{"track_id": t, "uri": other_file if t == b else u} for t, u in zip(*table.to_pydict().values(), strict=True)]
    pq.write_table(pa.Table.from_pylist([row for row in edited if row["track_id"] != a]), catalog)  # a taken down
    resumed = run_embed(EmbedConfig(catalog=catalog, out=out, encoder=MFCC), QUIET)
    assert resumed.run_id == killed
    rows = dict(connect(out).execute("SELECT track_id, source_uri FROM embeddings WHERE NOT deleted").fetchall())
    assert sorted(rows) == sorted([b, stall, d])
    assert rows[b].endswith("/" + other_file)  # embedded from the file the catalog names now


def test_two_runs_resuming_one_dead_staging_together_leave_every_row_once(small_catalog, small_labels, tmp_path):
    good, _ = expected_tracks(small_labels)
    catalog = catalog_of(small_catalog, tmp_path / "catalog", lambda t: t in good[:4])
    stall = pq.read_table(catalog)["track_id"].to_pylist()[2]
    out = str(tmp_path / "out")
    args = ("--model", "mfcc-stats", "--shard-size", "2", "--workers", "1")
    proc = embed_process(catalog, out, *args, failpoints=f"decode=hang:{stall}")
    wait_for(lambda: staged_embedding_parts(out) >= 1, proc, "a shard was staged")
    kill_session(proc)
    dead = _staged_run(out)
    procs = [embed_process(catalog, out, *args) for _ in range(2)]
    logs = [finish(p) for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert sum(f"resuming run {dead}" in log for log in logs) == 1, logs  # one resumed it, the other ran its own
    assert table_tracks(out) == (sorted(good[:4]), [])
    assert connect(out).execute("SELECT count(*) FROM embeddings").fetchone() == (4,)
