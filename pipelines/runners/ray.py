"""The Ray runner: the embed job as a streaming Ray Data pipeline, on a local Ray instance or a cluster.

    shards | map(decode_shard: DecodeStage, CPU tasks) | map(ShardEmbedder actor pool, GPUs with CUDA)
           | write_datasink(PartSink: write_shard per shard; stats gathered on the driver)

Each decode task runs DecodeStage in a supervised child process (`catalog_embed.workers.isolation.IsolatedPool`, as the local
runner does): a decoder that crashes, hangs past `--decode-timeout` or balloons costs one `failures` row. The
encoder actors run the shard core (`catalog_embed.workers.shard.ShardEmbedder`), which batches, routes failures and counts; this
module only places the stages (with the resources they declare) and moves shards between them.

A row is a shard, from the first operator to the sink: each shard's part files are then the product of exactly one
write, under their deterministic name, without a shuffle. Shards stream: the encoder actors embed one shard while
CPU tasks decode the next ones. On a cluster the `--workers` decode tasks run on whichever nodes have free cores
(CPU-only nodes included) and the encoder actors on the GPU nodes (`build_dataset`), so CPU nodes can feed a GPU
node. A shard's decoded windows travel as one row, so `--shard-size` sets the unit of memory in flight, and the
object-store budget (`--object-store-mb`, else Ray Data's default share) bounds the shards in flight: decoders
that outrun the encoders wait. The sink's `on_write_complete` runs on the driver and gathers the shards' stats;
`run_embed` then commits the run there. Progress is reported per shard as its parts are staged (`ShardWatcher`).

`--address` reaches an existing cluster; under `ray job submit` the entrypoint runs on the cluster with
RAY_ADDRESS set, so the same command line works with or without `--address auto`. Without either, a local Ray
instance is started with `--workers` CPUs for decoding plus one per encoder actor.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
from collections.abc import Iterable
from typing import Any

import grpc
import ray
import ray.data
from ray._private.services import get_ray_address_from_environment
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import WriteResult

from catalog_embed.pipelines.embed.lifecycle.shards import write_shard
from catalog_embed.pipelines.runners import EmbedJob, Progress, RunStats, ShardWatcher
from catalog_embed.pipelines.runners.options import RayOptions
from catalog_embed.schemas.errors import ConfigError
from catalog_embed.workers.audio import DecodeConfig
from catalog_embed.workers.isolation import IsolatedPool
from catalog_embed.workers.shard import ShardEmbedder, ShardOutput, decode_shard
from catalog_embed.workers.stages import DecodeStage, EncoderConfig, MultiDecodeStage, Stage

# Seconds to wait for a cluster's head to accept a connection before calling --address unreachable.
_CONNECT_TIMEOUT_S = 3.0
MIB = 1 << 20
# Shards handed to an encoder actor at once: the one it embeds and the next, whose decoded audio moves to the
# actor's node meanwhile. More would only hold decoded audio on the GPU node that other actors could embed sooner.
_SHARDS_QUEUED_PER_ACTOR = 2
_LOG = logging.getLogger(__name__)
_DECODE_POOLS: dict[tuple[EncoderConfig, DecodeConfig, float], IsolatedPool] = {}


class RayRunner:
    """Runs a job with Ray Data.

    Args:
        options: the engine options (`address`, `embed_actors`).

    Raises:
        ConfigError: `--address` names no running cluster, or nothing answers there (checked at once, with a
            short timeout, before any work).
    """

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        address = self.options.address or os.environ.get("RAY_ADDRESS") or None
        if address:
            _check_reachable(address)
        self.address = address

    def run(self, job: EmbedJob, progress: Progress | None = None) -> RunStats:
        """Decode, embed and write every shard of `job`; see the module docstring.

        Raises:
            RunAbortedError: too many tracks failed; nothing is committed.
        """
        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address)
            else:
                # "local": a new instance even when `ray start` left a cluster on this machine for ray.init to join.
                ray.init(address="local", num_cpus=job.workers + self.options.embed_actors, include_dashboard=False)
        try:
            with ShardWatcher(job, progress) as watcher:
                stats = self._run(job)
        finally:
            if started_here:
                ray.shutdown()
        watcher.finish(stats.audio_seconds)
        stats.check_failure_ratio(job.max_failure_ratio)
        return stats

    def _run(self, job: EmbedJob) -> RunStats:
        dataset = build_dataset(job, self.options)
        if job.encoder.gpus and not ray.cluster_resources().get("GPU"):
            _LOG.warning("--device %s: the Ray cluster has no GPU yet; the encoder actors wait for one",
                         job.encoder.device)
        for name in self.options.encoder_resources or {}:
            if not ray.cluster_resources().get(name):
                _LOG.warning("--encoder-resource %s: no node of the Ray cluster has it yet; the encoder actors wait "
                             "for one", name)
        sink = PartSink(job.without_items())
        dataset.write_datasink(sink)
        return sink.stats


def build_dataset(job: EmbedJob, options: RayOptions) -> ray.data.Dataset:
    """The decode and embed stages of `job` as a lazy Ray Data pipeline (the sink is added by the runner).

    Decode tasks reserve one core each and run on any node with a free one (Ray Data spreads tasks); the encoder
    actors reserve their core and, with `--device cuda`, their GPU, so they land on the GPU nodes. The executor
    pulls decoded shards towards the actors only while the run's object-store budget has room
    (`--object-store-mb`, else Ray Data's default share of the cluster's object store): decoders that outrun the
    encoder wait instead of piling decoded audio up, and an encoder that outruns the decoders always has the next
    shard queued (`_SHARDS_QUEUED_PER_ACTOR`).
    """
    decode, embedder = job.decode_stage(), job.shard_embedder()
    shards = [{"shard": shard, "items": _pack(list(items))} for shard, items in job.shards()]
    # One block per shard, so that every decode task starts on its own shard.
    dataset = ray.data.from_items(shards, override_num_blocks=len(shards))
    if options.object_store_mb is not None:
        # The dataset's own copy of the DataContext: the limit holds for this run only.
        execution = dataset.context.execution_options
        execution.resource_limits = execution.resource_limits.copy(object_store_memory=options.object_store_mb * MIB)
    return dataset.map(
        _decode_shard,
        fn_kwargs={"stage": decode, "timeout_s": job.decode_timeout_s},
        compute=ray.data.TaskPoolStrategy(size=job.workers),
        **_reserved(decode),
        # Ray's default for CPU tasks, said out loud: a worker runs any number of decode tasks, so its decode child
        # (`_decode_pool`) is started once per worker. Named, it also keeps Ray Data from fusing the decode tasks
        # into the encoder actors (it fuses only operators with equal remote arguments), which would serialise
        # decoding behind encoding when the encoder declares no GPU. (A task whose worker died is retried by Ray
        # Data's default: system failures such as a lost node, never a decoder's error, which the child reports.)
        max_calls=0,
    ).map(
        _EmbedShard,
        fn_constructor_args=(embedder,),
        compute=ray.data.ActorPoolStrategy(
            size=options.embed_actors, max_tasks_in_flight_per_actor=_SHARDS_QUEUED_PER_ACTOR
        ),
        **_reserved(embedder),
        # Custom resources (`--encoder-resource encoder=1`) keep the actors on the nodes that advertise them.
        **({"resources": dict(options.encoder_resources)} if options.encoder_resources else {}),
    )


def _reserved(stage: Stage) -> dict[str, float]:
    """What Ray reserves for one instance of `stage`: the cores and GPUs it declares. (Its memory is not reserved:
    the decode child caps its own, and Ray's memory reservations would idle decoders on a small machine.)"""
    return {"num_cpus": stage.resources.cpus, "num_gpus": stage.resources.gpus}


def _decode_shard(row: dict[str, Any], stage: DecodeStage | MultiDecodeStage, timeout_s: float) -> dict[str, Any]:
    """Decode a shard's tracks in one CPU task, each in a supervised child process: a decoder that crashes, hangs
    or balloons on a file costs that track a `failures` row, as on the local runner, not the task."""
    decoded = decode_shard(_decode_pool(stage, timeout_s), _unpack(row["items"]))
    return {"shard": row["shard"], "decoded": _pack(decoded)}


def _decode_pool(stage: DecodeStage | MultiDecodeStage, timeout_s: float) -> IsolatedPool:
    """This Ray worker's decode child for `stage`, started on its first shard and kept for the next ones (Ray
    reuses its workers), so a child's start-up (importing torch and FFmpeg) is paid once per worker, not per shard.
    The child exits with the worker: its pipe to the worker closes."""
    key = (repr(stage), timeout_s)  # the stage's frozen configs (its built state is not in its repr)
    if key not in _DECODE_POOLS:
        _DECODE_POOLS[key] = IsolatedPool(stage, 1, timeout_s, stage.resources.memory_mb)
    return _DECODE_POOLS[key]


class _EmbedShard:
    """An encoder actor: the shard core, loaded once per actor."""

    def __init__(self, embedder: ShardEmbedder) -> None:
        self._embedder = embedder
        self._embedder.setup()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"shard": row["shard"], "output": _pack(self._embedder.process((row["shard"], _unpack(row["decoded"]))))}


class PartSink(Datasink[RunStats]):
    """Writes each shard's part files with `write_shard`; gathers the run's stats on the driver.

    Attributes:
        stats: the whole run's stats, set by `on_write_complete` on the driver.
    """

    def __init__(self, job: EmbedJob) -> None:
        self._job = job
        self.stats = RunStats()

    def write(self, blocks: Iterable[Block], ctx: object) -> RunStats:
        """Write the shards of one write task (each shard is one row)."""
        store = self._job.store()
        stats = RunStats()
        for block in blocks:
            for row in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                output: ShardOutput = _unpack(row["output"])
                output.stats.add_time("write", write_shard(store, self._job.run_id, output))
                stats.merge(output.stats)
        return stats

    def on_write_complete(self, write_result: WriteResult[RunStats]) -> None:
        """Sum the write tasks' stats (driver side)."""
        for stats in write_result.write_returns:
            self.stats.merge(stats)


def _pack(values: Any) -> bytes:
    """Stage objects as one binary cell. Ray would pickle them anyway, after failing to make Arrow of them and
    logging a warning for every block."""
    return pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack(blob: bytes) -> Any:
    return pickle.loads(blob)  # noqa: S301 (our own rows, written by this job's tasks)


def _check_reachable(address: str) -> None:
    """Fail fast, naming the option, when no Ray cluster answers at `address`."""
    if address.startswith("ray://"):
        target = address.removeprefix("ray://")
    else:
        try:
            target = get_ray_address_from_environment(address, None)
        except ConnectionError as exc:
            msg = (
                f"--address {address}: no running Ray cluster found ({exc}). Start one with `ray start --head`, "
                "or pass the head's host:port"
            )
            raise ConfigError(msg) from exc
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        msg = f"--address {address!r} is not 'auto', host:port or ray://host:port"
        raise ConfigError(msg)
    try:
        socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        msg = (
            f"--address {address}: nothing answers at {host}:{port} ({exc}). Check that the cluster is up "
            "(`ray status`) and the address, or leave --address out to run on a local Ray instance"
        )
        raise ConfigError(msg) from exc
    # Something accepts connections there. A Ray head's GCS (and a Ray Client server) speaks gRPC; a dashboard or
    # any other HTTP/1 service does not, and ray.init would retry against it for a minute before failing.
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=_CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError as exc:
        msg = (
            f"--address {address}: {host}:{port} answers but not as a Ray head does (no gRPC): pass the head's GCS "
            "port (6379 unless `ray start --port` set another), not the dashboard's (8265)"
        )
        raise ConfigError(msg) from exc
    finally:
        channel.close()
