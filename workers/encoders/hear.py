"""HEAR 2021 API modules as encoders: `--model hear:<module>`, optionally with `--weights <model file>`.

The HEAR 2021 benchmark ("Holistic Evaluation of Audio Representations") fixed a Python interface that many
pip-installable audio models follow. A HEAR module defines:

- `load_model(model_file_path="")`: the model, a `torch.nn.Module` with the attributes `sample_rate`,
  `scene_embedding_size` and `timestamp_embedding_size`;
- `get_scene_embeddings(audio, model)`: (n_sounds, n_samples) float32 audio in [-1, 1] at `sample_rate` ->
  (n_sounds, scene_embedding_size);
- `get_timestamp_embeddings(audio, model)`: the same audio -> (embeddings (n_sounds, n_timestamps,
  timestamp_embedding_size), timestamps (n_sounds, n_timestamps) in milliseconds).

Here the decoder resamples each track to the model's `sample_rate` and cuts it into back-to-back windows of
`window_s` seconds (default `DEFAULT_WINDOW_S`; a trailing partial window is dropped, a track shorter than one window
is zero-padded to one, as for every encoder of this project). Each window is one of the module's "sounds":

- `scene` (default layer): `get_scene_embeddings` of the window;
- `timestamp_mean`: `get_timestamp_embeddings` of the window, averaged over its timestamps.

The track's embedding is the mean over its windows (the pipeline's pooling). Windows from several tracks go to
the module in one batch, so a module whose scene embedding depends on the rest of its batch would differ; the
HEAR API treats sounds independently.

Version: `<distribution>-<version>` of the installed distribution whose files hold the module (importlib.metadata),
or `unpackaged-<sha256 of the module's file>` for a module outside any distribution (or installed editable); then
`-<sha256 of the --weights file>` (16 hex digits) when one is given. Licence: the distribution's `License-Expression`
or `License` metadata, else "unknown".

Everything a run needs from the module is checked before any audio is read: the name, the import, the three
functions, and the model `load_model` returns with its attributes. The attributes (which decide the windows and the
layers' widths) are kept in the cache (`CATALOG_EMBED_CACHE`), keyed by the module's version and source, so decode
workers read them there instead of loading the model each.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from catalog_embed.schemas.errors import EncoderError, first_line
from catalog_embed.workers.encoders import HEAR_PREFIX as PREFIX
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence
from catalog_embed.workers.encoders.handcrafted import WaveformWindows
from catalog_embed.workers.encoders.weights import cache_dir, verify_sha256

DEFAULT_WINDOW_S = 10.0
"""Seconds per window: HEAR modules take sounds of any length; 10 s holds musical context (a few bars) and keeps
a batch of windows small in memory."""

SCENE = "scene"
TIMESTAMP_MEAN = "timestamp_mean"
FUNCTIONS = ("load_model", "get_scene_embeddings", "get_timestamp_embeddings")
ATTRIBUTES = ("sample_rate", "scene_embedding_size", "timestamp_embedding_size")
UNKNOWN_LICENCE = "unknown"

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_API = "a HEAR module defines load_model, get_scene_embeddings and get_timestamp_embeddings"


@dataclass(frozen=True)
class ModelFacts:
    """What the pipeline needs to know of a HEAR model: the attributes the API requires of it."""

    sample_rate: int
    scene_embedding_size: int
    timestamp_embedding_size: int


@dataclass
class HearEncoder(Encoder):
    """A HEAR 2021 API module; see the module docstring for windows, layers, version and licence.

    Args:
        spec: the model name, `hear:<module>` (a dotted import path, e.g. `hear:hearbaseline.naive`).
        weights: a local model file, passed to the module's `load_model`; None: the module's own default.
        weights_sha256: refuse a weights file whose sha256 differs.
        window_s: seconds per window (None: `DEFAULT_WINDOW_S`).
    """

    spec: str = ""
    weights: str | None = None
    weights_sha256: str | None = None
    window_s: float | None = None
    _module: ModuleType | None = field(default=None, init=False, repr=False)
    _facts: ModelFacts | None = field(default=None, init=False, repr=False)
    _version: str | None = field(default=None, init=False, repr=False)
    _model: torch.nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.module_name = self.spec.removeprefix(PREFIX)
        self.name = f"{PREFIX}{self.module_name}"
        if not _MODULE_NAME.fullmatch(self.module_name):
            msg = f"model {self.spec!r}: write hear:<module> with the module's import name, e.g. hear:mypackage.hear"
            raise EncoderError(msg)
        if self.window_s is not None and not self.window_s > 0:
            msg = f"--window-s must be positive, got {self.window_s}"
            raise EncoderError(msg)
        if self.weights_sha256 and not self.weights:
            msg = f"{self.name}: --weights-sha256 pins a --weights file: give the file too, or drop the pin"
            raise EncoderError(msg)
        self.window_s = self.window_s or DEFAULT_WINDOW_S
        self.licence = Licence(code="unresolved: run prepare()", weights="unresolved: run prepare()")
        self.description = f"HEAR 2021 API module {self.module_name}"

    def _imported(self) -> ModuleType:
        """The module, imported once, with the three API functions; one-line errors naming the fix."""
        if self._module is not None:
            return self._module
        try:
            module = importlib.import_module(self.module_name)
        except ModuleNotFoundError as exc:
            if exc.name and f"{self.module_name}.".startswith(f"{exc.name}."):
                top = self.module_name.split(".")[0]
                msg = (
                    f"{self.name}: no module named {exc.name!r} is installed: pip install the package that provides "
                    f"it (often `pip install {top}`), or check the name"
                )
            else:
                msg = f"{self.name}: importing it failed ({first_line(exc, with_type=True)}): pip install {exc.name}, its dependency"
            raise EncoderError(msg) from None
        except Exception as exc:  # noqa: BLE001 (importing runs the module's own code, which may raise anything)
            msg = f"{self.name}: importing it failed ({first_line(exc, with_type=True)}): check the module's installation"
            raise EncoderError(msg) from None
        missing = [fn for fn in FUNCTIONS if not callable(getattr(module, fn, None))]
        if missing:
            msg = f"{self.name}: module {self.module_name} lacks {', '.join(missing)}; check the name ({_API})"
            raise EncoderError(msg)
        self._module = module
        return module

    def _resolved(self) -> ModelFacts:
        """Import the module, version it, and learn its model's attributes (from the cache, else by loading it)."""
        if self._facts is not None:
            return self._facts
        module = self._imported()
        source = _source_sha256(module)
        dist = _distribution(module)
        version = f"{dist.metadata['Name']}-{dist.version}" if dist is not None else f"unpackaged-{source[:16]}"
        if self.weights:
            if not Path(self.weights).expanduser().is_file():
                msg = f"{self.name}: --weights {self.weights} is not a file; HEAR's load_model takes a local model file"
                raise EncoderError(msg)
            version += f"-{verify_sha256(Path(self.weights).expanduser(), self.weights_sha256)[:16]}"
        key = hashlib.sha256(f"{self.module_name}|{version}|{source}".encode()).hexdigest()
        cache = cache_dir() / "hear" / f"{key}.json"
        if cache.is_file():
            facts = ModelFacts(**json.loads(cache.read_text()))
        else:
            facts = _facts_of(self._loaded(), self.name)
            _write_atomically(cache, json.dumps(facts.__dict__))
        licence = _licence(dist)
        self.licence = Licence(
            code=licence, weights=licence if not self.weights else f"{UNKNOWN_LICENCE}: the terms of {self.weights}"
        )
        package = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "not from an installed package"
        self.description = (
            f"HEAR 2021 API module {self.module_name} ({package}): each {self.window_s:g} s window at "
            f"{facts.sample_rate} Hz is one sound; scene = its get_scene_embeddings, timestamp_mean = its "
            "get_timestamp_embeddings averaged over time; the track is the mean over its windows"
        )
        self._version, self._facts = version, facts
        return facts

    def _loaded(self) -> torch.nn.Module:
        """The module's model from `load_model`, on the CPU, once; one-line errors naming the fix."""
        if self._model is not None:
            return self._model
        module = self._imported()
        path = str(Path(self.weights).expanduser()) if self.weights else ""
        try:
            model = module.load_model(path) if path else module.load_model()
        except Exception as exc:  # noqa: BLE001 (the module's own loading code may raise anything)
            fix = "check that --weights is a model file for this module" if path else "it may need --weights"
            msg = f"{self.name}: load_model({path!r}) failed ({first_line(exc, with_type=True)}): {fix}"
            raise EncoderError(msg) from None
        if not isinstance(model, torch.nn.Module):
            msg = (
                f"{self.name}: load_model returned a {type(model).__name__}, not a torch.nn.Module: only PyTorch HEAR "
                "modules run here"
            )
            raise EncoderError(msg)
        self._model = model.eval()
        return self._model

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """`scene` and `timestamp_mean`, as wide as the model's attributes say."""
        facts = self._resolved()
        return (
            LayerSpec(SCENE, facts.scene_embedding_size, "get_scene_embeddings of each window"),
            LayerSpec(TIMESTAMP_MEAN, facts.timestamp_embedding_size, "get_timestamp_embeddings, mean over time"),
        )

    @property
    def default_layer(self) -> str:
        """The scene embedding: what HEAR's scene tasks evaluate."""
        return SCENE

    def front_end(self) -> FrontEnd:
        """Back-to-back raw windows of `window_s` seconds at the model's sample rate."""
        return WaveformWindows(self._resolved().sample_rate, self.window_s)

    def prepare(self) -> None:
        """Import the module and check it and its model against the HEAR API (see the module docstring)."""
        self._resolved()

    @property
    def version(self) -> str:
        """`<distribution>-<version>[-<weights sha256>]`: see the module docstring."""
        return self._prepared(self._version)

    def _build(self, device: torch.device) -> None:
        self._resolved()
        self._model = self._loaded().to(device)

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        module, facts, n = self._module, self._facts, len(windows)
        outputs = {}
        if SCENE in layers:
            scene = module.get_scene_embeddings(windows, self._model)
            outputs[SCENE] = _checked(scene, (n, facts.scene_embedding_size), "get_scene_embeddings", self.name)
        if TIMESTAMP_MEAN in layers:
            embeddings, _timestamps = module.get_timestamp_embeddings(windows, self._model)
            embeddings = _checked(
                embeddings, (n, None, facts.timestamp_embedding_size), "get_timestamp_embeddings", self.name
            )
            outputs[TIMESTAMP_MEAN] = embeddings.mean(dim=1)
        return outputs


def _checked(value: Any, shape: tuple[int | None, ...], function: str, name: str) -> torch.Tensor:
    """`value` when it is a tensor of `shape` (None: any size), else an error saying the module broke the API."""
    if not isinstance(value, torch.Tensor) or value.dim() != len(shape) or any(
        want is not None and got != want for got, want in zip(value.shape, shape, strict=True)
    ):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        want = tuple("*" if s is None else s for s in shape)
        msg = f"{name}: {function} returned {got}, the HEAR API says a tensor of {want}: the module is not compliant"
        raise EncoderError(msg)
    return value


def _facts_of(model: torch.nn.Module, name: str) -> ModelFacts:
    """The model's HEAR attributes, each a positive int."""
    values = {attr: getattr(model, attr, None) for attr in ATTRIBUTES}
    bad = [attr for attr, value in values.items() if not isinstance(value, int) or isinstance(value, bool) or value < 1]
    if bad:
        msg = (
            f"{name}: the model load_model returned has no positive integer {', '.join(bad)}; a HEAR model states "
            f"{', '.join(ATTRIBUTES)}: check the name"
        )
        raise EncoderError(msg)
    return ModelFacts(**values)


def _distribution(module: ModuleType) -> metadata.Distribution | None:
    """The installed distribution whose file list holds the module's file; None when none does (a module on
    `sys.path` outside any distribution, or an editable install, whose files are the working tree's)."""
    path = getattr(module, "__file__", None)
    if path is None:
        return None
    target = Path(path).resolve()
    top = module.__name__.split(".")[0]
    for dist_name in metadata.packages_distributions().get(top, []):
        dist = metadata.distribution(dist_name)
        if any(Path(dist.locate_file(file)).resolve() == target for file in dist.files or ()):
            return dist
    return None


def _licence(dist: metadata.Distribution | None) -> str:
    """The distribution's licence: `License-Expression`, else the first line of `License`, else "unknown"."""
    if dist is None:
        return UNKNOWN_LICENCE
    for key in ("License-Expression", "License"):
        text = (dist.metadata.get(key) or "").strip()
        if text and text.upper() != "UNKNOWN":
            return text.splitlines()[0]
    return UNKNOWN_LICENCE


def _source_sha256(module: ModuleType) -> str:
    """Hex sha256 of the module's file (a package's `__init__.py`); of its name where it has no file."""
    path = getattr(module, "__file__", None)
    data = Path(path).read_bytes() if path else module.__name__.encode()
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so that concurrent workers never read half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


