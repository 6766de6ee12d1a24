"""Run leases: which process owns a run's staging folder, so that no run adopts, commits or vacuums a live one.

A run writes `lease.json` into its staging folder when it starts and rewrites it every `ttl_s / 4` seconds from a
background thread. Another process treats the run as alive while the lease is fresh (its `expires_at` is in the
future) and, on the same machine, while the owning process still exists; only a dead run may be resumed or
vacuumed. A run that finds its lease rewritten by another owner, or its staging folder gone, has lost its work: it
stops heartbeating and fails before committing, never reporting success for rows that are not there.

Liveness across machines rests on clocks: the lease TTL (2 minutes) is far above any sane clock skew.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import RunLostError

LEASE_FILE = "lease.json"
DEFAULT_TTL_S = 120.0


def _boot_id() -> str:
    """Identifies this kernel's boot: pids are only comparable between processes that share it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The start time of a process (clock ticks since boot), so that a reused pid is not taken for the owner."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass(frozen=True)
class LeaseRecord:
    """What `lease.json` holds."""

    owner: str
    host: str
    boot_id: str
    pid: int
    pid_start: str
    heartbeat: float
    expires_at: float

    def alive(self, now: float | None = None) -> bool:
        """Whether the owner may still be running: the lease is fresh and, on this machine, its process exists."""
        now = time.time() if now is None else now
        if now > self.expires_at:
            return False
        if self.host == socket.gethostname() and self.boot_id and self.boot_id == _boot_id():
            return _process_start(self.pid) == self.pid_start
        return True

    def describe(self, now: float | None = None) -> str:
        """Who holds the lease, for error messages."""
        now = time.time() if now is None else now
        return f"process {self.pid} on {self.host}, last heartbeat {now - self.heartbeat:.0f} s ago"


def read_lease(store: TableStore, run_id: str) -> LeaseRecord | None:
    """The lease on a run's staging folder, or None when it has none (or an unreadable one)."""
    record = store.read_staged_json(run_id, LEASE_FILE)
    try:
        return LeaseRecord(**record) if record is not None else None
    except TypeError:
        return None


class RunLease:
    """This process's lease on one run's staging folder, kept fresh by a daemon thread.

    Args:
        store: the output store.
        run_id: the run.
        ttl_s: how long the lease outlives its last heartbeat.
    """

    def __init__(self, store: TableStore, run_id: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.store = store
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.owner = secrets.token_hex(8)
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLease:
        """Write the lease and start heartbeating."""
        self._write(self.ttl_s)
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{self.run_id}")
        self._thread.start()
        return self

    def extend(self, seconds: float) -> None:
        """Stop heartbeating and leave a lease valid for `seconds`: a job that runs on after this process exits
        (a Dataflow job launched from here) keeps its staging from being adopted or vacuumed meanwhile."""
        self.release()
        self._write(seconds)

    def release(self) -> None:
        """Stop heartbeating (the staging folder, lease included, is removed by the commit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def check(self) -> None:
        """Raise RunLostError once the heartbeat has found the run taken over or its staging folder removed (cheap:
        no I/O, so it can run after every shard)."""
        if self._lost is not None:
            raise RunLostError(self._lost)

    def _why_lost(self, record: LeaseRecord | None) -> str | None:
        if record is None:
            return (
                f"run {self.run_id} lost its staging folder {self.store.staging_dir(self.run_id)} while running "
                "(removed by another run or by `catalog-embed vacuum`): this run committed nothing; run again"
            )
        if record.owner != self.owner:
            return (
                f"run {self.run_id} was taken over by {record.describe()} while running: this run committed nothing; "
                "its staged tracks are committed by that run, or embedded again by the next"
            )
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            record = read_lease(self.store, self.run_id)
            if record is None and self.store.is_committed(self.run_id):
                return  # committed from the engine's graph (Beam), whose commit removed the staging
            self._lost = self._why_lost(record)
            if self._lost is not None:
                return
            self._write(self.ttl_s)
            if self.store.is_committed(self.run_id):
                # The commit removed the staging between the read and the write: remove what the write recreated.
                self.store.drop_staging(self.run_id)
                return

    def _write(self, ttl_s: float) -> None:
        now = time.time()
        pid = os.getpid()
        record = LeaseRecord(self.owner, socket.gethostname(), _boot_id(), pid, _process_start(pid), now, now + ttl_s)
        self.store.write_staged_json(self.run_id, LEASE_FILE, asdict(record))
