"""Supervised decode children: order, exact attribution of crashes and hangs, retry after an external kill, no
orphans when the supervisor itself is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from catalog_embed.schemas.records import TrackFailure, WorkItem
from catalog_embed.workers.isolation import IsolatedPool
from tests.helpers.faults import alive


class ScriptedStage:
    """Behaves as each item's uri says: 'crash' segfaults, 'hang' never returns, 'slow:<dir>' records its pid
    in <dir> and sleeps the first time, 'stuck:<dir>' records its pid and never returns, 'orphaned:<dir>' records its
    pid and returns once its supervisor is gone, 'nice' answers the child's nice value, anything else echoes the uri
    upper-cased."""

    def setup(self) -> None:
        """Nothing to build."""

    def __call__(self, item: WorkItem) -> str:
        if item.uri == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if item.uri == "hang":
            time.sleep(3600)
        if item.uri.startswith("stuck:"):
            (Path(item.uri[6:]) / "pid").write_text(str(os.getpid()))
            time.sleep(3600)
        if item.uri.startswith("orphaned:"):
            supervisor = os.getppid()
            (Path(item.uri[9:]) / "pid").write_text(str(os.getpid()))
            while os.getppid() == supervisor:
                time.sleep(0.01)
        if item.uri.startswith("slow:"):
            marker = Path(item.uri[5:]) / "pid"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(30)
        if item.uri == "raise":
            raise IndexError("decoder bug")
        if item.uri == "nice":
            return str(os.nice(0))
        return item.uri.upper()


def _items(*uris: str) -> list[WorkItem]:
    return [WorkItem(f"t{i}", uri, "fp") for i, uri in enumerate(uris)]


def test_results_keep_order_and_each_fault_is_charged_to_its_own_item():
    items = _items("a", "crash", "b", "hang", "raise", "c", "d")
    with IsolatedPool(ScriptedStage(), workers=2, timeout_s=3.0, memory_mb=1024) as pool:
        results = [result for result, _seconds in pool.imap(items, ahead=4)]
    assert results[0] == "A" and results[2] == "B" and results[5:] == ["C", "D"]
    assert isinstance(results[1], TrackFailure) and results[1].error_type == "DecoderCrashed"
    assert "SIGSEGV" in results[1].message
    assert results[1].item.track_id == "t1"
    assert isinstance(results[3], TrackFailure) and results[3].error_type == "DecodeTimeout"
    assert results[3].item.track_id == "t3"
    assert isinstance(results[4], TrackFailure) and results[4].error_type == "IndexError"


def test_children_run_at_the_niceness_they_are_given():
    """The local runner's decode children yield the cores to the encoder (workers/overlap.py)."""
    own = os.nice(0)
    for niceness in (0, 10):
        with IsolatedPool(ScriptedStage(), workers=1, timeout_s=30.0, memory_mb=1024, niceness=niceness) as pool:
            [(answer, _seconds)] = pool.imap(_items("nice"), ahead=1)
        assert int(answer) == min(own + niceness, 19)


def test_a_child_killed_from_outside_costs_a_retry_not_a_track(tmp_path):
    items = _items("a", f"slow:{tmp_path}", "b")
    marker = tmp_path / "pid"

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    with IsolatedPool(ScriptedStage(), workers=1, timeout_s=60.0, memory_mb=1024) as pool:
        results = [result for result, _seconds in pool.imap(items, ahead=2)]
    killer.join()
    assert results == ["A", f"SLOW:{str(tmp_path).upper()}", "B"]


def test_a_read_ahead_smaller_than_the_pool_never_stalls():
    """Regression: after yielding, the pool must hand out more items before it waits on its children."""
    results: list[object] = []

    def consume() -> None:
        with IsolatedPool(ScriptedStage(), workers=2, timeout_s=30.0, memory_mb=1024) as pool:
            results.extend(result for result, _seconds in pool.imap(_items("a", "b", "c", "d"), ahead=1))

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert results == ["A", "B", "C", "D"]


def _kill_the_supervisor_of(uri: str, tmp_path: Path) -> str:
    """Run a supervisor decoding `uri` (which records its child's pid in tmp_path), kill -9 it once the child is
    busy, wait for the child to end; return what both wrote to their shared stderr."""
    script = (
        "from tests.workers.test_isolation import ScriptedStage, _items\n"
        "from catalog_embed.workers.isolation import IsolatedPool\n"
        "pool = IsolatedPool(ScriptedStage(), workers=1, timeout_s=3600.0, memory_mb=1024)\n"
        f"list(pool.imap(_items({uri!r}), ahead=1))\n"
    )
    root = Path(__file__).resolve().parents[2]
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as sink:  # the child writes to the same stderr as its supervisor, as on a terminal
        supervisor = subprocess.Popen([sys.executable, "-c", script], cwd=root, stderr=sink,
                                      env=dict(os.environ, PYTHONPATH=str(root)))
    marker = tmp_path / "pid"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(marker.read_text())
    supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 30  # the child polls its parent every second
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(child)
    return stderr.read_text()


def test_a_child_stuck_in_a_decoder_ends_when_its_supervisor_is_killed(tmp_path):
    """kill -9 of the supervisor (a lost Ray worker, a killed driver) must not leave a hung decoder behind."""
    _kill_the_supervisor_of(f"stuck:{tmp_path}", tmp_path)


def test_a_child_whose_supervisor_was_killed_exits_without_a_traceback(tmp_path):
    """A decode that finishes after its driver was killed -9 has nobody to send its result to: the child ends
    quietly, not with a BrokenPipeError traceback on the terminal the driver shared."""
    stderr = _kill_the_supervisor_of(f"orphaned:{tmp_path}", tmp_path)
    assert "Traceback" not in stderr, stderr
