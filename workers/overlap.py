"""The overlapped loop of a worker that hosts the encoder beside its decoders (the local runner; bench/gpu_bench.py
measures the same loop without writing tables).

Decoding runs in supervised child processes (`catalog_embed.workers.isolation.IsolatedPool`); a thread keeps them busy and queues
what they decode (at most `AHEAD_PER_WORKER` tracks per worker), and the shard core (`catalog_embed.workers.shard.ShardEmbedder`)
takes tracks from that queue as they come, so the decoders work while the encoder runs. The encoder gets every core
and the decode children, at a lower priority, what it leaves: on a CPU the encoder is the slower side (musicnn:
decoding is an eighth of the work), and torch's intra-op threads spin-wait on each other, so a decoder that
preempted one would stall them all (make demo on 2 cores: one encoder thread beside two decoders 72x real time; two
threads and niced decoders 107-116x). With the encoder on a GPU, the feeding thread also moves each track into
page-locked memory, off the encoder's thread, so that its copy to the GPU overlaps the encoder's work.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from catalog_embed.schemas.records import WorkItem
from catalog_embed.workers.isolation import IsolatedPool
from catalog_embed.workers.shard import Decoded, ShardEmbedder, ShardOutput
from catalog_embed.workers.stages import DecodeStage, TrackFeatures

# Decoded tracks kept in flight per worker: enough to hide decode latency behind the encoder, bounded in memory.
AHEAD_PER_WORKER = 4
# Decode children's priority below the encoder's (nice +10: about a tenth of a core's share against it).
DECODE_NICENESS = 10
# How often a blocked feeder looks whether the run is over (seconds).
_POLL_S = 0.1


def embed_overlapped(
    decode: DecodeStage,
    embedder: ShardEmbedder,
    shards: Sequence[tuple[str, Sequence[WorkItem]]],
    workers: int,
    timeout_s: float,
) -> Iterator[ShardOutput]:
    """Each shard's output, in order, from `workers` decode children and the encoder in this process.

    Close the iterator (`contextlib.closing`) when stopping early: that stops the feeding thread and the children.
    """
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    items = [item for _, shard in shards for item in shard]
    ahead = max(1, workers) * AHEAD_PER_WORKER
    pin = embedder.resources.gpus > 0
    with (
        IsolatedPool(decode, workers, timeout_s, decode.resources.memory_mb, niceness=DECODE_NICENESS) as pool,
        DecodeFeeder(pool, items, ahead, pin=pin) as decoded,
    ):
        for name, shard_items in shards:
            yield embedder.process((name, itertools.islice(decoded, len(shard_items))))


class DecodeFeeder(Iterator[Decoded]):
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

    def __enter__(self) -> DecodeFeeder:
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
