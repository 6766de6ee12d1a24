"""The local runner: the reference engine and the embedded default.

Decoding runs in supervised child processes, so a decoder that segfaults, hangs or balloons on hostile input costs
one `failures` row, not the run; the encoder runs in this process, overlapped with decoding (`catalog_embed.workers.overlap`).
Another thread writes a finished shard's part files while the next shard is embedded (one shard at a time).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing

from catalog_embed.pipelines.embed.lifecycle.shards import write_shard
from catalog_embed.pipelines.runners import EmbedJob, Progress, RunStats
from catalog_embed.workers.overlap import embed_overlapped
from catalog_embed.workers.shard import ShardOutput


class LocalRunner:
    """Runs a job in this process plus `job.workers` decode processes."""

    def run(self, job: EmbedJob, progress: Progress | None = None) -> RunStats:
        """Decode, embed and write every shard of `job`; see the module docstring."""
        stats = RunStats()
        store = job.store()
        embedder = job.shard_embedder()
        outputs = embed_overlapped(job.decode_stage(), embedder, job.shards(), job.workers, job.decode_timeout_s)
        with closing(outputs), ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-shard") as writer:
            writing: tuple[Future[float], ShardOutput] | None = None
            for output in outputs:
                if writing:
                    self._written(*writing, stats, job, progress)
                writing = writer.submit(write_shard, store, job.run_id, output), output
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
