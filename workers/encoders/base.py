"""The encoder contract every model in the registry implements.

An encoder is shaped like Beam's ModelHandler: cheap to construct (no weights touched), `prepare()` resolves
its weights on the driver (fetching and converting them once, then from cache), `load(device)` builds the
network once per worker on an explicit device, and `embed(windows, layers)` runs under
`torch.inference_mode()` on a batch of windows that may come from many tracks, in float32 or, when `load` was
given a precision of "bf16" or "fp16", under `torch.autocast` (the one place mixed precision is applied).

The front end (waveform -> windows) is a separate `torch.nn.Module` so a runner can place it on the CPU next to
the decoder or on the accelerator next to the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from catalog_embed.schemas.errors import EncoderError, FrontEndError
from catalog_embed.workers.encoders.weights import cache_dir

PROBE_WINDOWS = (8, 32)
"""Batch sizes `Encoder.measure_memory` runs: small enough for any GPU, far enough apart for a slope."""

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision names and the autocast dtype each runs the network in (None: plain float32)."""


@dataclass(frozen=True)
class Licence:
    """SPDX-style licences of an encoder's code and of its weights (they often differ)."""

    code: str
    weights: str

    def __str__(self) -> str:
        return f"code {self.code}, weights {self.weights}"


@dataclass(frozen=True)
class LayerSpec:
    """A named output of an encoder: its dimensionality and, for label outputs, the label names."""

    name: str
    dim: int
    description: str = ""
    labels: tuple[str, ...] | None = None


class FrontEnd(torch.nn.Module, ABC):
    """Turns one mono float32 waveform at `sample_rate` into the encoder's input windows.

    Subclasses keep every constant they depend on in `config()`, whose hash keys the embeddings table: a change
    of front end re-embeds under a new key.
    """

    sample_rate: int
    channels: str = "mean"
    """How the decoder delivers channels (`catalog_embed.workers.audio.CHANNEL_RULES`): "mean" gives `forward` a
    (samples,) waveform; "each" a (channels, samples) one, and `forward` windows every channel."""
    resampler: str = "soxr_hq"
    """Which resampler brings the audio to `sample_rate` (`catalog_embed.workers.audio.RESAMPLERS`)."""

    @abstractmethod
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Map a (samples,) waveform to (n_windows, *window_shape) float32 windows."""

    @abstractmethod
    def window_starts(self, n_samples: int) -> list[float]:
        """Start time in seconds of each window `forward` yields for a waveform of `n_samples`."""

    @property
    @abstractmethod
    def window_samples(self) -> int:
        """Samples one window spans: shorter audio is zero-padded to this length (see `catalog_embed.workers.audio`)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Every parameter that changes the windows, JSON-serialisable."""

    def padded(self, waveform: torch.Tensor) -> torch.Tensor:
        """`waveform` as float32, zero-padded at the end to at least one window (short audio yields one window).

        Raises:
            FrontEndError: the waveform is not one-dimensional or is empty.
        """
        if waveform.dim() != 1 or waveform.numel() == 0:
            msg = f"{type(self).__name__} needs a non-empty mono (samples,) waveform, got shape {tuple(waveform.shape)}"
            raise FrontEndError(msg)
        waveform = waveform.to(torch.float32)
        if waveform.numel() < self.window_samples:
            waveform = torch.nn.functional.pad(waveform, (0, self.window_samples - waveform.numel()))
        return waveform

    def config_hash(self) -> str:
        """Short stable hash of `config()`: part of an embedding's key."""
        blob = json.dumps({"class": type(self).__name__, **self.config()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class MemoryFootprint:
    """Device memory one `embed` call takes beyond what was allocated before it: `fixed + windows x per_window`.

    Attributes:
        fixed_bytes: the part that does not grow with the batch (the outputs' buffers, small workspaces).
        window_bytes: what each window of the batch adds (activations, and workspaces that grow with the batch).
    """

    fixed_bytes: int
    window_bytes: int

    def batch_windows(self, free_bytes: int, share: float, limit: int) -> int:
        """The largest power of two of windows whose footprint fits in `share` of `free_bytes`, within [1, limit].

        A power of two keeps batch shapes few (compiled graphs, cuDNN autotuning) and leaves the rest of the
        share as headroom for what the probe does not see (the front end on the device, fragmentation).
        """
        budget = free_bytes * share - self.fixed_bytes
        fits = int(budget // max(self.window_bytes, 1))
        if fits < 1:
            return 1
        return min(limit, 2 ** (fits.bit_length() - 1))


@dataclass
class Encoder(ABC):
    """A frozen audio encoder: see the module docstring for the lifecycle.

    Attributes:
        device: where `load` placed the network; None before `load`.
        precision: the precision `load` was given ("fp32", "bf16" or "fp16").
    """

    name: ClassVar[str]
    description: ClassVar[str]
    licence: ClassVar[Licence]
    mixed_precision: ClassVar[bool] = True
    """Whether `torch.autocast` reaches the network; False for runtimes outside PyTorch (ONNX Runtime)."""
    compilable: ClassVar[bool] = False
    """Whether `compile` applies: the built-in PyTorch networks (not TorchScript, ONNX or handcrafted features)."""
    device: torch.device | None = field(default=None, init=False)
    precision: str = field(default="fp32", init=False)
    fixed_batch: int | None = field(default=None, init=False)
    """Windows per network call once `fix_batch` or `compile` ran: every batch is cut or zero-padded to it; None:
    batches run as they come."""
    compiled: bool = field(default=False, init=False)
    """Whether `compile` replaced the network by its compiled form."""

    @property
    @abstractmethod
    def layers(self) -> tuple[LayerSpec, ...]:
        """Every named output this encoder can produce."""

    @property
    @abstractmethod
    def default_layer(self) -> str:
        """The layer used when the user picks none."""

    @abstractmethod
    def front_end(self) -> FrontEnd:
        """A new front end module matching this encoder (cheap; holds no network weights)."""

    @abstractmethod
    def prepare(self) -> None:
        """Resolve the weights (fetch, convert and cache on first use); no network is built."""

    @property
    @abstractmethod
    def version(self) -> str:
        """Version derived from the weights' sha256; valid after `prepare()`."""

    def _prepared(self, version: str | None) -> str:
        """`version` once `prepare()` has set it; before that, an error naming the missing call."""
        if version is None:
            msg = f"encoder {self.name!r}: call prepare() before asking for its version"
            raise EncoderError(msg)
        return version

    @abstractmethod
    def _build(self, device: torch.device) -> None:
        """Build the network from the prepared weights on `device`, in eval mode."""

    @abstractmethod
    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Run the network on `windows` already on `self.device`; return (n, dim) tensors per layer."""

    def layer(self, name: str) -> LayerSpec:
        """The spec of layer `name`; raises EncoderError naming the valid layers."""
        for spec in self.layers:
            if spec.name == name:
                return spec
        valid = ", ".join(s.name for s in self.layers)
        msg = f"encoder {self.name!r} has no layer {name!r}; choose one of: {valid}"
        raise EncoderError(msg)

    def load(self, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        """Prepare the weights and build the network once on an explicit device.

        Args:
            device: 'cpu', 'cuda' or 'cuda:N'.
            precision: "fp32", or "bf16" / "fp16" to run the network under `torch.autocast` (see `PRECISIONS`).

        Raises:
            EncoderError: the device is unavailable (asking for CUDA without one is an error, never a silent
                fallback to the CPU), or the precision is unknown, fp16 on a CPU, or not fp32 for an encoder
                outside PyTorch.
        """
        device = resolve_device(device)
        resolve_precision(precision, device)
        if precision != "fp32" and not self.mixed_precision:
            msg = f"encoder {self.name!r} does not run under PyTorch autocast: use --precision fp32"
            raise EncoderError(msg)
        self.prepare()
        # Set before building: a network may lay out its computation by precision (musicnn does on CUDA).
        self.precision = precision
        self._build(device)
        self.device = device

    def _compile_network(self) -> None:
        """Replace the loaded network by `torch.compile` of it; encoders that set `compilable` override this."""
        raise NotImplementedError

    def fix_batch(self, batch_windows: int) -> None:
        """Run the network in calls of exactly `batch_windows` windows from now on.

        `embed` then cuts larger batches into batches of that size and zero-pads a short one (dropping the padding
        rows from the outputs), so that every call has one shape: cuDNN's autotuner (`torch.backends.cudnn.benchmark`)
        then tunes once, and a compiled graph (`compile`) is reused rather than recompiled.

        Raises:
            EncoderError: not loaded, or a batch size below 1.
        """
        if self.device is None:
            msg = f"encoder {self.name!r} is not loaded: call load(device) before fixing its batch"
            raise EncoderError(msg)
        if batch_windows < 1:
            msg = f"a fixed batch needs at least 1 window, got {batch_windows}"
            raise EncoderError(msg)
        self.fixed_batch = batch_windows

    def compile(self, batch_windows: int) -> None:
        """Compile the loaded network with `torch.compile` for batches of exactly `batch_windows` windows
        (`fix_batch`).

        The compiled code is cached on disk (see `inductor_cache_dir`), so a later process with the same network,
        precision, shape and PyTorch skips most of the compilation. The first `embed` compiles; called again with
        another size (an out-of-memory retry), the compiled network recompiles on the new shape.

        Raises:
            EncoderError: not loaded, a batch size below 1, or an encoder without a PyTorch network.
        """
        if not self.compilable:
            msg = f"encoder {self.name!r} has no PyTorch network to compile: run it without --compile"
            raise EncoderError(msg)
        self.fix_batch(batch_windows)
        os.environ.setdefault(INDUCTOR_CACHE_ENV, str(inductor_cache_dir()))
        if not self.compiled:
            self._compile_network()
            self.compiled = True

    def measure_memory(self, probe_windows: tuple[int, int] = PROBE_WINDOWS) -> MemoryFootprint:
        """Measure this loaded encoder's CUDA memory per `embed` call at two batch sizes, in its precision.

        The peak allocated during each call (beyond what was allocated before) gives a line through the two
        points: its slope is the memory per window, its intercept the fixed part. The probe batch repeats one
        window of the front end's output for silence: memory does not depend on the values.

        Raises:
            EncoderError: not loaded on a CUDA device (the CPU has no allocator statistics to read).
        """
        if self.device is None or self.device.type != "cuda":
            msg = f"encoder {self.name!r}: measure_memory needs the encoder loaded on a CUDA device"
            raise EncoderError(msg)
        front_end = self.front_end().eval()
        with torch.inference_mode():
            window = front_end(torch.zeros(front_end.window_samples))[:1]
        small, large = probe_windows
        peaks = []
        for n in (small, large):
            batch = window.expand(n, *window.shape[1:]).contiguous().to(self.device)
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.embed(batch)
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - before)
            del batch
        window_bytes = (peaks[1] - peaks[0]) / (large - small)
        if window_bytes <= 0:  # nothing grew with the batch (or caching hid it): charge the whole peak per window
            window_bytes = peaks[1] / large
        fixed_bytes = max(peaks[0] - small * window_bytes, 0)
        return MemoryFootprint(fixed_bytes=int(fixed_bytes), window_bytes=int(window_bytes))

    def embed(self, windows: torch.Tensor, layers: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Embed a batch of windows (from one or many tracks).

        Args:
            windows: (n, *window_shape) as produced by `front_end()`, on any device.
            layers: layer names to return; the default layer when None.

        Returns:
            One float32 (n, dim) tensor per requested layer, on the encoder's device.
        """
        if self.device is None:
            msg = f"encoder {self.name!r} is not loaded: call load(device) first"
            raise EncoderError(msg)
        layers = layers or (self.default_layer,)
        for name in layers:
            self.layer(name)
        dtype = PRECISIONS[self.precision]
        windows = windows.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if self.fixed_batch is None or len(windows) == 0:
                outputs = self._forward(windows, layers)
            else:
                outputs = self._forward_fixed(windows, layers, self.fixed_batch)
        return {name: value.float() for name, value in outputs.items()}

    def _forward_fixed(self, windows: torch.Tensor, layers: tuple[str, ...], size: int) -> dict[str, torch.Tensor]:
        """`_forward` in calls of exactly `size` windows: the last one zero-padded, its padding rows dropped."""
        parts = []
        for start in range(0, len(windows), size):
            chunk = windows[start : start + size]
            real = len(chunk)
            if real < size:
                chunk = torch.cat([chunk, chunk.new_zeros(size - real, *chunk.shape[1:])])
            parts.append({name: value[:real] for name, value in self._forward(chunk, layers).items()})
        return {name: torch.cat([part[name] for part in parts]) for name in layers}


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
"""PyTorch's variable for where inductor keeps compiled code; when unset, `compile` points it into our cache."""


def inductor_cache_dir() -> Path:
    """Where `Encoder.compile` keeps inductor's compiled code: `inductor` in the cache (`CATALOG_EMBED_CACHE`).

    An explicitly set `TORCHINDUCTOR_CACHE_DIR` wins. Inductor's FX graph cache (on by default) keys entries by
    the graph, its input shapes and dtypes, the PyTorch version and the compile options, so a stale entry is
    never reused; a nightly run on the same machine and shapes loads the compiled code instead of compiling.
    """
    return Path(os.environ.get(INDUCTOR_CACHE_ENV) or cache_dir() / "inductor")


def parse_device(device: str | torch.device) -> torch.device:
    """Parse a device string without checking that the device is present.

    Raises:
        EncoderError: not a device string, or a device type other than CPU and CUDA.
    """
    requested = str(device)
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        msg = f"unknown device {requested!r}: use 'cpu', 'cuda' or 'cuda:N'"
        raise EncoderError(msg) from exc
    if device.type not in ("cpu", "cuda"):
        msg = f"device {requested!r} is not supported (type {device.type!r}): use 'cpu' or 'cuda'"
        raise EncoderError(msg)
    return device


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string, failing when the device is not present; errors name the device as given."""
    requested = str(device)
    device = parse_device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            msg = f"device {requested!r} was requested but no CUDA GPU is available here: use --device cpu"
            raise EncoderError(msg)
        if device.index is not None and device.index >= torch.cuda.device_count():
            msg = f"device {requested!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
            raise EncoderError(msg)
    return device


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None for fp32); the device need not be present.

    Raises:
        EncoderError: unknown precision, or fp16 on a CPU: there bfloat16 is the reduced precision PyTorch's
            autocast is built for, and it keeps float32's range where float16 overflows past 65504.
    """
    if precision not in PRECISIONS:
        msg = f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}"
        raise EncoderError(msg)
    if precision == "fp16" and parse_device(device).type == "cpu":
        msg = "precision fp16 needs a GPU: on the CPU use --precision bf16 (or fp32), or run with --device cuda"
        raise EncoderError(msg)
    return PRECISIONS[precision]
