"""The local runner: the reference engine and the embedded default.

Decoding runs in supervised child processes (`workers.isolation.IsolatedPool`), so a decoder that segfaults, hangs
or balloons on hostile input costs one `failures` row, not the run. The shard core (`workers.shard.ShardEmbedder`)
runs the encoder in this process. Decoding, the encoder and writing overlap: a thread keeps the decode children
busy and queues what they decode (at most `_AHEAD_PER_WORKER` tracks per worker), the encoder takes tracks from
that queue, and another thread writes a finished shard's part files while the next shard is embedded (one shard
at a time).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pipelines.runners import EmbedJob, Progress, RunStats, write_shard
from schemas.records import WorkItem
from workers.isolation import IsolatedPool
from workers.shard import Decoded, ShardOutput
from workers.stages import TrackFeatures

# Decoded tracks kept in flight per worker: enough to hide decode latency behind the encoder, bounded in memory.
_AHEAD_PER_WORKER = 4
# Decode children's priority below the encoder's (nice +10: about a tenth of a core's share against it).
_DECODE_NICENESS = 10
# How often a blocked feeder looks whether the run is over (seconds).
_POLL_S = 0.1


class LocalRunner:
    """Runs a job in this process plus `job.workers` decode processes."""

    def run(self, job: EmbedJob, progress: Progress | None = None) -> RunStats:
        """Decode, embed and write every shard of `job`; see the module docstring."""
        stats = RunStats()
        store = job.store()
        # The encoder gets every core and the decode children, at a lower priority, what it leaves: on a CPU the
        # encoder is the slower side (musicnn: decoding is an eighth of the work), and torch's intra-op threads
        # spin-wait on each other, so a decoder that preempted one would stall them all. make demo on 2 cores: 1
        # encoder thread beside 2 decoders 72x real time; 2 threads and niced decoders 107-116x.
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        embedder = job.shard_embedder()
        decode = job.decode_stage()
        items = [item for _, shard in job.shards() for item in shard]
        ahead = max(1, job.workers) * _AHEAD_PER_WORKER
        with (
            IsolatedPool(
                decode, job.workers, job.decode_timeout_s, decode.resources.memory_mb, niceness=_DECODE_NICENESS
            ) as pool,
            _DecodeFeeder(pool, items, ahead, pin=job.encoder.gpus > 0) as decoded,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-shard") as writer,
        ):
            writing: tuple[Future[float], ShardOutput] | None = None
            for shard, shard_items in job.shards():
                output = embedder.process((shard, itertools.islice(decoded, len(shard_items))))
                if writing:
                    self._written(*writing, stats, job, progress)
                writing = writer.submit(write_shard, job, store, output), output
            if writing:
                self._written(*writing, stats, job, progress)
        embedder.teardown()
        return stats

    @staticmethod
    def _written(
        write: Future[float], output: ShardOutput, stats: RunStats, job: EmbedJob, progress: Progress | None
    ) -> None:
        """Wait for a shard's parts to be written, then count it."""
        output.stats.add_time("write", write.result())
        stats.merge(output.stats)
        if progress:
            progress(output.stats.n_embedded + output.stats.n_failed, output.stats.audio_seconds)
        stats.check_failure_ratio(job.max_failure_ratio)


class _DecodeFeeder(Iterator[Decoded]):
    """Iterates a decode pool in a thread into a bounded queue, so that the children decode while the encoder runs
    (a pool only hands out work while it is iterated). Iterating the feeder yields the pool's results in order and
    raises what the pool raised. With `pin` (an encoder on a GPU) it also moves each track into page-locked memory,
    off the encoder's thread, so that its copy to the GPU overlaps the encoder's work."""

    def __init__(self, pool: IsolatedPool, items: Iterable[WorkItem], ahead: int, pin: bool = False) -> None:
        self._queue: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=ahead)
        self._pin = pin
        self._stop = threading.Event()
        # A daemon: after an interrupt it may still wait on a decoding (or hanging) child, until the pool, closed
        # right after the feeder, kills its children; it must never hold the process open.
        self._thread = threading.Thread(target=self._feed, args=(pool, items, ahead), name="decode-feeder", daemon=True)

    def __enter__(self) -> _DecodeFeeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # A finished run's feeder has returned; an interrupted one's may be blocked in the pool for as long as a
        # decode can take (--decode-timeout): do not wait for it, the pool's exit ends what it waits on.
        self._thread.join(timeout=_POLL_S * 10)

    def __next__(self) -> Decoded:
        ok, value = self._queue.get()
        if not ok:
            raise value
        return value

    def _feed(self, pool: IsolatedPool, items: Iterable[WorkItem], ahead: int) -> None:
        try:
            for features, seconds in pool.imap(items, ahead=ahead):
                if self._pin and isinstance(features, TrackFeatures):
                    features = features.pinned()
                if not self._put((True, (features, seconds))):
                    return
        except Exception as exc:  # noqa: BLE001 (handed to the consuming thread, which raises it)
            self._put((False, exc))

    def _put(self, entry: tuple[bool, Any]) -> bool:
        """Queue `entry` unless the run is over; False when it is."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
