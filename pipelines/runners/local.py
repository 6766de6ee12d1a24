"""The local runner: the reference engine and the embedded default.

Decoding runs in supervised child processes (`workers.isolation.IsolatedPool`), so a decoder that segfaults, hangs
or balloons on hostile input costs one `failures` row, not the run. The shard core (`workers.shard.ShardEmbedder`)
runs the encoder in this process, taking decoded tracks from the pool as they come while the children decode ahead.
"""

from __future__ import annotations

import itertools
import os

import torch

from pipelines.runners import EmbedJob, Progress, RunStats, write_shard
from workers.isolation import IsolatedPool

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
        embedder = job.shard_embedder()
        decode = job.decode_stage()
        with IsolatedPool(decode, job.workers, job.decode_timeout_s, decode.resources.memory_mb) as pool:
            # Plan order, with a bounded number of tracks read ahead across shard boundaries.
            items = (item for _, shard in job.shards() for item in shard)
            decoded = pool.imap(items, ahead=max(1, job.workers) * _AHEAD_PER_WORKER)
            for shard, items in job.shards():
                output = embedder.process(shard, itertools.islice(decoded, len(items)))
                output.stats.add_time("write", write_shard(job, store, output))
                stats.merge(output.stats)
                if progress:
                    progress(len(items), output.stats.audio_seconds)
                stats.check_failure_ratio(job.max_failure_ratio)
        embedder.teardown()
        return stats
