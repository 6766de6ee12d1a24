"""Bring your own encoder: a TorchScript file, an ONNX graph or a Python factory, described by a JSON config.

`--model` takes such a config wherever it takes a registered name: any value ending in `.json` is one (a local
path or any fsspec URI; relative paths inside it are read relative to it). No registered name ends in `.json`.

The config's keys (all required unless marked optional):

    name         the model's name in the tables: lower-case letters, digits, '.', '_', '-'; not a registered name
    kind         "torchscript", "onnx" or "factory"
    path         torchscript, onnx: the model file
    factory      factory: "package.module:function", returning a `torch.nn.Module` or an `Encoder`
    kwargs       factory, optional: keyword arguments of that function
    weights      factory returning an nn.Module, optional: its state dict (.safetensors, or a torch.save file)
    sha256       optional: the sha256 the model file (torchscript, onnx) or the weights file (factory) must have
    front_end    {"type": "logmel", ...} (see `LogMelConfig`) or {"type": "waveform", "sample_rate", "window_s"}
    layers       {"layer name": dim, ...}: the network's outputs, in order; the first is the default
    licence      {"code": "...", "weights": "..."}: shown by `catalog-embed models`, recorded with every run
    description  optional

The network takes a batch of windows as the front end lays them out and returns one (n, dim) tensor per layer: a
tensor when one layer is declared, a tuple or list in the declared order, or a dict by layer name. An ONNX graph
has one input; its outputs are matched to the layers by name (a graph with one output may name it anything when one
layer is declared). `--weights` replaces the file the config names (model or weights file), `--weights-sha256` its
pin.

Nothing loaded here runs Python code it carries. A TorchScript archive is a zip of TorchScript code and tensors,
which `torch.jit.load` restores without Python's pickle; an ONNX graph is a protobuf; a factory's weights load only
from safetensors or with `torch.load(weights_only=True)`, and a pickle naming anything but tensors and containers
is refused with WeightsError. A factory's own module is Python the user chose to run.

Version: the first 16 hex digits of the model file's sha256 (torchscript, onnx); for a factory, of the state dict
its network holds once the weights are in (`state_dict_sha256`, so the same weights in another container keep the
version), or the version of the Encoder it returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import os
import pickle
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import fsspec
import safetensors.torch
import torch
import torchaudio
from safetensors import SafetensorError

from catalog_embed.schemas.errors import EncoderError, WeightsError
from catalog_embed.workers.encoders import encoder_names
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence
from catalog_embed.workers.encoders.handcrafted import WaveformWindows
from catalog_embed.workers.encoders.weights import sha256_file, state_dict_sha256

__all__ = [
    "CustomEncoderSpec",
    "FactoryEncoder",
    "LogMelConfig",
    "LogMelFrontEnd",
    "OnnxEncoder",
    "TorchScriptEncoder",
    "load_custom_encoder",
]

KINDS = ("torchscript", "onnx", "factory")

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Layer names become column names (`embedding_<layer>`).
_LAYER_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ZIP_MAGIC = b"PK\x03\x04"
_REQUIRED = {"name", "kind", "front_end", "layers", "licence"}
# kind -> (its required keys, its optional keys), besides the keys every kind has.
_BY_KIND = {
    "torchscript": ({"path"}, set()),
    "onnx": ({"path"}, set()),
    "factory": ({"factory"}, {"kwargs", "weights"}),
}
_OPTIONAL = {"sha256", "description"}

LOG_COMPRESSIONS = {
    "log10_1p_10000": "log10(10000 x + 1)",
    "log": "ln(x + 1e-6)",
    "db": "10 log10(max(x, 1e-10))",
}
"""Log compressions of the mel power `x` a config may name, with their formulas."""

LAYOUTS = ("n_1_mels_frames", "n_mels_frames", "n_frames_mels", "n_1_frames_mels")
"""Window layouts a config may name: the axes of the tensor the network receives."""


def _fail(where: str, message: str) -> EncoderError:
    return EncoderError(f"{where}: {message}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class LogMelConfig:
    """A log-mel front end: power mel spectrogram, log compression, then windows of `window_frames` frames.

    Frames are centred (frame i is centred on sample i * hop_length) with a periodic Hann window of `win_length`
    samples; audio shorter than one window is zero-padded at the end (see `LogMelFrontEnd.window_samples`).

    Attributes:
        sample_rate: Hz the waveform is resampled to.
        n_fft: FFT size.
        hop_length: samples between frames.
        n_mels: mel bands.
        window_frames: frames per window.
        hop_frames: frames between window starts; `window_frames` (back-to-back windows) when None.
        win_length: analysis window in samples; `n_fft` when None.
        f_min, f_max: band edges in Hz; f_max None means sample_rate / 2.
        mel_scale: "htk" or "slaney".
        norm: None or "slaney" (area normalisation of the mel filters).
        log: a key of `LOG_COMPRESSIONS`.
        layout: one of `LAYOUTS`.
        pad_mode: how centred frames pad the ends: "reflect" or "constant".
    """

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    window_frames: int
    hop_frames: int | None = None
    win_length: int | None = None
    f_min: float = 0.0
    f_max: float | None = None
    mel_scale: str = "htk"
    norm: str | None = None
    log: str = "log"
    layout: str = "n_1_mels_frames"
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        # Fill the defaults that depend on other fields, so `config()` (and the feature hash) sees the values used.
        if self.hop_frames is None:
            object.__setattr__(self, "hop_frames", self.window_frames)
        if self.win_length is None:
            object.__setattr__(self, "win_length", self.n_fft)
        if self.f_max is None and _positive_int(self.sample_rate):
            object.__setattr__(self, "f_max", self.sample_rate / 2)

    def problems(self) -> list[str]:
        """What is wrong with these values, as messages naming the field (empty when they are usable)."""
        problems = [
            f"{name} must be a positive integer, got {getattr(self, name)!r}"
            for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "window_frames", "hop_frames", "win_length")
            if not _positive_int(getattr(self, name))
        ]
        if problems:
            return problems
        if self.win_length > self.n_fft:
            problems.append(f"win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        if not (_number(self.f_min) and _number(self.f_max) and 0 <= self.f_min < self.f_max <= self.sample_rate / 2):
            problems.append(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min {self.f_min}, f_max {self.f_max}")
        choices = {
            "mel_scale": ("htk", "slaney"),
            "norm": (None, "slaney"),
            "log": tuple(LOG_COMPRESSIONS),
            "layout": LAYOUTS,
            "pad_mode": ("reflect", "constant"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
        return problems


class LogMelFrontEnd(FrontEnd):
    """The front end a `LogMelConfig` describes: (samples,) waveform -> windows in the configured layout."""

    def __init__(self, settings: LogMelConfig) -> None:
        super().__init__()
        self.settings = settings
        self.sample_rate = settings.sample_rate
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=settings.sample_rate,
            n_fft=settings.n_fft,
            win_length=settings.win_length,
            hop_length=settings.hop_length,
            f_min=float(settings.f_min),
            f_max=float(settings.f_max),
            n_mels=settings.n_mels,
            window_fn=torch.hann_window,
            power=2.0,
            center=True,
            pad_mode=settings.pad_mode,
            norm=settings.norm,
            mel_scale=settings.mel_scale,
        )

    @property
    def window_samples(self) -> int:
        """The fewest samples that give one window (centred frames: 1 + samples // hop of them).

        Never fewer than n_fft / 2 + 1, which reflect padding needs.
        """
        s = self.settings
        return max((s.window_frames - 1) * s.hop_length, s.n_fft // 2 + 1)

    def _n_frames(self, n_samples: int) -> int:
        return 1 + max(n_samples, self.window_samples) // self.settings.hop_length

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Map a (samples,) float32 waveform to (n_windows, ...) windows in the configured layout.

        Raises:
            FrontEndError: the waveform is not one-dimensional or is empty.
        """
        s = self.settings
        x = self.padded(waveform)
        power = self.mel(x)  # (n_mels, frames)
        if s.log == "log10_1p_10000":
            logmel = torch.log10(power * 10000.0 + 1.0)
        elif s.log == "log":
            logmel = torch.log(power + 1e-6)
        else:
            logmel = 10.0 * torch.log10(power.clamp_min(1e-10))
        windows = logmel.unfold(1, s.window_frames, s.hop_frames).transpose(0, 1)  # (n, mels, frames)
        if s.layout == "n_1_mels_frames":
            windows = windows.unsqueeze(1)
        elif s.layout == "n_frames_mels":
            windows = windows.transpose(1, 2)
        elif s.layout == "n_1_frames_mels":
            windows = windows.transpose(1, 2).unsqueeze(1)
        return windows.contiguous()

    def window_starts(self, n_samples: int) -> list[float]:
        """Start time in seconds of each window `forward` yields for a waveform of `n_samples`."""
        s = self.settings
        n_windows = 1 + (self._n_frames(n_samples) - s.window_frames) // s.hop_frames
        return [i * s.hop_frames * s.hop_length / s.sample_rate for i in range(n_windows)]

    def config(self) -> dict[str, Any]:
        """Every parameter that changes the windows."""
        return {
            **dataclasses.asdict(self.settings),
            "log": LOG_COMPRESSIONS[self.settings.log],
            "window": "hann_periodic",
            "center": True,
            "power": 2.0,
            "short_audio": f"zero-pad to {self.window_samples} samples",
        }


@dataclass(frozen=True)
class CustomEncoderSpec:
    """A bring-your-own encoder's JSON config, checked, with file paths resolved (see the module docstring).

    Attributes:
        uri: where the config was read from.
        make_front_end: builds a new front end module.
    """

    uri: str
    name: str
    kind: str
    make_front_end: Callable[[], FrontEnd]
    layers: tuple[LayerSpec, ...]
    licence: Licence
    description: str
    path: str | None = None
    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    sha256: str | None = None

    @classmethod
    def read(cls, uri: str) -> CustomEncoderSpec:
        """Read and check the config at `uri`.

        Raises:
            EncoderError: unreadable or invalid config; the message names the key to fix.
        """
        try:
            with fsspec.open(uri, "rt", encoding="utf-8") as fh:
                raw = json.load(fh)
        except (OSError, ValueError) as exc:
            msg = f"cannot read encoder config {uri}: {exc}"
            raise EncoderError(msg) from exc
        if not isinstance(raw, dict):
            raise _fail(uri, "an encoder config is a JSON object")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise _fail(uri, f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        required, optional = _BY_KIND[kind]
        missing = sorted((_REQUIRED | required) - raw.keys())
        unknown = sorted(raw.keys() - _REQUIRED - required - optional - _OPTIONAL)
        if missing or unknown:
            raise _fail(uri, f"{kind} config: missing keys {missing}, unknown keys {unknown}")
        name = raw["name"]
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise _fail(uri, f"'name' must match {_NAME.pattern} (it names the model in the tables), got {name!r}")
        if name in encoder_names():
            raise _fail(uri, f"'name' {name!r} is a registered encoder's: choose another, so their rows stay apart")
        if kind == "factory" and not isinstance(raw["factory"], str):
            raise _fail(uri, f"'factory' must be 'package.module:function', got {raw['factory']!r}")
        if not isinstance(raw.get("kwargs", {}), dict):
            raise _fail(uri, f"'kwargs' must be an object of keyword arguments, got {raw['kwargs']!r}")
        return cls(
            uri=uri,
            name=name,
            kind=kind,
            make_front_end=_front_end_factory(raw["front_end"], uri),
            layers=_layers(raw["layers"], uri),
            licence=_licence(raw["licence"], uri),
            description=str(raw.get("description", f"bring-your-own {kind} encoder from {uri}")),
            path=_relative_to(uri, raw["path"], "path") if "path" in raw else None,
            factory=raw.get("factory"),
            kwargs=raw.get("kwargs", {}),
            weights=_relative_to(uri, raw["weights"], "weights") if "weights" in raw else None,
            sha256=_pin(raw.get("sha256"), uri),
        )


def _relative_to(config_uri: str, path: object, key: str) -> str:
    if not isinstance(path, str) or not path:
        raise _fail(config_uri, f"'{key}' must be a file path or URI, got {path!r}")
    if "://" in path or os.path.isabs(path):
        return path
    return posixpath.join(posixpath.dirname(config_uri), path)


def _pin(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not (isinstance(value, str) and _SHA256.fullmatch(value.lower())):
        raise _fail(where, f"a sha256 pin is 64 hex digits, got {value!r}")
    return value.lower()


def _front_end_factory(raw: object, uri: str) -> Callable[[], FrontEnd]:
    if not isinstance(raw, dict):
        raise _fail(uri, "'front_end' must be an object with a 'type'")
    options = {k: v for k, v in raw.items() if k != "type"}
    if raw.get("type") == "logmel":
        try:
            settings = LogMelConfig(**options)
        except TypeError as exc:
            fields = ", ".join(f.name for f in dataclasses.fields(LogMelConfig))
            raise _fail(uri, f"front_end: {exc}; a logmel front end takes {fields}") from exc
        if problems := settings.problems():
            raise _fail(uri, "front_end: " + "; ".join(problems))
        return partial(LogMelFrontEnd, settings)
    if raw.get("type") == "waveform":
        if options.keys() != {"sample_rate", "window_s"}:
            raise _fail(uri, f"a waveform front end takes exactly sample_rate and window_s, got {sorted(options)}")
        if not (_positive_int(options["sample_rate"]) and _number(options["window_s"]) and options["window_s"] > 0):
            raise _fail(uri, f"waveform front end: positive integer sample_rate and positive window_s, got {options}")
        return partial(WaveformWindows, options["sample_rate"], float(options["window_s"]))
    raise _fail(uri, f"front_end type must be 'logmel' or 'waveform', got {raw.get('type')!r}")


def _layers(raw: object, uri: str) -> tuple[LayerSpec, ...]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(uri, "'layers' must be a non-empty object of layer name -> dim")
    for name, dim in raw.items():
        if not _LAYER_NAME.fullmatch(name) or not _positive_int(dim):
            raise _fail(uri, f"layer {name!r}: names match {_LAYER_NAME.pattern}, dims are positive integers")
    return tuple(LayerSpec(name, dim, f"output {name!r} of the network") for name, dim in raw.items())


def _licence(raw: object, uri: str) -> Licence:
    if not (isinstance(raw, dict) and raw.keys() == {"code", "weights"} and all(map(_text, raw.values()))):
        raise _fail(uri, "'licence' must be {\"code\": \"<SPDX id>\", \"weights\": \"<SPDX id>\"}")
    return Licence(code=raw["code"], weights=raw["weights"])


def _read_verified(uri: str, expected: str | None, reason: str = "is corrupt or not the pinned file") -> bytes:
    """The bytes of `uri`, refused (WeightsError saying `reason`) when their sha256 is not `expected`."""
    try:
        with fsspec.open(uri, "rb") as fh:
            blob = fh.read()
    except (OSError, ValueError) as exc:
        msg = f"cannot read {uri}: {exc}"
        raise WeightsError(msg) from exc
    sha = hashlib.sha256(blob).hexdigest()
    if expected is not None and sha != expected:
        msg = f"{uri} has sha256 {sha}, expected {expected}: it {reason}"
        raise WeightsError(msg)
    return blob


def _sha256_of(uri: str) -> str:
    try:
        return sha256_file(uri)
    except (OSError, ValueError) as exc:
        msg = f"cannot read {uri}: {exc}"
        raise WeightsError(msg) from exc


def _named_outputs(outputs: object, spec: CustomEncoderSpec, wanted: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The `wanted` layers of what a network returned (see the module docstring), each checked to be (n, dim)."""
    names = tuple(layer.name for layer in spec.layers)
    if isinstance(outputs, torch.Tensor) and len(names) == 1:
        named = {names[0]: outputs}
    elif isinstance(outputs, Mapping):
        named = dict(outputs)
    elif isinstance(outputs, tuple | list) and len(outputs) == len(names):
        named = dict(zip(names, outputs, strict=True))
    else:
        got = type(outputs).__name__ + (f" of {len(outputs)}" if isinstance(outputs, tuple | list) else "")
        msg = f"{spec.uri}: the network returned a {got}; for layers {list(names)} return a dict by name or a tuple"
        raise EncoderError(msg)
    result = {}
    for name in wanted:
        value = named.get(name)
        dim = next(layer.dim for layer in spec.layers if layer.name == name)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] != dim:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            msg = f"{spec.uri}: layer {name!r} should be an (n, {dim}) tensor, the network gave {shape}"
            raise EncoderError(msg)
        result[name] = value
    return result


@dataclass
class _CustomEncoder(Encoder):
    """What every bring-your-own encoder shares: identity, front end and layers from its config.

    Attributes:
        spec: the checked config.
        weights: replaces the file the config names (model file, or a factory's weights).
        weights_sha256: replaces the config's `sha256` pin.
        pin: the sha256 in force: `weights_sha256`, else the config's.
    """

    spec: CustomEncoderSpec
    weights: str | None = None
    weights_sha256: str | None = None
    pin: str | None = field(default=None, init=False)
    _version: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Instance attributes over the class-level declarations: each config is its own encoder.
        self.name = self.spec.name
        self.description = self.spec.description
        self.licence = self.spec.licence
        self.pin = _pin(self.weights_sha256, "--weights-sha256") or self.spec.sha256

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The layers the config declares."""
        return self.spec.layers

    @property
    def default_layer(self) -> str:
        """The first layer the config declares."""
        return self.spec.layers[0].name

    def front_end(self) -> FrontEnd:
        """A new front end as the config describes it."""
        return self.spec.make_front_end()

    @property
    def version(self) -> str:
        """First 16 hex digits of the sha256 of the weights (see the module docstring); valid after prepare()."""
        return self._prepared(self._version)


@dataclass
class _FileEncoder(_CustomEncoder):
    """An encoder whose network is one file (TorchScript, ONNX): its sha256 is the version and what a pin checks.

    `prepare()` hashes the file without keeping it; `_build` reads it and refuses bytes whose sha256 is not the one
    prepared, so what runs is what was versioned (and pinned) even if the file changed in between.
    """

    _sha256: str | None = field(default=None, init=False, repr=False)

    @property
    def model_file(self) -> str:
        """The model file: `weights` when given, else the config's `path`."""
        return self.weights or self.spec.path

    def prepare(self) -> None:
        """Hash the model file and check it against the pin.

        Raises:
            WeightsError: unreadable, or not the pinned file.
        """
        if self._sha256 is not None:
            return
        sha = _sha256_of(self.model_file)
        if self.pin is not None and sha != self.pin:
            msg = f"{self.model_file} has sha256 {sha}, expected {self.pin}: it is corrupt or not the pinned file"
            raise WeightsError(msg)
        self._sha256, self._version = sha, sha[:16]

    def _read(self) -> bytes:
        """The model file's bytes, as prepared."""
        if self._sha256 is None:
            msg = f"encoder {self.name!r}: call prepare() before building it"
            raise EncoderError(msg)
        return _read_verified(self.model_file, self._sha256, "changed since the encoder was prepared")


@dataclass
class TorchScriptEncoder(_FileEncoder):
    """A TorchScript archive (`torch.jit.save` of a scripted or traced module)."""

    _module: torch.jit.ScriptModule | None = field(default=None, init=False, repr=False)

    def _build(self, device: torch.device) -> None:
        blob = self._read()
        if not blob.startswith(_ZIP_MAGIC):
            msg = (
                f"{self.model_file} is not a TorchScript archive (torch.jit.save writes a zip). A pickled nn.Module "
                "is refused because unpickling it could run code: export it with torch.jit.script or torch.jit.trace,"
                " or use a factory config with safetensors weights"
            )
            raise WeightsError(msg)
        try:
            module = torch.jit.load(io.BytesIO(blob), map_location=device)
        except RuntimeError as exc:
            msg = f"{self.model_file} is not a loadable TorchScript archive: {exc}"
            raise WeightsError(msg) from exc
        self._module = module.eval()

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return _named_outputs(self._module(windows), self.spec, layers)


@dataclass
class OnnxEncoder(_FileEncoder):
    """An ONNX graph run by ONNX Runtime (the `onnx` extra): CPUExecutionProvider, or CUDA's on a GPU.

    ONNX Runtime computes in the graph's own types, so only fp32 is accepted as a precision; a float16 graph (one
    exported in half precision) is fed float16 windows.
    """

    mixed_precision = False
    _session: Any = field(default=None, init=False, repr=False)
    _input: tuple[str, Any] | None = field(default=None, init=False, repr=False)
    _outputs: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def _build(self, device: torch.device) -> None:
        ort = _onnxruntime()
        blob = self._read()
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                msg = "this onnxruntime has no CUDA provider: install onnxruntime-gpu for --device cuda, or use cpu"
                raise EncoderError(msg)
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        # Keep to the thread budget torch was given (the local runner shares the cores with decode workers).
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = ort.InferenceSession(blob, sess_options=options, providers=providers)
        except _onnx_errors(ort) as exc:
            msg = f"{self.model_file} is not a loadable ONNX graph: {exc}"
            raise WeightsError(msg) from exc
        inputs = session.get_inputs()
        dtypes = {"tensor(float)": "float32", "tensor(float16)": "float16"}
        if len(inputs) != 1 or inputs[0].type not in dtypes:
            found = [(i.name, i.type) for i in inputs]
            msg = f"{self.model_file}: the graph needs one float or float16 input (the windows), it has {found}"
            raise EncoderError(msg)
        self._input = (inputs[0].name, dtypes[inputs[0].type])
        self._outputs = self._match_outputs([o.name for o in session.get_outputs()])
        self._session = session

    def _match_outputs(self, names: list[str]) -> dict[str, str]:
        """Layer name -> graph output name."""
        declared = [layer.name for layer in self.layers]
        if len(declared) == 1 and len(names) == 1:
            return {declared[0]: names[0]}
        missing = [name for name in declared if name not in names]
        if missing:
            msg = f"{self.model_file}: the graph has outputs {names}, but not the declared layers {missing}"
            raise EncoderError(msg)
        return {name: name for name in declared}

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        ort = _onnxruntime()
        input_name, dtype = self._input
        feed = {input_name: windows.detach().cpu().numpy().astype(dtype, copy=False)}
        try:
            values = self._session.run([self._outputs[name] for name in layers], feed)
        except _onnx_errors(ort) as exc:
            msg = f"{self.model_file}: ONNX Runtime failed on windows of shape {tuple(windows.shape)}: {exc}"
            raise EncoderError(msg) from exc
        outputs = {name: torch.from_numpy(value).to(self.device) for name, value in zip(layers, values, strict=True)}
        return _named_outputs(outputs, self.spec, layers)


def _onnxruntime() -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        msg = "ONNX encoders need ONNX Runtime: pip install 'catalog-embed[onnx]'"
        raise EncoderError(msg) from exc


def _onnx_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes (they derive from Exception alone, not from RuntimeError)."""
    state = ort.capi.onnxruntime_pybind11_state
    return (
        state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile,
        state.NotImplemented, state.RuntimeException, state.EPFail,
    )  # fmt: skip


@dataclass
class FactoryEncoder(_CustomEncoder):
    """A network built by a Python function: an nn.Module (weights from the config's file, if any) or an Encoder.

    The function runs in `prepare()`, so that the version can be the digest of the weights the network actually
    holds; an Encoder it returns is prepared there too and lends its network, while the front end and layers stay
    the config's (its layers must include them, with the same dims).
    """

    _network: torch.nn.Module | Encoder | None = field(default=None, init=False, repr=False)

    def prepare(self) -> None:
        """Call the factory and load its weights.

        Raises:
            EncoderError: the factory cannot be imported or returns something else than a Module or an Encoder.
            WeightsError: the weights are unreadable, unsafe, not the pinned file, or do not fit the network.
        """
        if self._network is not None:
            return
        network = _factory(self.spec)(**self.spec.kwargs)
        source = self.weights or self.spec.weights
        if isinstance(network, Encoder):
            if source or self.pin:
                msg = f"{self.spec.uri}: the factory returned an Encoder, which loads its own weights: drop them"
                raise EncoderError(msg)
            network.prepare()
            for layer in self.layers:
                if (dim := network.layer(layer.name).dim) != layer.dim:
                    msg = f"{self.spec.uri}: layer {layer.name!r} of {network.name!r} has dim {dim}, not {layer.dim}"
                    raise EncoderError(msg)
            self._version = network.version
        elif isinstance(network, torch.nn.Module):
            if source:
                blob = _read_verified(source, self.pin)
                try:
                    network.load_state_dict(_state_dict(blob, source), strict=True)
                except RuntimeError as exc:
                    msg = f"{source} does not fit the network of {self.spec.factory}: {exc}"
                    raise WeightsError(msg) from exc
            elif self.pin:
                msg = f"{self.spec.uri}: a sha256 pin needs a weights file to check, and this config names none"
                raise EncoderError(msg)
            self._version = state_dict_sha256(network.state_dict())[:16]
        else:
            msg = f"{self.spec.factory} returned a {type(network).__name__}: it must return an nn.Module or an Encoder"
            raise EncoderError(msg)
        self._network = network

    def _build(self, device: torch.device) -> None:
        if isinstance(self._network, Encoder):
            self._network.load(device)
        else:
            self._network = self._network.to(device).eval()

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if isinstance(self._network, Encoder):
            # Its _forward, not embed: embed would open a float32 autocast region inside this encoder's precision.
            return self._network._forward(windows, layers)
        return _named_outputs(self._network(windows), self.spec, layers)


def _factory(spec: CustomEncoderSpec) -> Callable[..., object]:
    module_name, _, function_name = spec.factory.partition(":")
    if not module_name or not function_name:
        raise _fail(spec.uri, f"'factory' must be 'package.module:function', got {spec.factory!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"cannot import {module_name!r} for the factory ({exc}): install it or put it on PYTHONPATH"
        raise _fail(spec.uri, msg) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise _fail(spec.uri, f"{module_name} has no function {function_name!r}")
    return function


def _state_dict(blob: bytes, uri: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors bytes or a torch.save file, never unpickling anything but tensors."""
    if uri.endswith(".safetensors"):
        try:
            return safetensors.torch.load(blob)
        except SafetensorError as exc:
            msg = f"{uri} is not a readable safetensors file: {exc}"
            raise WeightsError(msg) from exc
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported GLOBAL \S+", str(exc))
        msg = (
            f"refused to load {uri}: torch.load(weights_only=True) will not unpickle it"
            f"{f' ({found.group(0)})' if found else ''}. A pickle that names Python objects other than tensors "
            "can run code when loaded; save the state dict with safetensors.torch.save_file instead"
        )
        raise WeightsError(msg) from exc
    except (RuntimeError, EOFError) as exc:
        msg = f"{uri} is not a torch.save file: {exc}"
        raise WeightsError(msg) from exc
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        msg = f"{uri} holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)"
        raise WeightsError(msg)
    return state


_ENCODERS: dict[str, type[_CustomEncoder]] = {
    "torchscript": TorchScriptEncoder,
    "onnx": OnnxEncoder,
    "factory": FactoryEncoder,
}


def load_custom_encoder(uri: str, weights: str | None = None, weights_sha256: str | None = None) -> Encoder:
    """The encoder a JSON config describes (no weights touched yet).

    Args:
        uri: the config, a path or fsspec URI ending in `.json`.
        weights: replaces the model or weights file the config names.
        weights_sha256: replaces the config's pin.

    Raises:
        EncoderError: unreadable or invalid config.
    """
    spec = CustomEncoderSpec.read(uri)
    return _ENCODERS[spec.kind](spec=spec, weights=weights, weights_sha256=weights_sha256)
