"""Run leases: a live run's heartbeat, a lost run, and a run committed from an engine's graph."""

from __future__ import annotations

import time

import pytest

from catalog_embed.pipelines.embed.lifecycle.commit import commit_run
from catalog_embed.pipelines.embed.lifecycle.lease import RunLease
from catalog_embed.pipelines.embed.lifecycle.staging import RUN_META, read_lease
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import RunLostError
from tests.helpers.tables import run_row


@pytest.fixture
def store(tmp_path) -> TableStore:
    store = TableStore(str(tmp_path / "out"))
    store.ensure_tables()
    return store


def test_the_heartbeat_keeps_the_lease_fresh_and_release_stops_it(store):
    lease = RunLease(store, "r1", ttl_s=0.4).acquire()
    first = read_lease(store, "r1").heartbeat
    time.sleep(0.5)
    assert read_lease(store, "r1").heartbeat > first and read_lease(store, "r1").alive()
    lease.release()
    last = read_lease(store, "r1").heartbeat
    time.sleep(0.3)
    assert read_lease(store, "r1").heartbeat == last


def test_a_run_whose_staging_vanishes_is_lost(store):
    lease = RunLease(store, "r1", ttl_s=0.2).acquire()
    store.drop_staging("r1")
    time.sleep(0.3)
    with pytest.raises(RunLostError, match="lost its staging folder"):
        lease.check()
    lease.release()


def test_a_run_committed_from_the_engine_graph_is_not_lost_and_leaves_no_staging(store):
    lease = RunLease(store, "r1", ttl_s=0.2).acquire()
    store.write_staged_json("r1", RUN_META, {"model": "m"})
    commit_run(store, "r1", run_row("r1"))  # as Beam's last step does while the driver still heartbeats
    time.sleep(0.4)
    lease.check()
    lease.release()
    assert store.staged_runs() == []
