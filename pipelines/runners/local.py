"""The local runner: the reference engine and the embedded default.

Decoding runs in supervised child processes (`workers.isolation.IsolatedPool`), so a decoder that segfaults, hangs
or balloons on hostile input costs one `failures` row, not the run. The encoder runs in this process, fed with
windows batched across tracks while the children decode ahead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch

from pipelines.runners import EmbedJob, Progress, RunStats, write_shard
from workers.isolation import IsolatedPool
from workers.stages import DecodeStage, EmbedStage, TrackEmbedding, TrackFailure, TrackFeatures

# Decoded tracks kept in flight per worker: enough to hide decode latency behind the encoder, bounded in memory.
_AHEAD_PER_WORKER = 4


class LocalRunner:
    """Runs a job in this process plus `job.workers` decode processes."""

    def run(self, job: EmbedJob, progress: Progress | None = None) -> RunStats:
        """Decode, embed and write every shard of `job`; see the module docstring."""
        stats = RunStats()
        store = job.store()
        # Leave the decode workers their cores: torch's intra-op threads spin-wait on each other, and one of them
        # descheduled by a decoder stalls the rest (on 2 cores, 2 encoder threads beside busy decoders ran the
        # encoder 2 to 4 times slower than 1 thread; see bench/embed_bench.py).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - job.workers))
        embed = EmbedStage(job.encoder, keep_timeline=job.write_windows)
        start = time.perf_counter()
        embed.setup()
        stats.add_time("load_model", time.perf_counter() - start)
        decode = DecodeStage(job.encoder, job.decode)
        with IsolatedPool(decode, job.workers, job.decode_timeout_s, job.decode.max_memory_mb) as pool:
            decoded = self._decoded(pool, job, stats)
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
                    pending_windows += result.n_windows
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
        return stats

    @staticmethod
    def _embed(embed: EmbedStage, tracks: list[TrackFeatures], stats: RunStats) -> list[TrackEmbedding]:
        start = time.perf_counter()
        results = embed(tracks)
        stats.add_time("encode", time.perf_counter() - start)
        return results

    @staticmethod
    def _decoded(pool: IsolatedPool, job: EmbedJob, stats: RunStats) -> Iterator[TrackFeatures | TrackFailure]:
        """Decode results in plan order, with a bounded number of tracks read ahead."""
        items = (item for _, shard in job.shards() for item in shard)
        for result, seconds in pool.imap(items, ahead=max(1, job.workers) * _AHEAD_PER_WORKER):
            stats.add_time("decode", seconds)
            yield result
