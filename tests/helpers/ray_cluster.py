"""A multi-node Ray cluster on this machine: a head and worker nodes, each started with `ray start --block` as a
process of our own (its own raylet, object store and agents, on free loopback ports), so that one node can lose
its raylet while the others run on, and every process a node started can be found and ended.

Every node runs in a session of its own: the raylet, its workers and their decode children share it, which is how
`stop` finds them all (never `ray stop`, which would stop every Ray instance on the machine, other engineers'
included).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.job_submission import JobSubmissionClient
from ray.util.state import StateApiClient
from ray.util.state.common import ListApiOptions, StateResource

RAY = str(Path(sys.executable).parent / "ray")
_START_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """The live processes of session `sid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Node:
    """One `ray start --block` process and the session it leads.

    Attributes:
        name: 'head', or the worker node's name in the test.
        args: the node's own `ray start` arguments (resources, CPUs).
        process: the `ray start --block` process (None once stopped).
        node_id: Ray's id of the node, once it has joined (a restarted node has a new one).
    """

    name: str
    args: list[str]
    process: subprocess.Popen | None = None
    node_id: str = ""

    def raylet_pid(self) -> int:
        """The node's raylet process."""
        for pid in session_pids(self.process.pid):
            if "/raylet/raylet " in command_line(pid):
                return pid
        msg = f"node {self.name}: no raylet runs"
        raise LookupError(msg)

    def kill_raylet(self) -> None:
        """kill -9 the raylet, as when a node's machine is lost; `ray start --block` then ends the node's other
        processes, and the raylet's workers exit when it goes."""
        os.kill(self.raylet_pid(), signal.SIGKILL)

    def stop(self) -> None:
        """kill -9 every process of the node's session and reap the `ray start` process."""
        if self.process is None:
            return
        for pid in session_pids(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.process = None


@dataclass
class RayCluster:
    """A head (no CPUs: nothing of a job lands there but the job's driver) and worker nodes on loopback.

    Attributes:
        temp_dir: one short temp dir for all nodes (Ray's sockets live there; Unix socket paths are limited).
        token: the cluster's auth token (Ray 2.60 clusters use token authentication).
        dashboard: the head's dashboard port, which serves the Jobs and the State APIs.
        gcs: the head's GCS address, which worker nodes join.
        nodes: by name, the head's included.
        jobs: the Jobs API client, once the head is up.
    """

    object_store_mb: int = 100
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rayn-", dir="/tmp"))
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    dashboard: int = field(default_factory=free_port)
    gcs: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    nodes: dict[str, Node] = field(default_factory=dict)
    jobs: JobSubmissionClient | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # Tear down at once when signalled instead of draining for 30 s.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start_head(self) -> JobSubmissionClient:
        """Start the head and wait for its Jobs API."""
        args = [
            "--head", f"--port={self.gcs.rpartition(':')[2]}", "--num-cpus=0", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
            f"--ray-client-server-port={free_port()}",
        ]
        self._start(Node("head", args))
        deadline = time.monotonic() + _START_S
        while True:
            self._check_alive("head")
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{self.dashboard}", headers=self.headers)
                client.list_jobs()
                self.jobs = client
                return client
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def start_worker(self, name: str, *args: str) -> None:
        """Start (or restart, with the same arguments when none are given) the worker node `name` and wait until
        the head counts it alive."""
        node = self.nodes.get(name)
        node_args = list(args) or (node.args if node else [])
        if node is not None:
            node.stop()
        self._start(Node(name, [f"--address={self.gcs}", *node_args]))
        others = {n.node_id for n in self.nodes.values()}
        deadline = time.monotonic() + _START_S
        while not (joined := {n["node_id"] for n in self.alive_nodes() if not n["is_head_node"]} - others):
            self._check_alive(name)
            if time.monotonic() > deadline:
                msg = f"worker node {name} did not join in {_START_S} s"
                raise TimeoutError(msg)
            time.sleep(0.5)
        (self.nodes[name].node_id,) = joined

    def ensure(self, name: str) -> None:
        """Start the worker node `name` again, with its arguments, unless it is up."""
        node = self.nodes[name]
        alive = {n["node_id"] for n in self.alive_nodes()}
        if node.process is None or node.process.poll() is not None or node.node_id not in alive:
            self.start_worker(name)

    def wait_dead(self, node_id: str, timeout_s: float = 60) -> None:
        """Wait until the head has marked node `node_id` dead (its raylet stopped answering)."""
        deadline = time.monotonic() + timeout_s
        while node_id in {n["node_id"] for n in self.alive_nodes()}:
            if time.monotonic() > deadline:
                msg = f"node {node_id} still alive {timeout_s} s after its raylet was killed"
                raise TimeoutError(msg)
            time.sleep(0.5)

    def _start(self, node: Node) -> None:
        # Free ports for every per-node server: several nodes share this machine (and other engineers' Ray
        # instances hold the defaults).
        ports = [
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        ]
        node.process = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
             f"--object-store-memory={self.object_store_mb << 20}", "--disable-usage-stats", *ports, *node.args],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        node.args = [a for a in node.args if not a.startswith("--address=")]
        self.nodes[node.name] = node

    def _check_alive(self, name: str) -> None:
        process = self.nodes[name].process
        if process is None or process.poll() is not None:
            msg = f"`ray start` of node {name} exited with status {process and process.returncode}"
            raise RuntimeError(msg)

    def state(self, resource: StateResource, *filters: tuple[str, str, str], detail: bool = True) -> list[dict]:
        """Rows of Ray's State API (tasks, actors, nodes) as dicts, read through the head's dashboard."""
        client = StateApiClient(f"http://127.0.0.1:{self.dashboard}", headers=self.headers)
        rows = client.list(resource, ListApiOptions(limit=10_000, detail=detail, filters=list(filters)),
                           raise_on_missing_output=False)
        return [row if isinstance(row, dict) else row.__dict__ for row in rows]

    def alive_nodes(self) -> list[dict]:
        try:
            return self.state(StateResource.NODES, ("state", "=", "ALIVE"))
        except Exception:  # noqa: BLE001 (the head is still coming up)
            return []

    def node_ids(self, resource: str) -> set[str]:
        """Ids of the nodes, alive or dead, whose total resources include `resource`."""
        return {n["node_id"] for n in self.state(StateResource.NODES) if n["resources_total"].get(resource)}

    def stop(self) -> None:
        """Stop every node, workers first, and remove the temp dir."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            self.nodes[name].stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def describe(self) -> str:
        return json.dumps({name: node.args for name, node in self.nodes.items()})
