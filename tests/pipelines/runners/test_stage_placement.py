"""Where the engines place the stages: decoding on CPU workers of any node, only the encoder asking for a GPU,
the two never fused into one step, decoded shards in flight bounded. The graphs are built (and Ray's plan
optimised) here, with `--device cuda` configs on a machine without a GPU; nothing is run."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
import ray
from ray.util.annotations import RayDeprecationWarning

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.runners import EmbedJob
from catalog_embed.pipelines.runners.beam import BeamRunner, DataflowRunner, build_pipeline
from catalog_embed.pipelines.runners.options import BeamOptions, RayOptions
from catalog_embed.pipelines.runners.ray import MIB, build_dataset
from catalog_embed.schemas.records import WorkItem
from catalog_embed.workers.rows import RowContext
from catalog_embed.workers.stages import EncoderConfig

ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
ACCELERATOR_HINT = "beam:resources:accelerator:v1"


def _job(device: str, workers: int = 1) -> EmbedJob:
    items = tuple(WorkItem(f"t{i}", f"/nowhere/t{i}.mp3", "f") for i in range(4))
    config = EmbedConfig(
        catalog="/nowhere/catalog", out="/nowhere/tables", encoder=EncoderConfig(device=device), workers=workers,
        shard_size=2,
    )
    return EmbedJob(
        run_id="20261130T000000Z-0a1b2c3d",
        config=config,
        items=items,
        rows=RowContext("r", "musicnn-msd", ("penultimate",), "v", "h"),
    )


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _optimised_physical_plan(dataset: ray.data.Dataset) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        dataset.explain()
    return printed.getvalue().split("Physical Plan (Optimized)")[1]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ray_decodes_in_cpu_tasks_apart_from_the_encoder_actors(local_ray, device):
    """One decode worker and one actor is the case Ray Data would fuse into the actor if the two operators'
    remote arguments were equal (on the CPU they reserve the same core), serialising decoding behind encoding."""
    with warnings.catch_warnings():
        # Only the supported, named remote arguments: Ray 2.60 deprecates loose ones such as `max_retries`.
        warnings.simplefilter("error", RayDeprecationWarning)
        dataset = build_dataset(_job(device), RayOptions(embed_actors=1))
    plan = _optimised_physical_plan(dataset)
    assert "TaskPoolMapOperator[Map(_decode_shard)]" in plan
    assert "ActorPoolMapOperator[Map(_EmbedShard)]" in plan
    embed = dataset._logical_plan.dag
    decode = embed.input_dependencies[0]
    assert decode.ray_remote_args["num_gpus"] == 0 and decode.ray_remote_args["num_cpus"] == 1
    assert embed.ray_remote_args["num_gpus"] == (1 if device == "cuda" else 0)


def test_ray_encoder_actors_require_the_custom_resources_and_decode_tasks_do_not(local_ray):
    dataset = build_dataset(_job("cpu"), RayOptions(encoder_resources={"encoder": 1.0}))
    embed = dataset._logical_plan.dag
    assert embed.ray_remote_args["resources"] == {"encoder": 1.0}
    assert "resources" not in embed.input_dependencies[0].ray_remote_args
    assert "resources" not in build_dataset(_job("cpu"), RayOptions())._logical_plan.dag.ray_remote_args


def test_ray_in_flight_shards_are_bounded_by_the_object_store_budget(local_ray):
    default = ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory
    unbounded = build_dataset(_job("cpu"), RayOptions())
    bounded = build_dataset(_job("cpu"), RayOptions(object_store_mb=512))
    assert bounded.context.execution_options.resource_limits.object_store_memory == 512 * MIB
    # The budget is this run's: neither the process's DataContext nor a run without it is changed.
    assert ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory == default
    assert unbounded.context.execution_options.resource_limits.object_store_memory == default
    assert bounded._logical_plan.dag.compute.max_tasks_in_flight_per_actor == 2


def _beam_steps(runner: BeamRunner, tmp_path) -> dict[str, bytes | None]:
    """Each leaf step (unique name) of the graph `runner` builds, with its accelerator hint (None without)."""
    job = _job("cuda")
    shards = tmp_path / "shards.parquet"
    pq.write_table(job.shard_table(), shards)
    pipeline = beam.Pipeline()
    build_pipeline(pipeline, job, str(shards), runner.encoder_accelerator())
    proto = pipeline.to_runner_api()
    environments = proto.components.environments
    return {
        t.unique_name: environments[t.environment_id].resource_hints.get(ACCELERATOR_HINT)
        for t in proto.components.transforms.values()
        if t.environment_id and not t.subtransforms
    }


def test_on_dataflow_only_the_encode_step_asks_for_a_gpu_and_decode_runs_apart(tmp_path):
    runner = DataflowRunner(BeamOptions(worker_accelerator=ACCELERATOR, machine_type="g2-standard-8"))
    steps = _beam_steps(runner, tmp_path)
    hinted = {name for name, hint in steps.items() if hint is not None}
    assert hinted and all(name.startswith("Embed/") for name in hinted)
    assert {steps[name] for name in hinted} == {f"{ACCELERATOR};machine_type:g2-standard-8".encode()}
    assert any(name.startswith("Decode") for name in steps) and all(
        steps[name] is None for name in steps if name.startswith(("Shards", "Decode", "WriteShard", "Commit")))
    # The fusion break between the CPU and the GPU steps.
    assert any(name.startswith("ToEncoderWorkers/") for name in steps)


def test_beam_local_runners_keep_decode_and_encode_fused_without_hints(tmp_path):
    steps = _beam_steps(BeamRunner(), tmp_path)
    assert all(hint is None for hint in steps.values())
    assert not any(name.startswith("ToEncoderWorkers") for name in steps)
