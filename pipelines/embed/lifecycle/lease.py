"""Run leases: a process holds a run's staging folder from its claim until its commit is done, so that no run
adopts, commits or vacuums a live one.

The holder claims the staging (`StagedRun.claim`: a conditional write) and rewrites `lease.json` every
`ttl_s / 4` seconds from a background thread, through the commit: a commit that stalls past the TTL still
belongs to a live process. A holder that finds itself taken over or its staging folder gone (see
`StagedRun.lost_by`) has lost its work: it stops heartbeating and fails before committing, never reporting
success for rows that are not there.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import asdict

from catalog_embed.pipelines.embed.lifecycle.staging import LEASE_FILE, LeaseRecord, RunState, StagedRun, lease_ttl_s
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import RunLostError, StorageUnavailableError


class RunLease:
    """This process's claim on one run's staging folder, kept fresh by a daemon thread.

    Args:
        store: the output store.
        run_id: the run.
        ttl_s: how long the lease outlives its last heartbeat (None: `lease_ttl_s()`).
    """

    def __init__(self, store: TableStore, run_id: str, ttl_s: float | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.ttl_s = lease_ttl_s() if ttl_s is None else ttl_s
        self.owner = secrets.token_hex(8)
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, staged: StagedRun) -> bool:
        """Claim `staged` (absent or dead) and start heartbeating; False when another process claimed it first."""
        if not staged.claim(self.store, self.owner, self.ttl_s):
            return False
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{self.run_id}")
        self._thread.start()
        return True

    def acquire(self) -> RunLease:
        """Claim the run as it is now.

        Raises:
            RunLostError: it is live, committed or not ours, or another process claimed it at the same instant.
        """
        staged = StagedRun.read(self.store, self.run_id)
        if staged.state not in (RunState.ABSENT, RunState.DEAD) or not self.claim(staged):
            msg = f"run {self.run_id} could not be claimed: it is {staged.state.value} or was claimed by another process"
            raise RunLostError(msg)
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

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if self._renew():
                    return
            except StorageUnavailableError:
                # A missed beat: the lease outlives three more and the next one tries again. A store that stays
                # down fails the run's own reads and writes too, and they end the run resumable.
                continue

    def _renew(self) -> bool:
        """One heartbeat; True once heartbeating is over (the run is committed, or lost)."""
        staged = StagedRun.read(self.store, self.run_id)
        if staged.state is RunState.COMMITTED:
            return True  # committed (from the engine's graph, as Beam does, or by this process), staging removed
        self._lost = staged.lost_by(self.owner)
        if self._lost is not None:
            return True
        self._write(self.ttl_s)
        if StagedRun.read(self.store, self.run_id).state is RunState.COMMITTED:
            # The commit removed the staging between the read and the write: remove what the write recreated.
            self.store.drop_staging(self.run_id)
            return True
        return False

    def _write(self, ttl_s: float) -> None:
        self.store.write_staged_json(self.run_id, LEASE_FILE, asdict(LeaseRecord.mine(self.owner, ttl_s)))
