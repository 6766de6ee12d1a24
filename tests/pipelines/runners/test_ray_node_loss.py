"""A Ray cluster that loses a node mid-run (issue 20, item 5).

A real three-node cluster on this machine (`tests.helpers.ray_cluster`): a head with no CPUs (it runs the job's
driver and nothing else), a CPU node for decoding (2 CPUs) and an encoder node (1 CPU and the custom resource
`encoder`, which the encoder actors require through `--encoder-resource encoder=1`: a GPU node's stand-in). The
embed command goes in through the Ray Jobs API as `ray job submit` sends it; a decode failpoint slows every track so
that the kill lands mid-run. Once two shards are staged, one worker node's raylet is killed with SIGKILL (its
workers, decode children and object store go with it); when the head has marked the node dead, the node is started
again, as a cluster's autoscaler or KubeRay replaces a lost node.

Each case requires: the job succeeds, or fails with exit 75 and a rerun succeeds; the tables then hold every good
track exactly once and failures rows for the broken files only; and, from Ray's State API (task and actor-task
events carry the node they ran on), every decode task ran on a CPU node and every encoder call on a node with the
`encoder` resource, before the kill and over the whole run.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.job_submission import JobStatus
from ray.util.state.common import StateResource

from catalog_embed.schemas.errors import EX_TEMPFAIL
from catalog_embed.workers.failpoints import ENV as FAILPOINTS
from tests.helpers.faults import expected_tracks, staged_embedding_parts, table_tracks
from tests.helpers.ray_cluster import RayCluster

pytestmark = pytest.mark.slow

_JOB_S = 400
_SHARD_SIZE = 2
# Seconds each track's decode is slowed by: 18 tracks in 9 shards on 2 decode workers then take about 10 s of
# decoding, long enough for the kill to land while shards are still in flight.
_DECODE_DELAY_S = 1.0
_DECODE_TASK = "Map(_decode_shard)"
_ENCODER_CALL = "MapWorker(Map(_EmbedShard)).submit"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    cluster = RayCluster()
    try:
        cluster.start_head()
        cluster.start_worker("decode", "--num-cpus=2")
        cluster.start_worker("encoder", "--num-cpus=1", '--resources={"encoder": 1}')
        yield cluster
    finally:
        cluster.stop()


def _submit(cluster: RayCluster, catalog: Path, out: Path, failpoints: str = "") -> str:
    command = [
        str(Path(sys.executable).parent / "catalog-embed"), "embed", "--runner", "ray", "--address", "auto",
        "--catalog", str(catalog), "--out", str(out), "--model", "mfcc-stats", "--workers", "2",
        "--shard-size", str(_SHARD_SIZE), "--encoder-resource", "encoder=1",
    ]
    env = {FAILPOINTS: failpoints} if failpoints else {}
    return cluster.jobs.submit_job(entrypoint=shlex.join(command), runtime_env={"env_vars": env})


def _wait(cluster: RayCluster, job: str) -> JobStatus:
    deadline = time.monotonic() + _JOB_S
    while not (status := cluster.jobs.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, f"job still {status} after {_JOB_S} s: {cluster.jobs.get_job_logs(job)[-3000:]}"
        time.sleep(1)
    return status


def _placement(cluster: RayCluster, job: str) -> dict[str, set[str]]:
    """The nodes each kind of work of `job` ran on, from Ray's task events (an actor task's event names the node
    of the actor that ran it, so a restarted actor's calls show its new node)."""
    job_id = cluster.jobs.get_job_info(job).job_id
    ran: dict[str, set[str]] = {_DECODE_TASK: set(), _ENCODER_CALL: set()}
    for task in cluster.state(StateResource.TASKS, ("job_id", "=", job_id)):
        if task["name"] in ran and task["node_id"]:
            ran[task["name"]].add(task["node_id"])
    return ran


def _assert_placed(cluster: RayCluster, job: str) -> None:
    ran = _placement(cluster, job)
    encoder_nodes = cluster.node_ids("encoder")
    cpu_nodes = cluster.node_ids("CPU") - encoder_nodes
    assert ran[_DECODE_TASK] and ran[_DECODE_TASK] <= cpu_nodes, (ran, cpu_nodes)
    assert ran[_ENCODER_CALL] and ran[_ENCODER_CALL] <= encoder_nodes, (ran, encoder_nodes)


@pytest.mark.parametrize("victim", ["decode", "encoder"])
def test_a_run_survives_losing_a_worker_node(cluster, victim, small_catalog, small_labels, tmp_path):
    good, bad = expected_tracks(small_labels)
    for name in ("decode", "encoder"):
        cluster.ensure(name)  # a node an earlier case left dead
    out = tmp_path / "tables"
    started = time.monotonic()
    job = _submit(cluster, small_catalog.manifest_path, out, failpoints=f"decode=sleep({_DECODE_DELAY_S})")
    deadline = time.monotonic() + _JOB_S
    while staged_embedding_parts(str(out)) < 2:
        status = cluster.jobs.get_job_status(job)
        assert not status.is_terminal(), f"job {status} before the kill: {cluster.jobs.get_job_logs(job)[-3000:]}"
        assert time.monotonic() < deadline, "no shard was staged"
        time.sleep(0.2)
    _assert_placed(cluster, job)

    lost = cluster.nodes[victim].node_id
    cluster.nodes[victim].kill_raylet()
    staged_at_kill = staged_embedding_parts(str(out))
    killed = time.monotonic()
    assert not cluster.jobs.get_job_status(job).is_terminal()
    assert staged_at_kill < len(good + bad) // _SHARD_SIZE, "the kill landed after every shard was staged"
    cluster.wait_dead(lost)
    cluster.ensure(victim)
    status = _wait(cluster, job)
    info = cluster.jobs.get_job_info(job)
    logs = cluster.jobs.get_job_logs(job)
    outcome = f"{status.value} (exit {info.driver_exit_code})"
    if status != JobStatus.SUCCEEDED:
        # The only other outcome allowed: a resumable failure, and then a rerun finishes the run.
        assert (status, info.driver_exit_code) == (JobStatus.FAILED, EX_TEMPFAIL), logs[-3000:]
        rerun = _submit(cluster, small_catalog.manifest_path, out)
        assert _wait(cluster, rerun) == JobStatus.SUCCEEDED, cluster.jobs.get_job_logs(rerun)[-3000:]
        outcome += ", rerun succeeded"
    elapsed = time.monotonic() - started
    print(f"\n{victim} node lost {killed - started:.0f} s into the run with {staged_at_kill} of 9 shards staged: "
          f"{outcome}; {elapsed:.0f} s from submit to done")

    assert table_tracks(str(out)) == (good, bad)
    _assert_placed(cluster, job)
