"""The engines (`RUNNER_CLASSES`) and the options of the distributed ones (`--runner beam|dataflow|ray`).

The options are frozen dataclasses held by `EmbedConfig` (their flags are declared in `catalog_embed.pipelines.embed.config.OPTIONS`),
so they are validated with the rest of the config before any work and saved with the run. This module imports neither Beam nor Ray: checks that need the engine (is the
Prism binary there, does a Ray cluster answer at `--address`) run when the runner is constructed, which
`run_embed` does before it reads the catalog.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from catalog_embed.schemas.errors import ConfigError

# Runner name -> "module:class" of its engine adapter, imported only when that runner is chosen.
RUNNER_CLASSES: dict[str, str] = {
    "local": "catalog_embed.pipelines.runners.local:LocalRunner",
    "beam": "catalog_embed.pipelines.runners.beam:BeamRunner",
    "dataflow": "catalog_embed.pipelines.runners.beam:DataflowRunner",
    "ray": "catalog_embed.pipelines.runners.ray:RayRunner",
}
BEAM_RUNNERS = ("direct", "prism")
# A Dataflow worker accelerator as Dataflow spells it, e.g. "type:nvidia-l4;count:1;install-nvidia-driver".
ACCELERATOR_EXAMPLE = "type:nvidia-l4;count:1;install-nvidia-driver"
_REMOTE_SCHEMES = ("gs://", "s3://")
# Resources Ray reserves under their own arguments (num_cpus, num_gpus, memory), not in `resources`.
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class BeamOptions:
    """Options of `--runner beam` (a local Beam runner) and `--runner dataflow`.

    Attributes:
        beam_runner: the local Beam runner of `--runner beam`: 'direct' (Beam's DirectRunner, in this process)
            or 'prism' (Beam's portable local runner; Beam downloads its binary on first use).
        project: Google Cloud project of the Dataflow job.
        region: Dataflow region, e.g. 'us-central1'.
        temp_location: gs:// folder Dataflow stages temporary files in.
        staging_location: gs:// folder for staged packages; defaults to `temp_location`.
        sdk_container_image: the worker image built from `infra/Dockerfile` (the package, torch, FFmpeg).
        worker_accelerator: the GPUs of the encode step's workers, e.g.
            'type:nvidia-l4;count:1;install-nvidia-driver' (Dataflow's accelerator hint; other steps get none);
            needed with `--device cuda`.
        machine_type: Dataflow worker machine type, e.g. 'g2-standard-8' for one L4 GPU; with
            `worker_accelerator`, the encode step's workers' type.
        max_num_workers: upper bound of Dataflow's autoscaling.
        job_name: Dataflow job name; derived from the run id when None.
        detach: return once the Dataflow job is submitted; the job commits the run from its last step.
        pipeline_args: further Beam pipeline options, passed through as given ('--network=default').
    """

    beam_runner: str = "direct"
    project: str | None = None
    region: str | None = None
    temp_location: str | None = None
    staging_location: str | None = None
    sdk_container_image: str | None = None
    worker_accelerator: str | None = None
    machine_type: str | None = None
    max_num_workers: int | None = None
    job_name: str | None = None
    detach: bool = False
    pipeline_args: tuple[str, ...] = ()

    def validate(self, runner: str, out: str, catalog: str, device: str) -> None:
        """Raise ConfigError naming the option to change.

        Args:
            runner: the selected runner; Dataflow options are an error unless it is 'dataflow'.
            out: the output root: Dataflow workers cannot write to this machine's disk.
            catalog: the catalog URI: Dataflow workers cannot read this machine's disk either.
            device: the encoder device: a GPU on Dataflow needs `--worker-accelerator`.
        """
        if self.beam_runner not in BEAM_RUNNERS:
            msg = f"--beam-runner must be one of {', '.join(BEAM_RUNNERS)}, got {self.beam_runner!r}"
            raise ConfigError(msg)
        dataflow_only = {
            "--project": self.project,
            "--region": self.region,
            "--temp-location": self.temp_location,
            "--staging-location": self.staging_location,
            "--sdk-container-image": self.sdk_container_image,
            "--worker-accelerator": self.worker_accelerator,
            "--machine-type": self.machine_type,
            "--max-num-workers": self.max_num_workers,
            "--job-name": self.job_name,
            "--detach": self.detach or None,
        }
        if runner != "dataflow":
            given = [flag for flag, value in dataflow_only.items() if value is not None]
            if given:
                msg = f"{', '.join(given)} only apply to --runner dataflow (the runner is {runner!r})"
                raise ConfigError(msg)
            return
        self._validate_dataflow(out, catalog, device)

    def _validate_dataflow(self, out: str, catalog: str, device: str) -> None:
        required = {
            "--project": (self.project, "the Google Cloud project to run in, e.g. --project my-project"),
            "--region": (self.region, "the Dataflow region, e.g. --region us-central1"),
            "--temp-location": (
                self.temp_location,
                "a gs:// folder Dataflow stages files in, e.g. --temp-location gs://my-bucket/tmp",
            ),
            "--sdk-container-image": (
                self.sdk_container_image,
                "the worker image built from infra/Dockerfile, e.g. "
                "--sdk-container-image us-docker.pkg.dev/my-project/catalog-embed/worker:0.1.0",
            ),
        }
        for flag, (value, what) in required.items():
            if not value:
                msg = f"--runner dataflow needs {flag}: {what}"
                raise ConfigError(msg)
        for flag, value in (("--temp-location", self.temp_location), ("--staging-location", self.staging_location)):
            if value and not value.startswith("gs://"):
                msg = f"{flag} must be a gs:// folder for Dataflow, got {value!r}"
                raise ConfigError(msg)
        for flag, uri in (("--out", out), ("--catalog", catalog)):
            if not uri.startswith(_REMOTE_SCHEMES):
                msg = (
                    f"{flag} {uri!r} is on this machine's disk, which Dataflow workers cannot reach: "
                    f"use a gs:// (or s3://) URI"
                )
                raise ConfigError(msg)
        if device.startswith("cuda") and not self.worker_accelerator:
            msg = f"--device {device} on Dataflow needs --worker-accelerator, e.g. '{ACCELERATOR_EXAMPLE}'"
            raise ConfigError(msg)
        if self.worker_accelerator:
            if not device.startswith("cuda"):
                msg = "--worker-accelerator attaches GPUs the encoder would not use: add --device cuda"
                raise ConfigError(msg)
            if "type:" not in self.worker_accelerator:
                msg = (
                    f"--worker-accelerator {self.worker_accelerator!r} names no GPU type: "
                    f"use Dataflow's form, e.g. '{ACCELERATOR_EXAMPLE}'"
                )
                raise ConfigError(msg)
            if self.machine_type and "machine_type:" in self.worker_accelerator:
                msg = (
                    "--machine-type and the machine_type of --worker-accelerator both name the GPU workers' "
                    "machine: give it once"
                )
                raise ConfigError(msg)
        if self.max_num_workers is not None and self.max_num_workers < 1:
            msg = f"--max-num-workers must be at least 1, got {self.max_num_workers}"
            raise ConfigError(msg)


@dataclass(frozen=True)
class RayOptions:
    """Options of `--runner ray`.

    Attributes:
        address: an existing cluster: 'auto' (the one `ray start` or `ray job submit` set up), 'host:port' of
            its head, or 'ray://host:10001' (Ray Client). None starts a local Ray instance for the run.
        embed_actors: encoder actors in the pool (each takes one GPU with `--device cuda`).
        object_store_mb: the object-store memory the run may fill with shards in flight (decoded audio waiting
            for an encoder, outputs waiting for the sink), across the cluster; decoders wait when it is full.
            None leaves Ray Data's default, a share of the cluster's object store.
        encoder_resources: custom Ray resources each encoder actor reserves besides its cores and GPUs, e.g.
            {'encoder': 1}: the actors then run only on nodes started with `ray start --resources
            '{"encoder": N}'` (accelerators Ray does not count as GPUs, or a node pool kept for encoding).
    """

    address: str | None = None
    embed_actors: int = 1
    object_store_mb: int | None = None
    encoder_resources: dict[str, float] | None = None

    def uses_cluster(self) -> bool:
        """Whether the run goes to an existing cluster: `--address`, or RAY_ADDRESS as `ray job submit` sets it."""
        return self.address is not None or bool(os.environ.get("RAY_ADDRESS"))

    def validate(self, runner: str) -> None:
        """Raise ConfigError naming the option to change (reachability is checked by the runner)."""
        if runner != "ray":
            given = [flag for flag, changed in (("--address", self.address is not None),
                                                ("--embed-actors", self.embed_actors != 1),
                                                ("--object-store-mb", self.object_store_mb is not None),
                                                ("--encoder-resource", bool(self.encoder_resources))) if changed]
            if given:
                msg = f"{', '.join(given)} only apply to --runner ray (the runner is {runner!r})"
                raise ConfigError(msg)
            return
        if self.embed_actors < 1:
            msg = f"--embed-actors must be at least 1, got {self.embed_actors}"
            raise ConfigError(msg)
        if self.object_store_mb is not None and self.object_store_mb < 1:
            msg = f"--object-store-mb must be at least 1, got {self.object_store_mb}"
            raise ConfigError(msg)
        for name, amount in (self.encoder_resources or {}).items():
            if name in _BUILTIN_RESOURCES:
                msg = (
                    f"--encoder-resource {name}: Ray's own resources are not custom ones (the encoder's cores and "
                    "GPUs come from --device); name a resource the encoder nodes advertise, e.g. encoder=1"
                )
                raise ConfigError(msg)
            if not amount > 0:
                msg = f"--encoder-resource {name}={amount:g}: the amount must be positive"
                raise ConfigError(msg)
        if self.address is not None and not self.address.strip():
            msg = "--address is empty: pass 'auto', the head's host:port, or ray://host:10001"
            raise ConfigError(msg)


def parse_resources(pairs: list[str]) -> dict[str, float] | None:
    """`NAME=AMOUNT` pairs of `--encoder-resource` as a dict (AMOUNT defaults to 1), or None when there are none.

    Raises:
        ConfigError: a pair has no name, or an amount that is not a number.
    """
    resources: dict[str, float] = {}
    for pair in pairs:
        name, sep, amount = pair.partition("=")
        try:
            resources[name.strip()] = float(amount) if sep else 1.0
        except ValueError:
            name = ""
        if not name.strip():
            msg = f"--encoder-resource {pair!r} is not NAME=AMOUNT (e.g. encoder=1)"
            raise ConfigError(msg)
    return resources or None
