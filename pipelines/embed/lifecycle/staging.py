"""What a staged run is, decided in one place, and claiming one so that only one process ever wins it.

A run stages its rows under `_staging/<run_id>/` and writes there, beside its parts:

    run.json                the resume key (`ResumeKey`): the work the run was staged for
    lease.json              who holds the run (`LeaseRecord`), refreshed by the holder's heartbeat (`lease.py`)
    taken-<owner>.json      the claim that took the run over from the dead holder `<owner>`

`StagedRun.read` is the only code that decides a staged run's state (`RunState`); claiming, resuming, the lease
heartbeat, the commit and `vacuum` all ask it. Liveness: a lease is alive while fresh (its `expires_at` is in the
future) and, on the same machine, while its process exists. Liveness across machines rests on clocks: the lease
TTL (2 minutes) is far above any sane clock skew.

A claim is a conditional write (`TableStore.create_staged_json`): a new run creates `lease.json` only if absent; a
dead run is taken by creating `taken-<its dead holder>.json` only if absent. Of two processes claiming one staging
at the same instant exactly one creates the file; the other learns at once that it lost, and starts a run of its
own. A holder that finds `taken-<itself>.json`, or another owner in `lease.json`, has lost the run.
"""

from __future__ import annotations

import enum
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field

from catalog_embed.pipelines.embed.config import from_saved
from catalog_embed.pipelines.embed.plan import RunLimits
from catalog_embed.pipelines.io.catalog import UriPolicy
from catalog_embed.pipelines.io.store import TEMP_SUFFIX, TableStore, app_id, run_id_problem
from catalog_embed.schemas.errors import ConfigError, RunLostError
from catalog_embed.schemas.tables import RUNS

RUN_META = "run.json"
LEASE_FILE = "lease.json"
_TAKEN = "taken-{owner}.json"
_UNLEASED = "unleased"  # the owner named by the claim on a dead run that never wrote a lease
# The files a run writes at the top of its staging folder, and the temporary files their atomic writes leave on
# a full disk: a folder holding only these is a run's, even without its run.json.
_BOOKKEEPING = re.compile(rf"(run\.json|lease\.json|taken-[0-9a-z]+\.json)({TEMP_SUFFIX.pattern})?")
TTL_ENV = "CATALOG_EMBED_LEASE_TTL_S"
DEFAULT_TTL_S = 120.0


def lease_ttl_s() -> float:
    """How long a lease outlives its last heartbeat: `CATALOG_EMBED_LEASE_TTL_S` seconds, else 2 minutes.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    text = os.environ.get(TTL_ENV)
    if text is None:
        return DEFAULT_TTL_S
    try:
        ttl = float(text)
    except ValueError:
        ttl = 0.0
    if not ttl > 0:
        msg = f"{TTL_ENV}={text!r} must be a positive number of seconds (unset: {DEFAULT_TTL_S:g})"
        raise ConfigError(msg)
    return ttl


@dataclass(frozen=True)
class ResumeKey:
    """What a run plans and computes, saved as its run.json. An interrupted run with the same key can be resumed;
    one for another catalog, encoder, layer set, timeline, limits or URI policy never is (its staged rows would
    not belong)."""

    catalog: str
    model: str
    model_version: str
    feature_hash: str
    layers: tuple[str, ...]
    windows: bool
    limits: RunLimits
    policy: UriPolicy

    def to_json(self) -> dict[str, object]:
        """The key as run.json holds it."""
        return asdict(self)


class RunState(enum.Enum):
    """What a staged run is.

    ABSENT: nothing is staged under the id and no run committed it (a new run may claim it).
    FOREIGN: the folder was not written by an embed run: never claimed, resumed or vacuumed.
    LIVE: its holder may be running: never claimed, resumed or vacuumed.
    DEAD: an embed run whose holder is gone: it may be claimed (resumed), or vacuumed once old.
    COMMITTED: its runs row is committed: whatever is left of its staging is leftovers.
    """

    ABSENT = "absent"
    FOREIGN = "foreign"
    LIVE = "live"
    DEAD = "dead"
    COMMITTED = "committed"


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

    @classmethod
    def mine(cls, owner: str, ttl_s: float) -> LeaseRecord:
        """A lease for `owner`, this process, valid for `ttl_s` from now."""
        now = time.time()
        pid = os.getpid()
        return cls(owner, socket.gethostname(), _boot_id(), pid, _process_start(pid), now, now + ttl_s)

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


def is_committed(store: TableStore, run_id: str) -> bool:
    """Whether the run's `runs` row is committed (its commit's last step, made once per run)."""
    return store.committed(RUNS, app_id(run_id)) is not None


@dataclass(frozen=True)
class StagedRun:
    """One staged run as it is now; `read` is the only code that decides its state.

    Attributes:
        run_id: the run.
        state: what it is (see `RunState`).
        meta: its run.json (the resume key as saved), or None.
        lease: its lease, or None.
        taken: the holders it was taken over from (its `taken-<owner>.json` files).
    """

    run_id: str
    state: RunState
    meta: dict[str, object] | None = None
    lease: LeaseRecord | None = None
    taken: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def read(cls, store: TableStore, run_id: str, now: float | None = None) -> StagedRun:
        """Read a staged run's files and decide its state."""
        if run_id_problem(run_id) is not None:
            return cls(run_id, RunState.FOREIGN)
        if is_committed(store, run_id):
            return cls(run_id, RunState.COMMITTED)
        entries = store.staged_entries(run_id)
        if not entries:
            return cls(run_id, RunState.ABSENT)
        meta = store.read_staged_json(run_id, RUN_META)
        lease = read_lease(store, run_id)
        prefix, suffix = _TAKEN.split("{owner}")
        taken = frozenset(e[len(prefix) : -len(suffix)] for e in entries if e.startswith(prefix) and e.endswith(suffix))
        if meta is None and not all(_BOOKKEEPING.fullmatch(entry) for entry in entries):
            state = RunState.FOREIGN
        elif lease is not None and lease.alive(now) and lease.owner not in taken:
            state = RunState.LIVE
        else:
            state = RunState.DEAD
        return cls(run_id, state, meta, lease, taken)

    def why_not_resumable(self, key: ResumeKey) -> str | None:
        """Why this run cannot be resumed for `key`, or None when it can (it is dead and staged for that work)."""
        if self.state is RunState.COMMITTED:
            return "it is already committed"
        if self.state is RunState.FOREIGN or self.meta is None:
            return "its staging folder was not written by an embed run"
        if self.state is RunState.LIVE:
            return f"it is running now ({self.lease.describe()})"
        try:
            staged = from_saved(ResumeKey, self.meta)
        except ConfigError:
            staged = None
        if staged != key:
            return "it was staged for other work (another catalog, encoder, layers or limits)"
        return None

    def claim(self, store: TableStore, owner: str, ttl_s: float) -> bool:
        """Take this run for `owner` (a fresh lease valid for `ttl_s`) by a conditional write; False when another
        process took it first. Only an absent or dead run can be claimed."""
        if self.state not in (RunState.ABSENT, RunState.DEAD):
            msg = f"run {self.run_id} is {self.state.value}: only an absent or a dead run can be claimed"
            raise ValueError(msg)
        record = asdict(LeaseRecord.mine(owner, ttl_s))
        if self.state is RunState.ABSENT:
            return store.create_staged_json(self.run_id, LEASE_FILE, record)
        before = self.lease.owner if self.lease is not None else _UNLEASED
        if not store.create_staged_json(self.run_id, _TAKEN.format(owner=before), {"owner": owner}):
            return False
        store.write_staged_json(self.run_id, LEASE_FILE, record)
        return True

    def lost_by(self, owner: str) -> str | None:
        """Why `owner` no longer holds this run (taken over, or its staging removed), or None while it does."""
        if self.state is RunState.COMMITTED:
            return None
        if self.lease is None:
            return (
                f"run {self.run_id} lost its staging folder while running (removed by another run or by "
                "`catalog-embed vacuum`): this run committed nothing; run again"
            )
        if self.lease.owner != owner or owner in self.taken:
            return (
                f"run {self.run_id} was taken over by {self.lease.describe()} while running: this run committed "
                "nothing; its staged tracks are committed by that run, or embedded again by the next"
            )
        return None

    def require_held(self, owner: str) -> None:
        """Raise RunLostError unless `owner` still holds this run: never commit, or report, another's rows."""
        why = self.lost_by(owner)
        if why is not None:
            raise RunLostError(why)


def staged_runs(store: TableStore) -> list[StagedRun]:
    """Every folder under `_staging/`, read (see `StagedRun.read`), in name order."""
    now = time.time()
    return [StagedRun.read(store, name, now) for name in store.staged_runs()]
