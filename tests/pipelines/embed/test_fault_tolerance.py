"""Incremental runs and faults on the local runner: deletions, URI policy, crashes, hangs, kills, races.

Each scenario ends with every good track exactly once in `embeddings` and every bad one exactly once in
`failures`. Kills are real (`kill -9` of the driver's process group, or the failpoint `exit`, which ends the
process the same way at an exact point); segfaults and hangs are injected where a decoder would crash or hang.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.embed.lifecycle.staging import RUN_META
from catalog_embed.pipelines.embed.vacuum import vacuum
from catalog_embed.pipelines.io.catalog import UriPolicy
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.workers.failpoints import ENV as FAILPOINTS
from tests.helpers.faults import (
    embed_process,
    expected_tracks,
    kill_session,
    staged_embedding_parts,
    table_tracks,
    wait_for,
)

QUIET = Console(quiet=True)


def _copy_catalog(small_catalog, tmp_path: Path, keep=None) -> Path:
    root = tmp_path / "catalog"
    shutil.copytree(small_catalog.root, root)
    manifest = pq.read_table(root / "manifest.parquet")
    uris = [u.replace(str(small_catalog.root), str(root)) for u in manifest["uri"].to_pylist()]
    manifest = manifest.set_column(1, "uri", pa.array(uris))
    if keep is not None:
        manifest = manifest.filter(pa.array([keep(t) for t in manifest["track_id"].to_pylist()]))
    pq.write_table(manifest, root / "manifest.parquet")
    return root / "manifest.parquet"


@pytest.mark.parametrize("prune", [False, True])
def test_tracks_gone_from_the_manifest_are_marked_deleted_or_pruned(small_catalog, small_labels, tmp_path, prune):
    manifest = _copy_catalog(small_catalog, tmp_path)
    out = str(tmp_path / "out")
    run_embed(EmbedConfig(catalog=str(manifest), out=out), QUIET)
    good, bad = expected_tracks(small_labels)
    gone = {good[0], bad[0]}
    table = pq.read_table(manifest)
    pq.write_table(table.filter(pa.array([t not in gone for t in table["track_id"].to_pylist()])), manifest)
    # 2 of 18 tracks is above --prune-max-share's default (10%): this catalog shrank on purpose.
    summary = run_embed(EmbedConfig(catalog=str(manifest), out=out, prune=prune, prune_max_share=1.0), QUIET)
    assert summary.plan.items == () and summary.plan.gone == tuple(sorted(gone))
    embedded, failed = table_tracks(out)
    assert embedded == good[1:] and failed == bad[1:]
    deleted = connect(out).execute("SELECT track_id FROM embeddings WHERE deleted").fetchall()
    assert deleted == ([] if prune else [(good[0],)])
    assert connect(out).execute("SELECT n_deleted FROM runs WHERE run_id = ?", [summary.run_id]).fetchone() == (2,)
    # The track comes back: it is embedded again and live.
    pq.write_table(table, manifest)
    back = run_embed(EmbedConfig(catalog=str(manifest), out=out), QUIET)
    assert sorted(i.track_id for i in back.plan.items) == sorted(gone)
    assert table_tracks(out) == (good, bad)


def test_a_prune_of_most_of_the_table_is_refused_before_any_work_unless_confirmed(small_catalog, tmp_path, capsys):
    manifest = _copy_catalog(small_catalog, tmp_path)
    out = str(tmp_path / "out")
    args = ["embed", "--catalog", str(manifest), "--out", out, "--model", "mfcc-stats"]
    assert main(args) == 0
    before = table_tracks(out)
    table = pq.read_table(manifest)
    pq.write_table(table.slice(0, 1), manifest)  # a manifest truncated to its first row
    capsys.readouterr()
    assert main([*args, "--prune"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("catalog-embed: error: --prune would delete 17 of the model's 18 tracks") and "\n" not in err
    assert "--prune-max-share" in err
    assert table_tracks(out) == before and TableStore(out).staged_runs() == []
    assert connect(out).execute("SELECT count(*) FROM runs").fetchone() == (1,)
    assert main([*args, "--prune", "--prune-max-share", "1"]) == 0  # confirmed
    assert table_tracks(out)[0] == [t for t in table["track_id"].to_pylist()[:1] if t in before[0]]


def test_the_uri_policy_refuses_rows_not_runs(small_catalog, tmp_path):
    good = next(u for u in pq.read_table(small_catalog.manifest_path)["uri"].to_pylist() if u.endswith(".flac"))
    manifest = tmp_path / "m.csv"
    (tmp_path / "audio").mkdir()
    shutil.copy(good, tmp_path / "audio" / "ok.flac")
    manifest.write_text(
        "track_id,uri\n"
        "ok,audio/ok.flac\n"
        "climb,audio/../../etc/passwd\n"
        f"outside,{good}\n"
        "web,https://example.com/a.mp3\n"
    )
    out = str(tmp_path / "out")
    summary = run_embed(EmbedConfig(catalog=str(manifest), out=out), QUIET)
    assert table_tracks(out) == (["ok"], ["climb", "outside", "web"])
    reasons = dict(connect(out).execute("SELECT track_id, message FROM failures").fetchall())
    assert "'..' segment" in reasons["climb"]
    assert "--allow-prefix" in reasons["outside"]
    assert "--allow-http" in reasons["web"]
    assert summary.stats.n_failed == 3
    # Unchanged refusals are not written again; an allowed prefix lets the row through.
    assert run_embed(EmbedConfig(catalog=str(manifest), out=out), QUIET).plan.has_work is False
    policy = UriPolicy(allow_prefixes=(str(Path(good).parent),))
    again = run_embed(EmbedConfig(catalog=str(manifest), out=out, policy=policy, retry_failed=True), QUIET)
    assert [i.track_id for i in again.plan.items] == ["outside"]
    assert table_tracks(out) == (["ok", "outside"], ["climb", "web"])


def test_a_segfaulting_and_a_hanging_decoder_each_cost_one_row(small_catalog, small_labels, tmp_path, monkeypatch):
    good, bad = expected_tracks(small_labels)
    crash, hang = good[2], good[5]
    monkeypatch.setenv(FAILPOINTS, f"decode=segfault:{crash};decode=hang:{hang}")
    out = str(tmp_path / "out")
    started = time.perf_counter()
    summary = run_embed(
        EmbedConfig(catalog=str(small_catalog.manifest_path), out=out, decode_timeout_s=5.0, workers=2), QUIET
    )
    assert time.perf_counter() - started < 120  # the hang cost its timeout, not the run
    embedded, failed = table_tracks(out)
    assert embedded == sorted(set(good) - {crash, hang})
    assert failed == sorted(bad + [crash, hang])
    types = dict(connect(out).execute("SELECT track_id, error_type FROM failures").fetchall())
    assert types[crash] == "DecoderCrashed" and types[hang] == "DecodeTimeout"
    assert summary.stats.n_failed == len(bad) + 2


def test_kill_9_mid_run_then_rerun_resumes_without_redoing_staged_shards(small_catalog, small_labels, tmp_path):
    good, bad = expected_tracks(small_labels)
    out = str(tmp_path / "out")
    catalog = str(small_catalog.manifest_path)
    order = pq.read_table(small_catalog.manifest_path)["track_id"].to_pylist()
    stall = order[12]  # decode stalls here, after earlier shards of 2 tracks are staged
    proc = embed_process(catalog, out, "--shard-size", "2", "--workers", "1", failpoints=f"decode=hang:{stall}")
    wait_for(lambda: staged_embedding_parts(out) >= 4, proc, "four shards were staged")
    kill_session(proc)
    assert table_tracks(out) == ([], [])  # nothing committed: staged parts are invisible
    rerun = embed_process(catalog, out, "--shard-size", "2", "--workers", "1")
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log
    assert "resuming run" in log and "planned tracks are already staged" in log
    staged_before = int(log.split("resuming run ", 1)[1].split(": ", 1)[1].split(" ", 1)[0])
    assert staged_before >= 8
    assert table_tracks(out) == (good, bad)
    con = connect(out)
    assert con.execute("SELECT count(*), max(n_embedded) FROM runs").fetchone() == (1, len(good))


def test_kill_mid_commit_then_rerun_finishes_the_commit(small_catalog, small_labels, tmp_path):
    out = str(tmp_path / "out")
    catalog = str(small_catalog.manifest_path)
    proc = embed_process(catalog, out, "--windows", failpoints="commit.embeddings=exit")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 137, log
    embedded, failed = table_tracks(out)
    assert embedded == [] and failed == expected_tracks(small_labels)[1]  # died between two commit steps
    assert main(["embed", "--catalog", catalog, "--out", out, "--windows"]) == 0
    assert table_tracks(out) == expected_tracks(small_labels)
    con = connect(out)
    assert con.execute("SELECT count(*) FROM windows").fetchone() == (len(expected_tracks(small_labels)[0]),)
    assert con.execute("SELECT count(*) FROM runs").fetchone() == (1,)


def test_two_runs_started_together_on_one_table_leave_it_intact(small_catalog, small_labels, tmp_path):
    out = str(tmp_path / "out")
    catalog = str(small_catalog.manifest_path)
    procs = [embed_process(catalog, out, "--workers", "1", "--run-id", f"racer-{i}") for i in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert table_tracks(out) == expected_tracks(small_labels)
    assert connect(out).execute("SELECT count(*) FROM embeddings").fetchone() == (len(expected_tracks(small_labels)[0]),)


def test_unchanged_rerun_writes_nothing_and_vacuum_clears_abandoned_staging(small_catalog, tmp_path):
    out = str(tmp_path / "out")
    config = EmbedConfig(catalog=str(small_catalog.manifest_path), out=out)
    run_embed(config, QUIET)
    files_before = sorted(p for p in Path(out).rglob("*.parquet"))
    again = run_embed(config, QUIET)
    assert again.plan.has_work is False
    new_files = sorted(p for p in Path(out).rglob("*.parquet") if p not in files_before)
    assert all(p.parent.name == "runs" for p in new_files)  # only the runs row that says so
    store = TableStore(out)
    store.write_staged_json("abandoned", RUN_META, {"model": "x"})
    assert vacuum(out, staging_hours=24, retention_hours=168, dry_run=False).staging_removed == []
    assert vacuum(out, staging_hours=0, retention_hours=168, dry_run=False).staging_removed == ["abandoned"]
    assert store.staged_runs() == []


def test_plan_command_prints_without_doing(small_catalog, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["plan", "--catalog", str(small_catalog.manifest_path), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "18 new" in printed and "embed  " in printed
    assert not Path(out).exists()  # nothing written, not even empty tables
