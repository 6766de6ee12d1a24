"""What a staged run is, and claiming a dead one: two real processes released at the same instant, one winner."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from catalog_embed.pipelines.embed.config import from_saved
from catalog_embed.pipelines.embed.lifecycle.staging import (
    LEASE_FILE,
    RUN_META,
    LeaseRecord,
    ResumeKey,
    RunState,
    StagedRun,
)
from catalog_embed.pipelines.embed.plan import RunLimits
from catalog_embed.pipelines.embed.vacuum import vacuum
from catalog_embed.pipelines.io.catalog import UriPolicy
from catalog_embed.pipelines.io.store import STAGING, TableStore
from catalog_embed.schemas.errors import ConfigError
from tests.helpers.faults import ROOT

KEY = ResumeKey("c.parquet", "mfcc-stats", "v1", "h1", ("stats",), False, RunLimits(1800, 1, 4096, 300), UriPolicy())
ROUNDS = 20


def _dead_run(store: TableStore, run_id: str) -> None:
    """A staging left by a run whose process ended (its lease expired a minute ago)."""
    store.write_staged_json(run_id, RUN_META, KEY.to_json())
    dead = LeaseRecord("deadbeef", "elsewhere", "", 1, "", time.time() - 180, time.time() - 60)
    store.write_staged_json(run_id, LEASE_FILE, asdict(dead))


# A claimant: reads every round's staging first (so both see it dead), then, at each round's instant, claims it as
# `embed` does (`claim_run`: the dead run of the same work, else a new run) and prints the run id it got.
_CLAIMANT = textwrap.dedent(
    """
    import json, sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from catalog_embed.pipelines.embed.config import from_saved
    from catalog_embed.pipelines.embed.job import claim_run
    from catalog_embed.pipelines.embed.lifecycle.staging import ResumeKey
    from catalog_embed.pipelines.io.store import TableStore
    root, me, key, rounds = Path(sys.argv[1]), sys.argv[2], from_saved(ResumeKey, json.loads(sys.argv[3])), int(sys.argv[4])
    (root / f"ready-{me}").touch()
    while not (root / "go").exists():
        time.sleep(0.01)
    start = float((root / "go").read_text())
    won = []
    for i in range(rounds):
        store = TableStore(str(root / f"out-{i:02d}"))
        while time.time() < start + 0.3 * i:
            pass  # spin: both processes leave the barrier within microseconds of each other
        lease = claim_run(store, None, key, datetime.now(UTC))
        lease.release()
        won.append(lease.run_id)
    print(json.dumps(won))
    """
)


def test_two_processes_claiming_one_dead_staging_at_the_same_instant_never_both_win(tmp_path):
    for i in range(ROUNDS):
        _dead_run(TableStore(str(tmp_path / f"out-{i:02d}")), "dead-run")
    env = {"PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMANT, str(tmp_path), me, json.dumps(KEY.to_json()), str(ROUNDS)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for me in ("a", "b")
    ]
    while not all((tmp_path / f"ready-{me}").exists() for me in ("a", "b")):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").write_text(str(time.time() + 1.0))
    claims = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for i, (a, b) in enumerate(zip(*claims, strict=True)):
        # Exactly one resumed the dead run; the other started a run of its own.
        assert sorted([a == "dead-run", b == "dead-run"]) == [False, True], (i, a, b)
        assert a != b
        store = TableStore(str(tmp_path / f"out-{i:02d}"))
        assert StagedRun.read(store, "dead-run").taken == frozenset({"deadbeef"})


def test_each_state_is_decided_from_the_staging(tmp_path):
    store = TableStore(str(tmp_path / "out"))
    assert StagedRun.read(store, "new").state is RunState.ABSENT
    _dead_run(store, "dead")
    assert StagedRun.read(store, "dead").state is RunState.DEAD
    assert StagedRun.read(store, "dead").why_not_resumable(KEY) is None
    other = ResumeKey(**{**asdict(KEY), "limits": RunLimits(60, 1, 4096, 300), "policy": UriPolicy()})
    assert "other work" in StagedRun.read(store, "dead").why_not_resumable(other)
    seen = StagedRun.read(store, "dead")
    assert seen.claim(store, "me", 60)
    assert not seen.claim(store, "late", 60)  # it saw the run dead too, but the run was taken meanwhile
    live = StagedRun.read(store, "dead")
    assert live.state is RunState.LIVE and live.lost_by("me") is None and "taken over" in live.lost_by("deadbeef")
    Path(store.staging_dir("notes")).mkdir(parents=True)
    Path(store.staging_dir("notes"), "todo.txt").write_text("mine")
    assert StagedRun.read(store, "notes").state is RunState.FOREIGN


def test_a_staging_holding_only_temporary_files_of_ours_is_vacuumed(tmp_path):
    out = tmp_path / "out"
    for run, name in (("r1", "lease.json"), ("r2", "run.json")):
        folder = out / STAGING / run
        folder.mkdir(parents=True)
        (folder / f"{name}.tmp-{'0' * 32}").write_text('{"owner": "x", "heart')  # a write a full disk cut short
    (out / STAGING / "r3").mkdir()
    (out / STAGING / "r3" / "lease.json.tmp-by-someone-else").write_text("x")
    report = vacuum(str(out), staging_hours=0, retention_hours=168, dry_run=False)
    assert report.staging_removed == ["r1", "r2"] and report.staging_foreign == ["r3"]
    assert sorted(p.name for p in (out / STAGING).iterdir()) == ["r3"]


def test_a_saved_key_with_a_renamed_field_does_not_read_back():
    saved = json.loads(json.dumps(KEY.to_json()))
    assert from_saved(ResumeKey, saved) == KEY
    saved["limits"]["max_seconds"] = saved["limits"].pop("max_duration_s")
    with pytest.raises(ConfigError, match="limits.max_seconds"):
        from_saved(ResumeKey, saved)
