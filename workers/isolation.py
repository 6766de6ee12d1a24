"""Run a per-track stage in supervised child processes, so hostile input costs one track, never the run.

Decoders crash (FFmpeg segfaults on some truncated streams), hang, or balloon in memory on hostile files. Each
child process handles one item at a time, so when a child dies or overruns its timeout the supervisor knows exactly
which item it held: that item becomes a `TrackFailure`, the child is replaced, and the other items go on. General
process pools cannot promise that attribution (a child that dies between taking a task and acknowledging it leaves
the pool guessing), which is why this module exists.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from catalog_embed.schemas.errors import RetryableError, WorkerError
from catalog_embed.schemas.records import TrackFailure, WorkItem

_READY = "ready"
_PARENT_POLL_S = 1.0


@dataclass
class _Child:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    index: int | None = None  # position of the item it holds
    started: float = 0.0
    ready: bool = False  # set up and waiting for items (start-up does not count against an item's timeout)


class IsolatedPool:
    """A fixed number of child processes, each running `stage` on one item at a time.

    Args:
        stage: picklable callable with a `setup()` method, run once per child before its first item.
        workers: child processes.
        timeout_s: an item that takes longer fails with `DecodeTimeout` and its child is killed.
        memory_mb: address space a child may add after setup; beyond it allocations fail in that child only, and
            the item fails with `DecodeOutOfMemory`.
        crash_retries: times an item whose child died is tried again in a fresh child before it fails. A child
            can die of the item (a decoder segfault: it dies again) or of something else (the OOM killer, an
            operator's kill): one retry tells the two apart at the cost of decoding a crasher twice.
        niceness: added to the children's nice value (`os.nice`): above 0 they yield the cores to this process's
            work when both want them.
    """

    def __init__(
        self,
        stage: Any,
        workers: int,
        timeout_s: float,
        memory_mb: float,
        crash_retries: int = 1,
        niceness: int = 0,
    ) -> None:
        # spawn, not fork: forking a process that already runs torch's thread pools can deadlock the children.
        self._context = multiprocessing.get_context("spawn")
        self._stage = stage
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._crash_retries = crash_retries
        self._niceness = niceness
        self._crashes: dict[int, int] = {}
        self._closed = False
        self._children = [self._start() for _ in range(workers)]

    def _start(self) -> _Child:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_child_main,
            args=(child, self._stage, self._memory_mb, self._niceness),
            daemon=True,
            name="catalog-embed-decode",
        )
        # Ctrl-C reaches the whole process group. The supervisor stops the run and its children end with it; a
        # child taking the signal itself would print a traceback. The child ignores SIGINT once it runs; before that
        # it imports its stage. An ignored SIGINT survives exec, and Python keeps it ignored, so the child is started
        # with SIGINT ignored where this process may set that (its main thread; a Ctrl-C in those few milliseconds
        # is lost). Elsewhere (Beam runs bundles on threads) SIGINT is blocked around the start, which keeps a
        # signal from this thread but, as measured, not from the spawned interpreter's start-up.
        main = threading.current_thread() is threading.main_thread()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            process.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.close()
        return _Child(process, parent)

    def close(self) -> None:
        """Stop every child (idle ones exit cleanly, busy ones are killed).

        A thread still iterating `imap` (an interrupted run's feeder) then stops, without replacing the children it
        sees die: a child started while the process exits would be killed half-way through its start.
        """
        self._closed = True
        for child in self._children:
            if child.ready and child.index is None and child.process.is_alive():
                child.conn.send(None)
            else:
                child.process.kill()
        for child in self._children:
            child.process.join(timeout=5)
            if child.process.is_alive():
                child.process.kill()
            child.conn.close()

    def __enter__(self) -> IsolatedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def imap(self, items: Iterable[WorkItem], ahead: int) -> Iterator[tuple[Any, float]]:
        """Yield (result, seconds) for each item in input order, reading at most `ahead` items past the next one.

        A result is what the stage returned, or a TrackFailure when the child crashed, timed out or raised.
        """
        source = iter(items)
        window: dict[int, WorkItem] = {}  # read, not yet yielded
        queue: deque[int] = deque()  # read, not yet handed to a child
        done: dict[int, tuple[Any, float]] = {}
        next_read = next_yield = 0
        exhausted = False
        while True:
            while not exhausted and next_read - next_yield < ahead:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                window[next_read] = item
                queue.append(next_read)
                next_read += 1
            for child in self._children:
                if child.ready and child.index is None and queue:
                    child.index, child.started = queue.popleft(), time.monotonic()
                    child.conn.send(window[child.index])
            if next_yield in done:
                # Yield what is ready, then read and hand out more before waiting again.
                while next_yield in done:
                    yield done.pop(next_yield)
                    del window[next_yield]
                    self._crashes.pop(next_yield, None)
                    next_yield += 1
                continue
            if (exhausted and next_yield == next_read) or self._closed:
                return
            self._collect(window, done, queue)

    def _collect(self, window: dict[int, WorkItem], done: dict[int, tuple[Any, float]], queue: deque[int]) -> None:
        """Wait for a result, a dead child, a child ready or a timeout, and record what happened."""
        watched = [c for c in self._children if c.index is not None or not c.ready]
        busy = [c for c in watched if c.index is not None]
        timeout = max(0.0, min(c.started for c in busy) + self._timeout_s - time.monotonic()) if busy else None
        ready = wait([c.conn for c in watched] + [c.process.sentinel for c in watched], timeout)
        now = time.monotonic()
        for position, child in enumerate(self._children):
            if not child.ready and (child.conn in ready or child.process.sentinel in ready):
                try:
                    child.ready = child.conn.recv() == _READY
                except EOFError:
                    child.process.join()
                    msg = f"a decode worker died while starting ({_exit_reason(child.process.exitcode)})"
                    raise WorkerError(msg) from None
                continue
            if child.index is None:
                continue
            if child.conn in ready:
                try:
                    answer = child.conn.recv()
                except EOFError:
                    answer = None  # it died before answering: a crash, handled below
                if answer is not None:
                    if isinstance(answer[0], RetryableError):
                        raise answer[0]  # the store failed, not the item: the run stops, resumable
                    done[child.index] = answer
                    child.index = None
                    continue
            item = window[child.index]
            if child.conn in ready or child.process.sentinel in ready:
                child.process.join()
                crashes = self._crashes[child.index] = self._crashes.get(child.index, 0) + 1
                if crashes <= self._crash_retries:
                    queue.appendleft(child.index)
                else:
                    reason = f"the decoder process died ({_exit_reason(child.process.exitcode)})"
                    done[child.index] = (TrackFailure(item, "decode", "DecoderCrashed", reason), now - child.started)
            elif now - child.started >= self._timeout_s:
                child.process.kill()
                child.process.join()
                reason = f"decoding took over {self._timeout_s:g} s"
                done[child.index] = (TrackFailure(item, "decode", "DecodeTimeout", reason), now - child.started)
            else:
                continue
            child.conn.close()
            if self._closed:
                return
            self._children[position] = self._start()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _child_main(conn: Connection, stage: Any, memory_mb: float, niceness: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # see IsolatedPool._start
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    torch.set_num_threads(1)
    if niceness:
        os.nice(niceness)
    stage.setup()
    _cap_memory(memory_mb)
    try:
        conn.send(_READY)
        while (item := conn.recv()) is not None:
            start = time.perf_counter()
            try:
                result = stage(item)
            except RetryableError as exc:
                result = exc  # not the item's fault (its store is failing): the supervisor stops the run
            except MemoryError:
                reason = f"decoding needed more memory than the {memory_mb:g} MB allowed (--decode-memory-mb)"
                result = TrackFailure(item, "decode", "DecodeOutOfMemory", reason)
            except Exception as exc:  # noqa: BLE001 (a decoder bug on one file must cost one row, not the child)
                result = TrackFailure.from_error(item, exc, stage="decode")
            conn.send((result, time.perf_counter() - start))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return  # the supervisor is gone (killed): nobody is left to answer, and a traceback would reach its terminal


def _exit_with_parent(parent: int) -> None:
    """End this child once its supervisor is gone. A supervisor killed with -9 (a lost Ray worker, a killed
    driver) cannot stop its children, and one stuck in a hanging decoder would otherwise live on; orphans are
    re-parented, so a changed parent pid is the sign. (PR_SET_PDEATHSIG would fire when the *thread* that started
    the child ends, which need not be the supervisor's end.)"""
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def _cap_memory(extra_mb: float) -> None:
    """Limit this process's address space to what it maps now plus `extra_mb` (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/status") as status:
            mapped_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return
    limit = int(mapped_kb * 1024 + extra_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
