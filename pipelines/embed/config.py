"""The configuration of an embed run, declared once.

`EmbedConfig` (nested frozen dataclasses: `EncoderConfig`, `DecodeConfig`, `UriPolicy`, the engine options) holds
every option's type and default. `OPTIONS` adds, per option, its flag, its help and the rule its value must meet.
From these two derive: the `embed` and `plan` command lines (`add_run_arguments`, `config_from_args`), their
`--config` file (TOML, one key per option, read through the same declarations), the checks
(`EmbedConfig.validate`), the Dataflow Flex Template's parameters (the launcher parses them with the same parser;
`tests/infra` checks `infra/dataflow/metadata.json` against `OPTIONS`) and the `runs` row (the config, as JSON).
A new option is a field with its default plus one `Option` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from catalog_embed.pipelines.io import storage
from catalog_embed.pipelines.io.catalog import UriPolicy
from catalog_embed.pipelines.io.store import run_id_problem
from catalog_embed.pipelines.runners.options import (
    ACCELERATOR_EXAMPLE,
    BEAM_RUNNERS,
    RUNNER_CLASSES,
    BeamOptions,
    RayOptions,
    parse_resources,
)
from catalog_embed.schemas.errors import ConfigError
from catalog_embed.workers.audio import DecodeConfig
from catalog_embed.workers.stages import FRONT_END_PLACEMENTS, EncoderConfig

# Decode processes per core beyond which --workers is a typo, not a plan (each process holds a decoder and memory).
WORKERS_PER_CORE = 4
# Parallelism hint of the distributed runners: far above any one job's useful fan-out.
MAX_ENGINE_WORKERS = 4096
# The share of a model's tracks that one `--prune` may delete unless the user raises it. Takedowns and edits
# remove well under 10% of a catalog per night; a manifest that lost more than that is far likelier to be
# truncated, filtered or the wrong file, and pruned rows come back only through Delta time travel.
PRUNE_MAX_SHARE = 0.1


@dataclass(frozen=True)
class EmbedConfig:
    """A whole embed run; saved as JSON with its `runs` row. Flags and help: `OPTIONS`.

    Attributes:
        catalog: manifest file, directory or glob URI.
        out: output root holding the tables.
        encoder: which encoder, where and how it runs.
        decode: the decode stage's limits.
        runner: engine name (see `catalog_embed.pipelines.runners.options.RUNNER_CLASSES`).
        workers: decode worker processes (local runner) or parallelism hint (other runners).
        shard_size: tracks per part file.
        write_windows: also write the per-window timeline to the `windows` table.
        decode_timeout_s: a track whose decode takes longer fails (the worker is replaced).
        max_failure_ratio: abort the run when more than this fraction of tracks fail.
        retry_failed: retry tracks that failed before even if their file is unchanged.
        run_id: explicit run id (letters, digits, '.', '_', '-'); an id already committed is refused. When None, an
            interrupted run (its process dead) that planned the same work is resumed, else a new id is made.
        prune: delete the rows of tracks gone from the catalog instead of marking them `deleted`.
        prune_max_share: the largest share of the model's tracks (live embeddings and failures) one `prune` may
            delete; a larger one is refused before any work (a truncated manifest). 1.0 allows any.
        maintain_target_mb: after committing, compact the tables' files below this size and checkpoint them, as
            `catalog-embed maintain --target-mb` does; 0 leaves maintenance to a separate `maintain`.
        policy: which URIs the manifest may point at.
        storage_options: deltalake storage options for --out (an S3 endpoint, locking); credentials come from
            the environment's default chain, never from here.
        beam: options of `--runner beam` and `--runner dataflow`.
        ray: options of `--runner ray`.
    """

    catalog: str
    out: str
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    runner: str = "local"
    workers: int = 2
    shard_size: int = 64
    write_windows: bool = False
    decode_timeout_s: float = 300.0
    max_failure_ratio: float = 0.5
    retry_failed: bool = False
    run_id: str | None = None
    prune: bool = False
    prune_max_share: float = PRUNE_MAX_SHARE
    maintain_target_mb: int = 0
    policy: UriPolicy = field(default_factory=UriPolicy)
    storage_options: dict[str, str] | None = None
    beam: BeamOptions = field(default_factory=BeamOptions)
    ray: RayOptions = field(default_factory=RayOptions)

    def validate(self) -> None:
        """Raise ConfigError naming the option to change: each option's own rule (`OPTIONS`), then the rules
        between options."""
        for option in OPTIONS:
            option.check(self)
        if self.workers > self.max_workers():
            per_core = f" ({WORKERS_PER_CORE} decode processes per core of this machine)" if self.runner == "local" else ""
            msg = f"--workers {self.workers} is more than {self.max_workers()}{per_core}: lower it"
            raise ConfigError(msg)
        if self.decode.min_duration_s > self.decode.max_duration_s:
            msg = (
                f"--min-duration {self.decode.min_duration_s:g} is above --max-duration {self.decode.max_duration_s:g}: "
                "every track would fail; lower --min-duration or raise --max-duration"
            )
            raise ConfigError(msg)
        if len(self.models) > 1:
            self._validate_models()
        self.beam.validate(self.runner, self.out, self.catalog, self.encoder.device)
        self.ray.validate(self.runner)

    @property
    def models(self) -> tuple[str, ...]:
        """The encoders of the run: `--model a,b,...` names several, each track decoded once for all of them."""
        return tuple(name.strip() for name in self.encoder.model.split(","))

    def for_model(self, model: str) -> EmbedConfig:
        """This config with `model` as its only encoder."""
        return dataclasses.replace(self, encoder=dataclasses.replace(self.encoder, model=model))

    def _validate_models(self) -> None:
        """The rules of a run with several encoders: distinct names, and no option that names one encoder's
        layers or weights (run such an encoder alone)."""
        models = self.models
        if "" in models or len(set(models)) < len(models):
            msg = f"--model {self.encoder.model!r}: name each encoder once, comma-separated (a,b,c)"
            raise ConfigError(msg)
        for flag, value in (
            ("--layer", self.encoder.layers), ("--weights", self.encoder.weights),
            ("--weights-sha256", self.encoder.weights_sha256),
        ):
            if value:
                msg = (
                    f"{flag} applies to one encoder, and --model names {len(models)}: drop {flag} (each encoder "
                    f"writes its default layer with its own weights), or run that encoder alone"
                )
                raise ConfigError(msg)

    def max_workers(self) -> int:
        """The largest --workers accepted: decode processes are local to this machine on the local runner."""
        if self.runner == "local":
            return WORKERS_PER_CORE * len(os.sched_getaffinity(0))
        return MAX_ENGINE_WORKERS

    def runner_options(self) -> dict[str, object]:
        """Keyword arguments of the selected runner's constructor: its engine options."""
        engine = {"beam": self.beam, "dataflow": self.beam, "ray": self.ray}
        return {"options": engine[self.runner]} if self.runner in engine else {}

    def encoder_runs_here(self) -> bool:
        """Whether the encoder runs on this machine, so that its device can be checked before any work.

        On Dataflow and on a Ray cluster the device is the workers' (the Ray runner checks the cluster's GPUs).
        """
        return self.runner != "dataflow" and not (self.runner == "ray" and self.ray.uses_cluster())


@dataclass(frozen=True)
class Option:
    """One command-line option of `embed` and `plan`: where its value lives in `EmbedConfig`, and how it is spelt,
    explained and checked. Its type and default are the field's.

    Attributes:
        path: the field, dotted through nested configs ('decode.max_duration_s').
        flag: the command-line flag.
        help: one line for `--help`.
        rule: what a valid value is, completing "--flag must ..." (empty: any value of the type).
        valid: the rule as a predicate on the value.
        parse: turns the parsed command-line value into the field's value (e.g. a list into a tuple).
        kind: 'value' (takes an argument), 'switch' (store_true), 'toggle' (--x/--no-x) or 'repeat' (append).
        type: the argument's type, when the field's default (None) does not tell it.
        choices: the values allowed.
        metavar: the argument's name in `--help`.
        group: the `--help` section, for engine options.
        required: must be given.
    """

    path: str
    flag: str
    help: str
    rule: str = ""
    valid: Callable[[Any], bool] | None = None
    parse: Callable[[Any], Any] | None = None
    kind: str = "value"
    type: type | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    group: str | None = None
    required: bool = False

    @property
    def dest(self) -> str:
        """The argparse attribute."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def key(self) -> str:
        """The option's key in a `--config` file: the flag without its dashes ('max-duration')."""
        return self.flag.removeprefix("--")

    def value(self, config: EmbedConfig) -> Any:
        """This option's value in `config`."""
        value: Any = config
        for name in self.path.split("."):
            value = getattr(value, name)
        return value

    def check(self, config: EmbedConfig) -> None:
        """Raise ConfigError when the value breaks this option's rule."""
        value = self.value(config)
        if self.valid is not None and value is not None and not self.valid(value):
            msg = f"{self.flag} must {self.rule}, got {value!r}"
            raise ConfigError(msg)

    def default(self) -> Any:
        """The field's default."""
        return self.value(EmbedConfig(catalog="", out=""))

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add the flag, its default shown in `--help` (the field's default, translated back for the CLI).

        A flag left out leaves no attribute (argparse.SUPPRESS), so that `config_from_args` can tell it from a flag
        given with the default's value: the `--config` file fills only the options left out.
        """
        shown = _cli_form(self.default())
        described = f"{self.help} (default: {shown})" if shown not in (None, False, "") else self.help
        if self.required:
            described += " (required: here or in --config)"
        options: dict[str, Any] = {"help": described, "default": argparse.SUPPRESS}
        if self.kind == "switch":
            options |= {"action": "store_true"}
        elif self.kind == "toggle":
            options |= {"action": argparse.BooleanOptionalAction}
        elif self.kind == "repeat":
            options |= {"action": "append", "metavar": self.metavar}
        else:
            options |= {"type": self.value_type()}
            options |= {k: v for k, v in (("choices", self.choices), ("metavar", self.metavar)) if v}
        parser.add_argument(self.flag, **options)

    def value_type(self) -> type:
        """The type of the flag's argument (options that take one)."""
        default = self.default()
        return self.type or (type(default) if default is not None and not isinstance(default, tuple) else str)

    def from_file(self, value: Any, path: str) -> Any:
        """A `--config` file's value for this option, as the flag would have parsed it.

        Raises:
            ConfigError: the value is not of the type (or among the choices) the flag takes.
        """
        if self.kind in ("switch", "toggle"):
            expected, ok = "true or false", isinstance(value, bool)
        elif self.kind == "repeat":
            expected = "a list of strings"
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            kind = self.value_type()
            expected = {int: "an integer", float: "a number"}.get(kind, "a string")
            accepted = (int, float) if kind is float else kind
            ok = isinstance(value, accepted) and not isinstance(value, bool)
            if ok and self.choices and value not in self.choices:
                expected, ok = f"one of {', '.join(self.choices)}", False
            value = kind(value) if ok else value
        if not ok:
            msg = f"--config {path}: {self.key} = {value!r} must be {expected}, as {self.flag} takes"
            raise ConfigError(msg)
        return value


def _cli_form(value: Any) -> Any:
    """A field's default as typed on the command line (layers: a comma-separated string)."""
    return ",".join(value) if isinstance(value, tuple) else value


def _layers(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _beam_options(options: list[str]) -> tuple[str, ...]:
    return tuple(option if option.startswith("--") else f"--{option}" for option in options)


def _run_id(value: str) -> bool:
    return run_id_problem(value) is None


_POSITIVE = "be positive"
_BEAM = "Beam and Dataflow (--runner beam, --runner dataflow)"

OPTIONS: tuple[Option, ...] = (
    Option("catalog", "--catalog", "manifest (.csv/.parquet/.jsonl), directory or glob; any fsspec URI", required=True),
    Option("out", "--out", "output root for the tables (local path, s3://, gs://)", required=True),
    Option(
        "encoder.model", "--model",
        "encoder name (see `catalog-embed models`), or a bring-your-own encoder's config: a path or URI *.json; "
        "several comma-separated (a,b,c) decode each track once for all of them",
    ),
    Option(
        "encoder.layers", "--layer", "layer(s) to write, comma-separated (empty: the encoder's default layer)",
        parse=_layers,
    ),
    Option("encoder.device", "--device", "cpu, cuda or cuda:N"),
    Option("encoder.precision", "--precision", "network precision (fp16: GPU only)", choices=("fp32", "bf16", "fp16")),
    Option(
        "encoder.front_end_on", "--front-end-on",
        "where spectrograms are made: decode workers, the encoder's device, or auto (the GPU when there is one)",
        choices=FRONT_END_PLACEMENTS,
    ),
    Option(
        "encoder.compile", "--compile",
        "torch.compile the network (musicnn, MULE) in fixed-shape batches, code cached (unset: on a GPU)",
        kind="toggle",
    ),
    Option("encoder.weights", "--weights", "weights file or folder, for encoders that need them"),
    Option("encoder.weights_sha256", "--weights-sha256", "refuse weights whose sha256 differs"),
    Option(
        "encoder.trust_remote_code", "--trust-remote-code",
        "hf: models: run Python code shipped with the checkpoint (its own model classes); read it first",
        kind="switch",
    ),
    Option(
        "encoder.window_s", "--window-s", "hf: wav2vec2-style models and hear: modules: seconds per window (unset: 10)",
        rule=_POSITIVE, valid=lambda v: v > 0, type=float,
    ),
    Option(
        "runner", "--runner", f"engine: {', '.join(RUNNER_CLASSES)}", rule=f"be one of {', '.join(RUNNER_CLASSES)}",
        valid=RUNNER_CLASSES.__contains__,
    ),
    Option("workers", "--workers", "decode worker processes (Beam: SDK workers)", rule="be at least 1",
           valid=lambda v: v >= 1),
    Option(
        "encoder.batch_windows", "--batch-windows",
        "windows per encoder call (unset: 8 on a CPU, sized to a GPU's measured memory)",
        rule="be at least 1", valid=lambda v: v >= 1, type=int,
    ),
    Option("shard_size", "--shard-size", "tracks per part file", rule="be at least 1", valid=lambda v: v >= 1),
    Option("write_windows", "--windows", "also write per-window embeddings (windows table)", kind="switch"),
    Option("decode.max_duration_s", "--max-duration", "seconds; longer tracks fail", rule=_POSITIVE,
           valid=lambda v: v > 0),
    Option("decode.min_duration_s", "--min-duration", "seconds; shorter tracks fail", rule="be >= 0",
           valid=lambda v: v >= 0),
    Option("decode.max_file_mb", "--max-file-mb", "larger files fail without being read", rule=_POSITIVE,
           valid=lambda v: v > 0),
    Option("decode_timeout_s", "--decode-timeout", "seconds per track before it fails", rule=_POSITIVE,
           valid=lambda v: v > 0),
    Option(
        "decode.max_memory_mb", "--decode-memory-mb",
        "memory a decode process may add while decoding one track; beyond it that track fails",
        rule="be at least 64 (decoding needs working memory)", valid=lambda v: v >= 64,
    ),
    Option("max_failure_ratio", "--max-failure-ratio", "abort when a larger share of tracks fails",
           rule="be in [0, 1]", valid=lambda v: 0.0 <= v <= 1.0),
    Option("retry_failed", "--retry-failed", "retry tracks that failed before", kind="switch"),
    Option(
        "run_id", "--run-id", "explicit run id (unset: resume an interrupted run of the same work, else a new id)",
        rule="be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', no '..')",
        valid=_run_id,
    ),
    Option("prune", "--prune", "delete rows of tracks gone from the catalog", kind="switch"),
    Option(
        "prune_max_share", "--prune-max-share",
        "largest share of the model's tracks one --prune may delete (1 allows any; a larger prune is refused)",
        rule="be in [0, 1]", valid=lambda v: 0.0 <= v <= 1.0,
    ),
    # A value, not a switch: a Dataflow Flex Template passes every parameter as `--name=value`.
    Option(
        "maintain_target_mb", "--maintain-target-mb",
        "after committing, pack table files below this many MB and checkpoint the tables (0: leave it to `maintain`)",
        rule="be >= 0", valid=lambda v: v >= 0,
    ),
    Option(
        "policy.allow_prefixes", "--allow-prefix",
        "also allow manifest URIs under this prefix (default: only under the catalog's folder); repeatable",
        kind="repeat", parse=tuple, metavar="URI",
    ),
    Option("policy.allow_http", "--allow-http", "allow http(s) URIs in the manifest", kind="switch"),
    Option("storage_options", "--storage-option", storage.HELP, kind="repeat", parse=storage.parse_storage_options,
           metavar="KEY=VALUE"),
    Option("beam.beam_runner", "--beam-runner", "local Beam runner of --runner beam", choices=BEAM_RUNNERS, group=_BEAM),
    Option("beam.project", "--project", "Dataflow: Google Cloud project", group=_BEAM),
    Option("beam.region", "--region", "Dataflow: region, e.g. us-central1", group=_BEAM),
    Option("beam.temp_location", "--temp-location", "Dataflow: gs:// folder for temporary files", group=_BEAM),
    Option(
        "beam.staging_location", "--staging-location", "Dataflow: gs:// folder for staged files (unset: temp location)",
        group=_BEAM,
    ),
    Option("beam.sdk_container_image", "--sdk-container-image", "Dataflow: worker image built from infra/Dockerfile",
           group=_BEAM),
    Option(
        "beam.worker_accelerator", "--worker-accelerator",
        f"Dataflow: GPUs of the encode step's workers, e.g. '{ACCELERATOR_EXAMPLE}'", group=_BEAM,
    ),
    Option(
        "beam.machine_type", "--machine-type",
        "Dataflow: worker machine type, e.g. g2-standard-8 (with --worker-accelerator: the encode step's workers)",
        group=_BEAM,
    ),
    Option("beam.max_num_workers", "--max-num-workers", "Dataflow: autoscaling limit", type=int, group=_BEAM),
    Option("beam.job_name", "--job-name", "Dataflow: job name (unset: derived from the run id)", group=_BEAM),
    Option(
        "beam.detach", "--detach", "Dataflow: return once the job is submitted (it commits the run when it finishes)",
        kind="switch", group=_BEAM,
    ),
    Option(
        "beam.pipeline_args", "--beam-option", "any other Beam pipeline option, e.g. network=default (repeatable)",
        kind="repeat", parse=_beam_options, metavar="KEY=VALUE", group=_BEAM,
    ),
    Option(
        "ray.address", "--address", "existing Ray cluster: auto, host:port or ray://host:10001 (unset: a local one)",
        group="Ray (--runner ray)",
    ),
    Option("ray.embed_actors", "--embed-actors", "encoder actors (one GPU each with --device cuda)",
           group="Ray (--runner ray)"),
    Option(
        "ray.object_store_mb", "--object-store-mb",
        "object-store memory for shards in flight; decoders wait when it is full (unset: Ray Data's share of the "
        "cluster's object store)",
        type=int, group="Ray (--runner ray)",
    ),
    Option(
        "ray.encoder_resources", "--encoder-resource",
        "custom Ray resource each encoder actor reserves, NAME=AMOUNT (repeatable), e.g. encoder=1: the actors run "
        "only on nodes started with `ray start --resources '{\"encoder\": 1}'`",
        kind="repeat", parse=parse_resources, metavar="NAME=AMOUNT", group="Ray (--runner ray)",
    ),
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option of `OPTIONS` to the `embed` or `plan` parser, engine options in their own sections, and
    `--config`."""
    parser.add_argument(
        "--config", metavar="FILE",
        help="TOML file of these options, keyed by their flags' names (max-duration = 600, windows = true, "
             "allow-prefix = [\"s3://b/\"]); a flag given too overrides the file's value",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        target = parser
        if option.group is not None:
            target = groups.setdefault(option.group, parser.add_argument_group(option.group))
        option.add_to(target)


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    """Build the config from a namespace `add_run_arguments` parsed: each option from its flag, else from the
    `--config` file, else its default (no other logic: checks are `validate`'s).

    Raises:
        ConfigError: the file is unreadable or not TOML, holds a key that is no option or a value of the wrong
            type, or a required option is in neither.
    """
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    config = EmbedConfig(catalog="", out="")
    for option in OPTIONS:
        if hasattr(args, option.dest):
            value = getattr(args, option.dest)
        elif option.key in from_file:
            value = from_file[option.key]
        elif option.required:
            msg = f"{option.flag} is required: pass it, or set {option.key} in the --config file"
            raise ConfigError(msg)
        else:
            continue
        config = _replaced(config, option.path.split("."), option.parse(value) if option.parse else value)
    return config


def read_config_file(path: str) -> dict[str, Any]:
    """The options a `--config` TOML file sets, by key, each as its flag would have parsed it.

    Raises:
        ConfigError: unreadable, not TOML, an unknown key (the message lists the valid ones) or a wrong type.
    """
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        msg = f"--config {path} cannot be read ({exc.strerror or exc}): pass a readable TOML file"
        raise ConfigError(msg) from exc
    except tomllib.TOMLDecodeError as exc:
        msg = f"--config {path} is not valid TOML ({exc}): fix the file"
        raise ConfigError(msg) from exc
    options = {option.key: option for option in OPTIONS}
    unknown = sorted(set(table) - set(options))
    if unknown:
        msg = (
            f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid keys (the flags' names): {', '.join(options)}"
        )
        raise ConfigError(msg)
    return {key: options[key].from_file(value, path) for key, value in table.items()}


def _replaced(config: Any, path: list[str], value: Any) -> Any:
    """`config` with the field at `path` (through nested frozen dataclasses) set to `value`."""
    name, rest = path[0], path[1:]
    return dataclasses.replace(config, **{name: _replaced(getattr(config, name), rest, value) if rest else value})


_Saved = TypeVar("_Saved")


def from_saved(cls: type[_Saved], payload: dict[str, Any], where: str = "") -> _Saved:
    """Read a dataclass back from the JSON it was saved as (`dataclasses.asdict`), nested dataclasses and tuples
    included. A field the payload lacks takes its default (it was added since); a key the dataclass has no field
    for is an error, so a renamed field never reads back as a silent default.

    Raises:
        ConfigError: naming the key that is not a field, or the field that is missing and has no default.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(payload) - names)
    if unknown:
        msg = f"saved field {where}{unknown[0]} is not a field of {cls.__name__} in this release"
        raise ConfigError(msg)
    values = {}
    for name, value in payload.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_saved(kind, value, f"{where}{name}.")
        elif isinstance(value, list) and typing.get_origin(kind) is tuple:
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        msg = f"saved {cls.__name__} {where or 'config'} lacks a field: {exc}"
        raise ConfigError(msg) from exc
