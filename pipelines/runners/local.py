"""The local runner: the reference engine and the embedded default.

Decoding runs in a pool of worker processes (pebble), so a decoder that segfaults or hangs on hostile input costs
one `failures` row, not the run: the pool replaces the dead or timed-out worker. The encoder runs in this process,
fed with windows batched across tracks while the pool decodes ahead.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout

import torch
from pebble import ProcessExpired, ProcessPool

from pipelines.runners import EmbedJob, Progress, RunStats, write_shard
from schemas.manifest import WorkItem
from workers.stages import DecodeStage, EmbedStage, TrackEmbedding, TrackFailure, TrackFeatures

# Decoded tracks kept in flight per worker: enough to hide decode latency behind the encoder, bounded in memory.
_AHEAD_PER_WORKER = 4

_stage: DecodeStage | None = None


def _init_worker(stage: DecodeStage) -> None:
    global _stage  # noqa: PLW0603 (one stage per worker process, built once)
    torch.set_num_threads(1)
    stage.setup()
    _stage = stage
    _cap_memory(stage.decode.max_memory_mb)


def _cap_memory(extra_mb: float) -> None:
    """Limit this process's address space to what it maps now plus `extra_mb` (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/status") as status:
            mapped_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return
    limit = int(mapped_kb * 1024 + extra_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _decode(item: WorkItem) -> tuple[TrackFeatures | TrackFailure, float]:
    start = time.perf_counter()
    result = _stage(item)
    return result, time.perf_counter() - start


class LocalRunner:
    """Runs a job in this process plus a decode pool of `job.workers` processes."""

    def run(self, job: EmbedJob, progress: Progress | None = None) -> RunStats:
        """Decode, embed and write every shard of `job`; see the module docstring."""
        stats = RunStats()
        store = job.store()
        embed = EmbedStage(job.encoder, keep_timeline=job.write_windows)
        start = time.perf_counter()
        embed.setup()
        stats.add_time("load_model", time.perf_counter() - start)
        decode = DecodeStage(job.encoder, job.decode)
        # spawn, not fork: forking a process that already runs torch's thread pools can deadlock the children.
        context = multiprocessing.get_context("spawn")
        with ProcessPool(max_workers=job.workers, initializer=_init_worker, initargs=(decode,), context=context) as pool:
            decoded = self._decode_ahead(pool, job, stats)
            for shard, items in job.shards():
                results: list[TrackEmbedding | TrackFailure] = []
                pending: list[TrackFeatures] = []
                pending_windows = 0
                for _ in items:
                    result = next(decoded)
                    if isinstance(result, TrackFailure):
                        results.append(result)
                        continue
                    pending.append(result)
                    pending_windows += len(result.windows)
                    if pending_windows >= job.encoder.batch_windows:
                        results.extend(self._embed(embed, pending, stats))
                        pending, pending_windows = [], 0
                results.extend(self._embed(embed, pending, stats))
                embedded = [r for r in results if isinstance(r, TrackEmbedding)]
                failed = [r for r in results if isinstance(r, TrackFailure)]
                stats.add_time("write", write_shard(job, store, shard, embedded, failed))
                stats.record(embedded, failed)
                if progress:
                    progress(len(items), sum(e.duration_s for e in embedded))
                stats.check_failure_ratio(job.max_failure_ratio)
            pool.stop()
        return stats

    @staticmethod
    def _embed(embed: EmbedStage, tracks: list[TrackFeatures], stats: RunStats) -> list[TrackEmbedding]:
        start = time.perf_counter()
        results = embed(tracks)
        stats.add_time("encode", time.perf_counter() - start)
        return results

    @staticmethod
    def _decode_ahead(pool: ProcessPool, job: EmbedJob, stats: RunStats) -> Iterator[TrackFeatures | TrackFailure]:
        """Yield decode results in plan order, keeping a bounded number of tracks in flight."""
        items = iter(job.items)
        inflight: deque = deque()

        def submit() -> None:
            item = next(items, None)
            if item is not None:
                inflight.append((item, pool.schedule(_decode, (item,), timeout=job.decode_timeout_s)))

        for _ in range(max(1, job.workers) * _AHEAD_PER_WORKER):
            submit()
        while inflight:
            item, future = inflight.popleft()
            submit()
            try:
                result, seconds = future.result()
                stats.add_time("decode", seconds)
            except FutureTimeout:
                result = TrackFailure(item, "decode", "DecodeTimeout", f"decoding took over {job.decode_timeout_s:g} s")
            except ProcessExpired as exc:
                result = TrackFailure(item, "decode", "DecoderCrashed", f"the decoder process died: {exc}")
            except Exception as exc:  # noqa: BLE001 (a decoder bug on one file must cost one row, not the run)
                result = TrackFailure.from_error(item, exc, stage="decode")
            yield result
