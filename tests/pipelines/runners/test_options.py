"""Engine options: malformed ones fail before any work with a message naming the option and the fix; well-formed
Dataflow and Flex Template options turn into the Beam options Dataflow needs (built here, never submitted)."""

from __future__ import annotations

import argparse
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions, WorkerOptions
from rich.console import Console

from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.embed.config import EmbedConfig, add_run_arguments, config_from_args
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.runners import EmbedJob
from catalog_embed.pipelines.runners.beam import DataflowRunner
from catalog_embed.pipelines.runners.flex_template import parse_launcher_args
from catalog_embed.pipelines.runners.options import BeamOptions, RayOptions
from catalog_embed.schemas.errors import ConfigError
from catalog_embed.workers.rows import RowContext
from catalog_embed.workers.stages import EncoderConfig

QUIET = Console(quiet=True)
ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
DATAFLOW = BeamOptions(
    project="my-project",
    region="us-central1",
    temp_location="gs://my-bucket/tmp",
    sdk_container_image="us-docker.pkg.dev/my-project/catalog-embed/worker:0.1.0",
)


def _dataflow_config(**changes) -> EmbedConfig:
    beam = replace(DATAFLOW, **{k: v for k, v in changes.items() if k in BeamOptions.__dataclass_fields__})
    rest = {"catalog": "gs://my-bucket/catalog.parquet", "out": "gs://my-bucket/tables"}
    rest |= {k: v for k, v in changes.items() if k not in BeamOptions.__dataclass_fields__}
    return EmbedConfig(runner="dataflow", beam=beam, **rest)


def test_an_unknown_runner_is_refused_with_the_valid_ones(capsys, tmp_path):
    assert main(["embed", "--catalog", str(tmp_path), "--out", str(tmp_path / "out"), "--runner", "spark"]) == 2
    err = capsys.readouterr().err
    assert "--runner must be one of local, beam, dataflow, ray, got 'spark'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temp_location": None}, "--runner dataflow needs --temp-location: a gs:// folder"),
        ({"project": None}, "--runner dataflow needs --project"),
        ({"region": None}, "--runner dataflow needs --region"),
        ({"sdk_container_image": None}, "--runner dataflow needs --sdk-container-image: the worker image built"),
        ({"temp_location": "/tmp/beam"}, "--temp-location must be a gs:// folder"),
        ({"out": "/data/tables"}, "--out '/data/tables' is on this machine's disk"),
        ({"encoder": EncoderConfig(device="cuda")}, "--device cuda on Dataflow needs --worker-accelerator"),
        ({"worker_accelerator": ACCELERATOR}, "--worker-accelerator attaches GPUs the encoder would not use"),
        ({"worker_accelerator": "nvidia-l4", "encoder": EncoderConfig(device="cuda")}, "names no GPU type"),
        ({"max_num_workers": 0}, "--max-num-workers must be at least 1"),
        ({"worker_accelerator": f"{ACCELERATOR};machine_type:g2-standard-8", "machine_type": "g2-standard-4",
          "encoder": EncoderConfig(device="cuda")}, "--machine-type and the machine_type of --worker-accelerator"),
    ],
)
def test_malformed_dataflow_options_name_the_option_and_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _dataflow_config(**changes).validate()


def test_dataflow_options_given_to_another_runner_are_refused():
    config = EmbedConfig(catalog="c", out="o", runner="beam", beam=BeamOptions(temp_location="gs://b/tmp"))
    with pytest.raises(ConfigError, match=r"--temp-location only apply to --runner dataflow \(the runner is 'beam'\)"):
        config.validate()
    with pytest.raises(ConfigError, match="--address only apply to --runner ray"):
        EmbedConfig(catalog="c", out="o", ray=RayOptions(address="auto")).validate()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_server() -> Iterator[int]:
    """Something that answers on a port but is no Ray head (as a dashboard's port would)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_an_unreachable_ray_address_fails_before_any_work(small_catalog, tmp_path):
    port = _closed_port()
    config = EmbedConfig(catalog=str(small_catalog.manifest_path), out=str(tmp_path / "out"), runner="ray",
                         ray=RayOptions(address=f"127.0.0.1:{port}"))
    with pytest.raises(ConfigError, match=rf"--address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"):
        run_embed(config, QUIET)
    assert not (tmp_path / "out").exists()


def test_a_port_that_is_not_a_ray_head_is_named(http_server, tmp_path):
    config = EmbedConfig(catalog="c", out=str(tmp_path), runner="ray",
                         ray=RayOptions(address=f"127.0.0.1:{http_server}"))
    with pytest.raises(ConfigError, match="answers but not as a Ray head does .* not the dashboard's"):
        run_embed(config, QUIET)


def test_prism_without_its_binary_says_where_to_get_it(tmp_path):
    missing = tmp_path / "prism.zip"
    config = EmbedConfig(catalog="c", out=str(tmp_path), runner="beam",
                         beam=BeamOptions(beam_runner="prism", pipeline_args=(f"--prism_location={missing}",)))
    with pytest.raises(ConfigError, match="--beam-runner prism needs Beam's Prism binary.*prism_location"):
        run_embed(config, QUIET)


def _job(**changes) -> EmbedJob:
    return EmbedJob(
        run_id="20261123T101500Z-0a1b2c3d",
        config=EmbedConfig(catalog="gs://my-bucket/c", out="gs://my-bucket/tables", encoder=EncoderConfig(device="cuda")),
        items=(),
        rows=RowContext("r", "musicnn-msd", ("penultimate",), "v", "h"),
        **changes,
    )


def test_dataflow_gets_runner_v2_the_worker_image_and_gpus():
    options = DataflowRunner(replace(DATAFLOW, worker_accelerator=ACCELERATOR, machine_type="g2-standard-8",
                                     max_num_workers=8, pipeline_args=("--network=default",)))
    beam = options.pipeline_options(_job())
    cloud, worker = beam.view_as(GoogleCloudOptions), beam.view_as(WorkerOptions)
    assert beam.view_as(StandardOptions).runner == "DataflowRunner"
    assert (cloud.project, cloud.region, cloud.temp_location, cloud.staging_location) == (
        "my-project", "us-central1", "gs://my-bucket/tmp", "gs://my-bucket/tmp")
    assert cloud.job_name == "catalog-embed-20261123t101500z-0a1b2c3d"
    # Right fitting: the GPU and its machine go to the encode step's hint (`test_stage_placement`), not to every
    # worker, which the service option and a pipeline-wide GPU machine type would do.
    assert not cloud.dataflow_service_options
    assert options.encoder_accelerator() == f"{ACCELERATOR};machine_type:g2-standard-8"
    assert worker.sdk_container_image == DATAFLOW.sdk_container_image
    assert (worker.machine_type, worker.max_num_workers, worker.network) == (None, 8, "default")
    assert "use_runner_v2" in beam.get_all_options()["experiments"]


def test_the_flex_template_launcher_arguments_become_our_flags_and_beam_options():
    args = parse_launcher_args([
        "--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
        "--temp_location=gs://my-bucket/tmp", "--template_location=gs://my-bucket/launch/job.json",
        "--catalog=gs://my-bucket/catalog.parquet", "--out=gs://my-bucket/tables", "--shard_size=32",
        "--device=cuda", f"--worker_accelerator={ACCELERATOR}", "--sdk_container_image=img", "--network=default",
    ])
    config = config_from_args(args)
    assert (config.catalog, config.shard_size, config.encoder.device) == (
        "gs://my-bucket/catalog.parquet", 32, "cuda")
    assert (config.beam.temp_location, config.beam.worker_accelerator, config.beam.sdk_container_image) == (
        "gs://my-bucket/tmp", ACCELERATOR, "img")
    assert config.beam.pipeline_args == ("--template_location=gs://my-bucket/launch/job.json", "--network=default")
    replace(config, runner="dataflow").validate()


def test_the_ray_object_store_budget_is_parsed_checked_and_only_for_ray(capsys, tmp_path):
    catalog, out = str(tmp_path), str(tmp_path / "out")
    assert main(["embed", "--catalog", catalog, "--out", out, "--object-store-mb", "512"]) == 2
    assert "--object-store-mb only apply to --runner ray (the runner is 'local')" in capsys.readouterr().err
    assert main(["embed", "--catalog", catalog, "--out", out, "--runner", "ray", "--object-store-mb", "0"]) == 2
    assert "--object-store-mb must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_encoder_resources_are_parsed_checked_and_only_for_ray(capsys, tmp_path):
    catalog, out = str(tmp_path / "none.csv"), str(tmp_path / "out")
    assert main(["embed", "--catalog", catalog, "--out", out, "--encoder-resource", "encoder=1"]) == 2
    assert "--encoder-resource only apply to --runner ray (the runner is 'local')" in capsys.readouterr().err
    ray = ["embed", "--catalog", catalog, "--out", out, "--runner", "ray"]
    assert main([*ray, "--encoder-resource", "=1"]) == 2
    assert "--encoder-resource '=1' is not NAME=AMOUNT" in capsys.readouterr().err
    assert main([*ray, "--encoder-resource", "encoder=lots"]) == 2
    assert "--encoder-resource 'encoder=lots' is not NAME=AMOUNT" in capsys.readouterr().err
    assert main([*ray, "--encoder-resource", "GPU=1"]) == 2
    assert "--encoder-resource GPU: Ray's own resources are not custom ones" in capsys.readouterr().err
    assert main([*ray, "--encoder-resource", "encoder=0"]) == 2
    assert "--encoder-resource encoder=0: the amount must be positive" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(["--catalog", catalog, "--out", out, "--runner", "ray", "--encoder-resource", "encoder",
                              "--encoder-resource", "tpu-slice=0.5"])
    assert config_from_args(args).ray.encoder_resources == {"encoder": 1.0, "tpu-slice": 0.5}
