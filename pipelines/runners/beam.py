"""The Beam runner: the embed job as an Apache Beam pipeline, on Beam's local runners or on Dataflow.

    shards (Parquet, one row per shard) | Reshuffle
      | Decode        DecodeStage in a supervised child process with a timeout and a memory cap (CPU)
      | (Reshuffle)   on Dataflow with GPUs only: decode on CPU workers, encode on GPU workers (right fitting)
      | RunInference  ShardModelHandler: the shard core (`catalog_embed.workers.shard.ShardEmbedder`), one model per worker
                      process; it batches across the shard's tracks, routes failures and counts
      | WriteShard    write_shard: deterministic part names
      | CombineGlobally(RunStats) | Commit (once, through `EmbedJob.commit`)

The shards are staged as one Parquet file under the run's staging folder rather than inlined into the graph,
which Dataflow caps at a few megabytes. An element is a shard from the first step to the write, as on Ray, so each
shard's part files are the product of exactly one write without a shuffle. Each worker process decodes in a child
of its own (`catalog_embed.workers.isolation.IsolatedPool`, as the other runners do): a decoder that raises, crashes, hangs past
`--decode-timeout` or balloons costs one `failures` row, and the child ends with its worker even under kill -9.
An encoder that raises costs the tracks that make it raise (the shard core's dead letters). No track fails a bundle.

The commit is the graph's last step because a Dataflow Flex Template launcher only builds the graph and exits:
nothing after `run()` would ever commit. Where the driver does wait (DirectRunner, Prism, Dataflow launched
from this CLI), it reports progress per shard as the shards' parts are staged (`ShardWatcher`), then the counts
of the `runs` row the job committed, and stage times from Beam metrics in
the namespace `catalog-embed`: distributions `load_model_ms`, `decode_ms`, `encode_ms`, `write_ms`, next to counters
`tracks_embedded`, `tracks_failed` and `audio_milliseconds` for monitoring. Counts are not taken from metrics: a
runner that repeats a failed bundle may count that bundle's increments twice (Beam's bundle-based DirectRunner
does), while the committed row counts each staged track once.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import apache_beam as beam
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.prism_runner import PrismJobServer

from catalog_embed.pipelines.embed.lifecycle.shards import write_shard
from catalog_embed.pipelines.io.store import STAGING
from catalog_embed.pipelines.runners import EmbedJob, Progress, RunStats, ShardWatcher
from catalog_embed.pipelines.runners.options import BeamOptions
from catalog_embed.schemas.errors import ConfigError, TableError
from catalog_embed.schemas.records import WorkItem
from catalog_embed.schemas.tables import FAILURES, RUNS
from catalog_embed.workers.isolation import IsolatedPool
from catalog_embed.workers.shard import DecodedShard, ShardEmbedder, ShardOutput, decode_shard
from catalog_embed.workers.stages import DecodeStage, TrackFeatures, TrackFeatureSet

METRICS_NAMESPACE = "catalog-embed"
# Stage times reported as distributions `<stage>_ms`.
_TIMED_STAGES = ("load_model", "decode", "encode", "write")
_LOG = logging.getLogger(__name__)


class BeamRunner:
    """Runs a job on one of Beam's local runners: DirectRunner (default) or Prism.

    Args:
        options: the engine options; `beam_runner` picks the local runner and `pipeline_args` pass through.

    Raises:
        ConfigError: Prism was asked for but its binary is neither cached nor downloadable.
    """

    def __init__(self, options: BeamOptions | None = None) -> None:
        self.options = options or BeamOptions()
        if self.options.beam_runner == "prism":
            _check_prism(self.options)

    def pipeline_options(self, job: EmbedJob) -> PipelineOptions:
        """Beam options of a local run: the DirectRunner runs `job.workers` SDK worker processes."""
        if self.options.beam_runner == "prism":
            return PipelineOptions(list(self.options.pipeline_args), runner="PrismRunner")
        return PipelineOptions(
            list(self.options.pipeline_args),
            runner="DirectRunner",
            direct_num_workers=job.workers,
            # One worker runs in this process; more run as subprocesses, each with its own model.
            direct_running_mode="multi_processing" if job.workers > 1 else "in_memory",
        )

    def encoder_accelerator(self) -> str | None:
        """The accelerator resource hint of the encode step; Beam's local runners place no steps (None)."""
        return None

    def run(self, job: EmbedJob, progress: Progress | None = None) -> RunStats:
        """Stage the work items, build and run the pipeline; the pipeline commits the run itself.

        Returns:
            The run's counts from Beam metrics, with `status` 'succeeded'; 'launched' when it returned before
            the job ran (`--detach`, or a Flex Template launcher that only builds the graph).

        Raises:
            RunAbortedError: too many tracks failed (the pipeline committed an `aborted` runs row).
            TableError: the pipeline finished without committing the run.
        """
        if job.commit is None:
            msg = "the Beam runner commits from its pipeline and needs EmbedJob.commit (run it through run_embed)"
            raise ConfigError(msg)
        shards_uri = _stage_shards(job)
        pipeline = beam.Pipeline(options=self.pipeline_options(job))
        build_pipeline(pipeline, job, shards_uri, self.encoder_accelerator())
        # The DirectRunner runs the whole pipeline inside run(): the watcher reports its shards meanwhile.
        with ShardWatcher(job, progress) as watcher:
            result = pipeline.run()
            # A Flex Template launcher gets a result without a job (it only built the graph); a detached submission
            # does not wait. Either way the job commits the run from its last step.
            if self.options.detach or not getattr(result, "has_job", True):
                _LOG.warning("run %s launched: the Dataflow job commits it from its last step", job.run_id)
                return RunStats(status="launched")
            result.wait_until_finish()
        stats = _stage_times(result)
        committed = _committed_run(job)
        if committed["status"] == "aborted":
            # The aborted run's parts are gone; the metrics are all that is left to say how bad it was.
            counters = _counters(result)
            stats.n_embedded, stats.n_failed = counters.get("tracks_embedded", 0), counters.get("tracks_failed", 0)
            raise stats.aborted_error(job.max_failure_ratio)
        stats.n_embedded, stats.n_failed = committed["n_embedded"], committed["n_failed"]
        stats.audio_seconds = committed["audio_seconds"]
        if stats.n_failed:
            stats.first_errors = _first_errors(job)
        watcher.finish(stats.audio_seconds)
        return stats


class DataflowRunner(BeamRunner):
    """Runs a job on Google Cloud Dataflow (Runner v2, our worker image, optional GPUs).

    The options were validated with the config (`BeamOptions.validate`): project, region, a gs:// temp location,
    the worker image and, with `--device cuda`, a worker accelerator.

    GPUs go to the encode step only (Dataflow's "right fitting"): `--worker-accelerator` becomes that step's
    accelerator resource hint, with `--machine-type` as its machine, instead of a service option that would put a
    GPU on every worker. The decode step runs on Dataflow's CPU workers (their type: `--beam-option
    machine_type=...`), and a Reshuffle between the two steps lets Dataflow run them on different workers.
    """

    def encoder_accelerator(self) -> str | None:
        """`--worker-accelerator` as Dataflow's accelerator hint, with `--machine-type` as the GPU workers' type."""
        o = self.options
        if not o.worker_accelerator:
            return None
        return f"{o.worker_accelerator};machine_type:{o.machine_type}" if o.machine_type else o.worker_accelerator

    def pipeline_options(self, job: EmbedJob) -> PipelineOptions:
        """Beam options of a Dataflow job."""
        o = self.options
        settings: dict[str, Any] = {
            "runner": "DataflowRunner",
            "project": o.project,
            "region": o.region,
            "temp_location": o.temp_location,
            "staging_location": o.staging_location or o.temp_location,
            "sdk_container_image": o.sdk_container_image,
            # The image already holds Beam and the package: stage neither, so workers start from the image alone.
            "sdk_location": "container",
            "experiments": ["use_runner_v2"],
            "job_name": o.job_name or _job_name(job.run_id),
        }
        if o.machine_type and not o.worker_accelerator:
            settings["machine_type"] = o.machine_type
        if o.max_num_workers:
            settings["max_num_workers"] = o.max_num_workers
        return PipelineOptions(list(o.pipeline_args), **settings)


def build_pipeline(
    pipeline: beam.Pipeline, job: EmbedJob, shards_uri: str, accelerator: str | None = None
) -> beam.PCollection:
    """Add the embed graph (see the module docstring) to `pipeline`.

    Args:
        accelerator: the encode step's accelerator resource hint (Dataflow's form); with it, a Reshuffle breaks
            the fusion of decode and encode so that each runs on workers of its own. Without it the steps stay
            fused: a bundle-at-a-time runner (the DirectRunner) would otherwise hold every decoded shard of the run
            in memory before encoding the first.

    Returns:
        The single-element PCollection of the status the run was committed with.
    """
    lean = job.without_items()
    embed = RunInference(ShardModelHandler(job.shard_embedder()), metrics_namespace=METRICS_NAMESPACE)
    decoded = (
        pipeline
        | "Shards" >> beam.io.ReadFromParquet(shards_uri)
        | "Reshuffle" >> beam.Reshuffle()
        | "Decode" >> beam.ParDo(_DecodeShardFn(job.decode_stage(), job.decode_timeout_s))
    )
    if accelerator:
        decoded = decoded | "ToEncoderWorkers" >> beam.Reshuffle()
        embed = embed.with_resource_hints(accelerator=accelerator)
    return (
        decoded
        | "Embed" >> embed
        | "WriteShard" >> beam.ParDo(_WriteShardFn(lean))
        | "RunStats" >> beam.CombineGlobally(_MergeStats())
        | "Commit" >> beam.Map(_commit, lean)
    )


class ShardModelHandler(ModelHandler[DecodedShard, ShardOutput, ShardEmbedder]):
    """Beam's ModelHandler around the shard core: examples are decoded shards (name, decoded tracks), predictions
    their `ShardOutput`s.

    RunInference loads the model once per worker process and shares it between the process's threads; a batch is
    one shard, within which the core batches windows across tracks.
    """

    def __init__(self, embedder: ShardEmbedder) -> None:
        super().__init__(min_batch_size=1, max_batch_size=1)
        self._embedder = embedder

    def load_model(self) -> ShardEmbedder:
        """Build the encoder on the configured device (once per worker process)."""
        embedder = replace(self._embedder)
        embedder.setup()
        return embedder

    def run_inference(
        self,
        batch: Sequence[DecodedShard],
        model: ShardEmbedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[ShardOutput]:
        """Embed each decoded shard of the batch."""
        return [model.process(shard) for shard in batch]

    def get_num_bytes(self, batch: Sequence[DecodedShard]) -> int:
        """Bytes of decoded audio or windows in a batch (the default pickles the whole batch to measure it)."""
        return sum(r.nbytes for _, decoded in batch for r, _ in decoded if isinstance(r, TrackFeatures | TrackFeatureSet))

    def get_metrics_namespace(self) -> str:
        """Beam's inference metrics go next to ours."""
        return METRICS_NAMESPACE


class _DecodeShardFn(beam.DoFn):
    """Decode a shard's work items in this worker's supervised child process."""

    def __init__(self, stage: DecodeStage, timeout_s: float) -> None:
        self._stage = stage
        self._timeout_s = timeout_s

    def setup(self) -> None:
        self._pool = IsolatedPool(self._stage, 1, self._timeout_s, self._stage.resources.memory_mb)

    def process(self, row: dict[str, Any]) -> Iterator[DecodedShard]:
        items = [WorkItem(*fields) for fields in zip(row["track_id"], row["uri"], row["fingerprint"], strict=True)]
        yield row["shard"], decode_shard(self._pool, items)

    def teardown(self) -> None:
        self._pool.close()


class _WriteShardFn(beam.DoFn):
    """Write one shard's part files; report its stats as Beam metrics too."""

    def __init__(self, job: EmbedJob) -> None:
        self._job = job

    def setup(self) -> None:
        self._store = self._job.store()
        self._embedded = Metrics.counter(METRICS_NAMESPACE, "tracks_embedded")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "tracks_failed")
        self._audio_ms = Metrics.counter(METRICS_NAMESPACE, "audio_milliseconds")
        self._stage_ms = {stage: Metrics.distribution(METRICS_NAMESPACE, f"{stage}_ms") for stage in _TIMED_STAGES}

    def process(self, output: ShardOutput) -> Iterator[RunStats]:
        stats = RunStats()
        stats.merge(output.stats)
        stats.add_time("write", write_shard(self._store, self._job.run_id, output))
        self._embedded.inc(stats.n_embedded)
        self._failed.inc(stats.n_failed)
        self._audio_ms.inc(round(stats.audio_seconds * 1000))
        for stage, seconds in stats.stage_seconds.items():
            self._stage_ms[stage].update(int(seconds * 1000))
        yield stats


class _MergeStats(beam.CombineFn):
    """Sum the RunStats of every shard and bundle."""

    def create_accumulator(self) -> RunStats:
        return RunStats()

    def add_input(self, accumulator: RunStats, stats: RunStats) -> RunStats:
        accumulator.merge(stats)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[RunStats]) -> RunStats:
        merged = RunStats()
        for accumulator in accumulators:
            merged.merge(accumulator)
        return merged

    def extract_output(self, accumulator: RunStats) -> RunStats:
        return accumulator


def _commit(stats: RunStats, job: EmbedJob) -> str:
    status = job.commit(stats)
    Metrics.counter(METRICS_NAMESPACE, f"runs_{status}").inc()
    if status != "succeeded":
        _LOG.error("run %s %s: %d of %d tracks failed", job.run_id, status, stats.n_failed,
                   stats.n_failed + stats.n_embedded)
    return status


def _stage_shards(job: EmbedJob) -> str:
    """Write the shards next to the run's staged parts; returns the URI Beam reads them from."""
    store = job.store()
    folder = store.staging_dir(job.run_id)
    store.fs.makedirs(folder, exist_ok=True)
    with store.fs.open(posixpath.join(folder, "shards.parquet"), "wb") as fh:
        pq.write_table(job.shard_table(), fh)
    return f"{store.root}/{STAGING}/{job.run_id}/shards.parquet"


def _committed_run(job: EmbedJob) -> dict[str, Any]:
    """The `runs` row the pipeline committed for `job`; a run of several encoders (one row each) summed."""
    columns = ["status", "n_embedded", "n_failed", "audio_seconds"]
    rows = job.store().read(RUNS, columns, pc.field("run_id") == job.run_id)
    if not rows.num_rows:
        msg = f"the Beam job finished but committed no runs row for run {job.run_id}"
        raise TableError(msg)
    return {"status": rows["status"][0].as_py(), **{c: pc.sum(rows[c]).as_py() for c in columns[1:]}}


def _counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    metrics = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    return {m.key.metric.name: m.committed for m in metrics["counters"]}


def _stage_times(result: beam.runners.runner.PipelineResult) -> RunStats:
    """Stage times from the metrics of a finished pipeline, in stats of a committed run."""
    metrics = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    stats = RunStats(status="succeeded")
    for metric in metrics["distributions"]:
        name = metric.key.metric.name
        if name.removesuffix("_ms") in _TIMED_STAGES and metric.committed is not None:
            stats.add_time(name.removesuffix("_ms"), metric.committed.sum / 1000)
    return stats


def _first_errors(job: EmbedJob, limit: int = 5) -> list[str]:
    """The first failures of a committed run, for the summary (the pipeline does not hand them back)."""
    rows = job.store().read(FAILURES, ["track_id", "error_type", "message"], pc.field("run_id") == job.run_id)
    return [f"{r['track_id']}: {r['error_type']}: {r['message']}" for r in rows.slice(0, limit).to_pylist()]


def _job_name(run_id: str) -> str:
    """A Dataflow job name (lowercase letters, digits, hyphens; starts with a letter) from a run id."""
    return "catalog-embed-" + re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")


def _check_prism(options: BeamOptions) -> None:
    """Make sure Prism's binary is at hand before any work: Beam downloads it from GitHub on first use."""
    try:
        PrismJobServer(PipelineOptions(list(options.pipeline_args))).path_to_binary()
    except (RuntimeError, ValueError, OSError) as exc:
        msg = (
            f"--beam-runner prism needs Beam's Prism binary, which Beam fetches from GitHub on first use and "
            f"could not ({exc}). Download apache_beam-v{beam.__version__}-prism-<os>-<arch>.zip from "
            f"https://github.com/apache/beam/releases/tag/v{beam.__version__} where the network allows and pass "
            f"--beam-option prism_location=/path/to/that.zip, or use --beam-runner direct"
        )
        raise ConfigError(msg) from exc
