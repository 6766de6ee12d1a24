"""Helpers of the fault-injection tests: run `catalog-embed embed` as a process that can be killed, find and kill
an engine's worker processes, and read back what the tables hold."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.io.store import STAGING
from catalog_embed.schemas.tables import EMBEDDINGS
from catalog_embed.workers.failpoints import ENV as FAILPOINTS

ROOT = Path(__file__).resolve().parents[2]


def table_tracks(out: str) -> tuple[list[str], list[str]]:
    """Track ids in `embeddings` (live rows) and in `failures`, sorted, duplicates kept."""
    con = connect(out)
    embedded = [r[0] for r in con.execute("SELECT track_id FROM embeddings WHERE NOT deleted ORDER BY 1").fetchall()]
    failed = [r[0] for r in con.execute("SELECT track_id FROM failures ORDER BY 1").fetchall()]
    return embedded, failed


def expected_tracks(labels: list[dict]) -> tuple[list[str], list[str]]:
    """The good and the broken track ids of a demo catalog, sorted."""
    good = sorted(la["track_id"] for la in labels if la["broken"] is None)
    bad = sorted(la["track_id"] for la in labels if la["broken"] is not None)
    return good, bad


def catalog_of(small_catalog, folder: Path, keep) -> str:
    """A manifest of the demo tracks `keep` selects, their files copied into `folder` (a catalog of its own)."""
    folder.mkdir(parents=True)
    table = pq.read_table(small_catalog.manifest_path)
    rows = []
    for row in table.to_pylist():
        if keep(row["track_id"]) and Path(row["uri"]).exists():
            target = folder / Path(row["uri"]).name
            shutil.copy(row["uri"], target)
            rows.append({"track_id": row["track_id"], "uri": target.name})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


def embed_process(
    catalog: str, out: str, *extra: str, failpoints: str = "", env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`catalog-embed embed` in a session of its own (so that it and every process it starts can be killed), with
    `env` added to this process's environment."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    env.pop(FAILPOINTS, None)
    if failpoints:
        env[FAILPOINTS] = failpoints
    command = [sys.executable, "-m", "catalog_embed.pipelines.cli", "embed", "--catalog", catalog, "--out", out, *extra]
    return subprocess.Popen(
        command, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=as_a_shell_starts_it,
    )


def as_a_shell_starts_it() -> None:
    """A `preexec_fn`: SIGINT's default disposition in the child, as a shell gives the commands it starts.

    A disposition of "ignored" is inherited, and Python keeps SIGINT ignored when it starts so: the command would
    never see a Ctrl-C. Full-suite runs showed this test process with SIGINT ignored after some test that runs in
    it (which one was not found), and the Ctrl-C tests then waited for a run that could not be interrupted.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def staged_embedding_parts(out: str) -> int:
    """Embeddings part files staged by every run not yet committed (each marks one finished shard)."""
    return sum(1 for _ in Path(out, STAGING).glob(f"*/{EMBEDDINGS.name}/*.parquet"))


def wait_for(condition, proc: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    """Poll `condition()` until it holds; fail with the process's output if it exits or time runs out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.5)
    kill_session(proc)
    pytest.fail(f"timed out waiting for {what}: {proc.communicate()[0][-3000:]}")


class Process(NamedTuple):
    """A live process: its parent and its command line (or title, as Ray sets it)."""

    ppid: int
    command: str


def session_processes(proc: subprocess.Popen) -> dict[int, Process]:
    """Every live process in `proc`'s session (it and all it started: Ray's head processes, its workers and their
    decode children, Beam's SDK workers), by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != proc.pid:
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ProcessLookupError):
            continue
        if command:  # zombies have none
            found[int(entry.name)] = Process(ppid, command)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def kill_session(proc: subprocess.Popen) -> None:
    """kill -9 `proc` and everything in its session, as when the machine running a driver is lost."""
    for pid in session_processes(proc):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def finish(proc: subprocess.Popen, timeout_s: float = 400) -> str:
    """Wait for the driver to end and return its output. Whatever it left in its session is killed first: a driver
    ended by the failpoint `exit` cannot stop its helpers (Ray's head), and they hold its output pipe open."""
    try:
        proc.wait(timeout=timeout_s)
    finally:
        kill_session(proc)
    return proc.communicate()[0]
