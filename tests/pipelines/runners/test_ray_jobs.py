"""A real Ray cluster on this machine: `ray start --head` on loopback, the embed command submitted through the Ray
Jobs API exactly as a user would (`--runner ray --address auto`), the table checked, the head stopped."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES, RUNS

pytestmark = pytest.mark.slow

_HEAD_START_S = 120
_JOB_S = 300
_TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[JobSubmissionClient]:
    """A one-node cluster: `ray start --head --block` as our own child process, stopped by signalling it (not
    `ray stop`, which would stop every Ray instance on the machine)."""
    token = secrets.token_hex(16)
    dashboard = _free_port()
    env = {
        **os.environ,
        # An explicit token: the cluster and this client share it whatever ~/.ray holds.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # Tear down at once when signalled instead of draining for 30 s.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    # A short temp dir of our own: Ray's sockets live there and Unix socket paths are limited to ~100 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            f"--port={_free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            # Free ports for the per-node agents too: a `ray.init` instance started by another test at the same
            # time (xdist) holds the default ones, and the head's job agent then never comes up.
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}", f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = _connect(f"http://127.0.0.1:{dashboard}", token, head)
        yield client
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        # The session's logs and sockets: nothing uses them once the head is down.
        shutil.rmtree(temp_dir, ignore_errors=True)


def _connect(url: str, token: str, head: subprocess.Popen) -> JobSubmissionClient:
    deadline = time.monotonic() + _HEAD_START_S
    while True:
        if head.poll() is not None:
            pytest.fail(f"`ray start --head` exited with status {head.returncode}")
        try:
            client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
            client.list_jobs()
            return client
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _submit(client: JobSubmissionClient, entrypoint: str) -> str:
    """Submit, waiting for the head's job agent: the dashboard answers before the agent has registered with it."""
    deadline = time.monotonic() + _HEAD_START_S
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_the_embed_command_runs_as_a_ray_job(ray_head, small_catalog, small_labels, tmp_path):
    out = tmp_path / "tables"
    command = [
        str(Path(sys.executable).parent / "catalog-embed"), "embed", "--runner", "ray", "--address", "auto",
        "--catalog", str(small_catalog.manifest_path), "--out", str(out), "--workers", "2", "--shard-size", "8",
    ]
    job_id = _submit(ray_head, shlex.join(command))
    deadline = time.monotonic() + _JOB_S
    while (status := ray_head.get_job_status(job_id)) not in _TERMINAL:
        assert time.monotonic() < deadline, f"job still {status} after {_JOB_S} s"
        time.sleep(1)
    logs = ray_head.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    store = TableStore(str(out))
    good = sorted(label["track_id"] for label in small_labels if label["broken"] is None)
    bad = sorted(label["track_id"] for label in small_labels if label["broken"] is not None)
    assert sorted(store.read(EMBEDDINGS, ["track_id"])["track_id"].to_pylist()) == good
    assert sorted(store.read(FAILURES, ["track_id"])["track_id"].to_pylist()) == bad
    (run,) = store.read(RUNS).to_pylist()
    assert (run["status"], run["runner"], run["n_embedded"]) == ("succeeded", "ray", len(good))
    assert "succeeded:" in logs
