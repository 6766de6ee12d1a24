"""CLMR's SampleCNN (Spijkervet & Burgoyne, 2021): a raw-waveform music encoder pre-trained with SimCLR.

SampleCNN (Lee et al., 2017) reads 59,049 samples (3^10, 2.68 s at 22,050 Hz) of raw waveform: a strided stem
convolution (kernel 3, stride 3), nine blocks of convolution (kernel 3, same length), batch norm, ReLU and max
pooling by 3, and a last convolution block, which leaves one frame of 512 channels. CLMR's representation is that
frame (SimCLR's `h`); its projector (`z`, 64 values) only serves the contrastive loss and is not kept here. A track's
representation is the mean of its windows' (CLMR's `evaluate` averages over a track's consecutive windows).

This port was written from the published facts of CLMR (github.com/Spijkervet/CLMR, release 2.0: layer shapes,
constants, checkpoint key names), not from its code; tests/workers/test_clmr.py holds it to the original's outputs.
The released weights are not shipped: `ClmrSampleCnn` imports a CLMR Lightning checkpoint (`.ckpt`) the user
passes with `--weights`, read with `torch.load(weights_only=True)` (tensors and plain containers only, no pickled
code), and caches the encoder's part as safetensors.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import safetensors
import safetensors.torch
import torch
from torch import nn

from catalog_embed.schemas.errors import EncoderError, WeightsError
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence
from catalog_embed.workers.encoders.weights import cache_dir, local_copy, state_dict_sha256, verify_sha256

ENCODER = "clmr-samplecnn"

SAMPLE_RATE = 22050
"""CLMR's sample rate (its config's `sample_rate`; its preprocessing resamples every file to it)."""

WINDOW_SAMPLES = 59049
"""CLMR's `audio_length`: 3^10 samples, which SampleCNN's ten divisions by 3 reduce to one frame."""

_WIDTHS = (128, 128, 128, 256, 256, 256, 256, 256, 256, 512)
"""Channels after the stem and after each of the nine pooled blocks."""

BLOCKS = tuple(f"block{i}" for i in range(1, 10))
"""The nine pooled blocks, whose time-averaged outputs are the intermediate layers."""

REPRESENTATION_DIM = 512


class ConvBlock(nn.Module):
    """Conv1d, batch norm (its running statistics at inference), ReLU and, when `pool` > 1, max pooling."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, padding: int, pool: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)
        self.norm = nn.BatchNorm1d(out_channels)
        self.pool = nn.MaxPool1d(pool, stride=pool) if pool > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, in_channels, t) -> (n, out_channels, t / stride / pool)."""
        return self.pool(torch.relu(self.norm(self.conv(x))))


class SampleCnn(nn.Module):
    """CLMR's SampleCNN without its classifier: (n, 59049) waveforms -> 512-d representations.

    `stem`, then `block1` ... `block9` (pooled by 3), then `last` (unpooled). Every convolution has kernel 3; the
    stem's stride is 3 and the others keep the length (padding 1).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBlock(1, _WIDTHS[0], stride=3, padding=0, pool=1)
        for i, name in enumerate(BLOCKS):
            self.add_module(name, ConvBlock(_WIDTHS[i], _WIDTHS[i + 1], stride=1, padding=1, pool=3))
        self.last = ConvBlock(_WIDTHS[-1], REPRESENTATION_DIM, stride=1, padding=1, pool=1)

    def forward(self, x: torch.Tensor, taps: tuple[str, ...] = ("representation",)) -> dict[str, torch.Tensor]:
        """Run as far as the requested taps need.

        Args:
            x: (n, samples) waveforms; `WINDOW_SAMPLES` gives one output frame.
            taps: "representation" and/or block names from `BLOCKS`.

        Returns:
            Each tap averaged over time, (n, channels).
        """
        wanted = set(taps)
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x.unsqueeze(1))
        for name in BLOCKS:
            x = getattr(self, name)(x)
            if name in wanted:
                out[name] = x.mean(dim=-1)
                if len(out) == len(wanted):
                    return out
        out["representation"] = self.last(x).mean(dim=-1)
        return out


def state_shapes() -> dict[str, tuple[int, ...]]:
    """Shape of every entry of `SampleCnn`'s state dict, without allocating it."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in SampleCnn().state_dict().items()}


# The release's SampleCNN holds its layers in one `sequential`: index 0 the stem, 1-9 the blocks, 10 the last;
# in each, module 0 is the convolution and 1 the batch norm.
_RELEASE_KEY = re.compile(r"sequential\.(\d+)\.([01])\.(\w+)")
_OUR_LAYERS = ("stem", *BLOCKS, "last")


def release_key(key: str) -> str:
    """The key CLMR's SampleCNN gives the entry our `key` names (`block3.norm.running_var` ->
    `sequential.3.1.running_var`)."""
    layer, module, tensor = key.split(".")
    return f"sequential.{_OUR_LAYERS.index(layer)}.{0 if module == 'conv' else 1}.{tensor}"


# Prefixes under which CLMR checkpoints hold the encoder, tried in order: its Lightning module registers the
# encoder twice, as `encoder` and inside SimCLR as `model.encoder` (CLMR's own loader reads the latter); a bare
# SampleCNN state dict has none.
_PREFIXES = ("model.encoder.", "encoder.", "")

_NO_WEIGHTS = (
    "the CLMR weights are not shipped with catalog-embed: download clmr_checkpoint_10000.zip from the 2.0 release "
    "of Spijkervet/CLMR on GitHub (https://github.com/Spijkervet/CLMR/releases/tag/2.0), unzip it, check that its "
    "terms fit your use (the repository's code is Apache-2.0; its README states no licence for the weights), and "
    "pass the .ckpt with --weights PATH_OR_URI (or weights=... in Python)"
)


def release_state_dict(checkpoint: object, source: str) -> dict[str, torch.Tensor]:
    """SampleCnn's state dict, keyed our way, from a loaded CLMR checkpoint (or a bare SampleCNN state dict).

    Raises:
        WeightsError: the object holds no SampleCNN state dict of the expected keys and shapes.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{source} holds no state dict of tensors: pass the .ckpt of a CLMR release (a Lightning checkpoint)"
        raise WeightsError(msg)
    expected = state_shapes()
    prefix = next((p for p in _PREFIXES if f"{p}{release_key('stem.conv.weight')}" in state), "")
    wanted = {f"{prefix}{release_key(key)}": key for key in expected}
    found = {k for k in state if k.startswith(prefix) and _RELEASE_KEY.fullmatch(k.removeprefix(prefix))}
    missing = sorted(wanted.keys() - state.keys())
    unexpected = sorted(found - wanted.keys())
    misshapen = [f"{k} {tuple(state[k].shape)} (expected {expected[wanted[k]]})"
                 for k in sorted(wanted.keys() & state.keys()) if tuple(state[k].shape) != expected[wanted[k]]]
    if missing or unexpected or misshapen:
        problems = "; ".join(
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys
        )
        msg = f"{source} is not a CLMR SampleCNN checkpoint: {problems}"
        raise WeightsError(msg)
    return {ours: state[theirs].detach().to("cpu").contiguous() for theirs, ours in wanted.items()}


@dataclass(frozen=True)
class ImportedWeights:
    """A converted checkpoint in the cache: `SampleCnn`'s state dict as safetensors, and its digest."""

    path: Path
    weights_sha256: str


def import_checkpoint(uri: str, weights_sha256: str | None = None) -> ImportedWeights:
    """Convert a CLMR checkpoint to a cached safetensors file, once per file (keyed by the file's sha256).

    Args:
        uri: the checkpoint; a local path or any fsspec URI.
        weights_sha256: sha256 the file must have; with a cached conversion of it, `uri` is not read at all.

    Raises:
        WeightsError: missing or unreadable file, pin mismatch, not a PyTorch checkpoint, or not CLMR's SampleCNN.
    """
    pin = weights_sha256.lower() if weights_sha256 else None
    if pin is not None and not re.fullmatch(r"[0-9a-f]{64}", pin):
        msg = f"weights_sha256 must be 64 hex digits, got {weights_sha256!r}"
        raise WeightsError(msg)
    root = cache_dir() / ENCODER
    root.mkdir(parents=True, exist_ok=True)
    if pin is not None and (root / f"{pin}.safetensors").is_file():
        return _cached(root / f"{pin}.safetensors")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.isfile(path):
            msg = f"weights not found: {uri} (pass the .ckpt file of a CLMR release)"
            raise WeightsError(msg)
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=root) as staging:
            local = local_copy(fs, path, Path(staging))
            source_sha = verify_sha256(local, pin)
            entry = root / f"{source_sha}.safetensors"
            if entry.is_file():
                return _cached(entry)
            state = release_state_dict(_load_checkpoint(local, uri), uri)
            digest = state_dict_sha256(state)
            converted = Path(staging) / "model.safetensors"
            safetensors.torch.save_file(state, str(converted), metadata={"weights_sha256": digest})
            os.replace(converted, entry)  # atomic: a concurrent identical conversion may win, with the same bytes
    except OSError as exc:
        msg = f"cannot read weights {uri}: {exc}"
        raise WeightsError(msg) from exc
    return ImportedWeights(entry, digest)


def _load_checkpoint(path: Path, source: str) -> object:
    """`torch.load` with `weights_only=True`: tensors and plain containers, never pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = (
            f"{source} is not a PyTorch checkpoint readable without pickled code ({first[:120]}): pass the .ckpt "
            "inside the release's zip, not the zip itself"
        )
        raise WeightsError(msg) from exc


def _cached(path: Path) -> ImportedWeights:
    """A cache entry, with the digest recorded in its metadata."""
    with safetensors.safe_open(str(path), framework="pt") as st:
        digest = (st.metadata() or {}).get("weights_sha256")
    if digest is None:
        msg = f"{path} is not a conversion made by catalog-embed: delete it and run again"
        raise WeightsError(msg)
    return ImportedWeights(path, digest)


RULES = ("catalog", "original")
"""How audio becomes CLMR's windows: ours (the pipeline's decoding), or CLMR's own preprocessing (see
`ClmrFrontEnd`)."""


class ClmrFrontEnd(FrontEnd):
    """CLMR's input: consecutive, non-overlapping windows of 59,049 raw samples at 22,050 Hz.

    The waveform is used as decoded, floats in [-1, 1] (CLMR reads 16-bit WAV as int / 32768 and applies no other
    normalisation). Windows start at 0, 2.68 s, 5.36 s, ...; a tail shorter than a window is dropped, as CLMR
    drops its last `torch.split` piece. Audio shorter than one window is zero-padded to one (CLMR's split leaves
    it no window at all, and its evaluation fails).

    Under the "catalog" rules the decoder averages the channels and resamples with soxr HQ, as for every encoder
    here, and a track of an exact number of windows keeps its last one. The "original" rules are CLMR's
    preprocessing: FFmpeg's resampler (CLMR runs `ffmpeg -ar 22050`), every channel windowed on its own and
    averaged with the rest into the track's representation, and the last whole window dropped too when nothing
    is left over (CLMR drops the last piece of its split, whole or not). The resampler and the channel rule each
    move a track's representation by ~1e-2 (tests/workers/test_clmr.py); the 16-bit rounding of CLMR's WAV
    files, which neither rule repeats, by ~1e-5.

    Args:
        rules: "catalog" or "original" (see `RULES`).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, rules: str = "catalog") -> None:
        super().__init__()
        if rules not in RULES:
            msg = f"unknown CLMR rules {rules!r}; choose one of: {', '.join(RULES)}"
            raise EncoderError(msg)
        self.rules = rules
        self.channels = "each" if rules == "original" else "mean"
        self.resampler = "swr" if rules == "original" else "soxr_hq"

    @property
    def window_samples(self) -> int:
        """59,049 samples (2.68 s)."""
        return WINDOW_SAMPLES

    def _n_windows(self, n_samples: int) -> int:
        if self.rules == "original":
            return max(-(-n_samples // WINDOW_SAMPLES) - 1, 1)
        return max(n_samples // WINDOW_SAMPLES, 1)

    def window_starts(self, n_samples: int) -> list[float]:
        """Start (s) of each window of one channel."""
        return [i * WINDOW_SAMPLES / SAMPLE_RATE for i in range(self._n_windows(n_samples))]

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(samples,) or, under the original rules, (channels, samples) float waveform at 22,050 Hz ->
        (n_windows, 59049) float32, channel after channel."""
        rows = waveform if waveform.dim() == 2 and self.channels == "each" else waveform[None]
        parts = []
        for row in rows:
            row = self.padded(row)
            n = self._n_windows(row.numel())
            parts.append(row[: n * WINDOW_SAMPLES].reshape(n, WINDOW_SAMPLES))
        return torch.cat(parts)

    def config(self) -> dict[str, Any]:
        """Every constant that shapes the windows."""
        return {
            "sample_rate": SAMPLE_RATE,
            "window_samples": WINDOW_SAMPLES,
            "hop_samples": WINDOW_SAMPLES,
            "normalisation": "none (floats in [-1, 1])",
            "rules": self.rules,
            "channels": self.channels,
            "resampler": self.resampler,
            "tail": "dropped: the last split piece" if self.rules == "original" else "dropped when partial",
            "short_audio": "zero-pad to one window",
        }


@dataclass
class ClmrSampleCnn(Encoder):
    """CLMR's SampleCNN representation: 512 values per 2.68 s window, from a checkpoint the user supplies.

    Attributes:
        rules: "catalog" (registered as clmr-samplecnn) or "original" (clmr-samplecnn-original): how audio
            becomes windows, see `ClmrFrontEnd`.
        weights: a CLMR Lightning checkpoint (`.ckpt`, as in the 2.0 release's clmr_checkpoint_10000.zip) or a
            bare SampleCNN state dict; a local path or any fsspec URI.
        weights_sha256: when given, the sha256 that file must have; a cached conversion of it is then used without
            reading `weights` again.
    """

    name: ClassVar[str] = ENCODER
    description: ClassVar[str] = (
        "CLMR SampleCNN (Spijkervet & Burgoyne 2021), SimCLR-pre-trained on raw 22.05 kHz waveforms; "
        "weights not shipped (licence unstated): pass --weights"
    )
    licence: ClassVar[Licence] = Licence(code="Apache-2.0", weights="unstated (CLMR README names none)")
    compilable: ClassVar[bool] = True

    rules: str = "catalog"
    weights: str | None = None
    weights_sha256: str | None = None
    _imported: ImportedWeights | None = field(default=None, init=False, repr=False)
    _net: SampleCnn | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.front_end()  # an unknown rule fails here, before any weights or audio are read
        self.name = ENCODER if self.rules == "catalog" else f"{ENCODER}-{self.rules}"

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The 512-d representation and the nine pooled blocks, each averaged over time."""
        return (
            LayerSpec("representation", REPRESENTATION_DIM, "SimCLR's h: the last block's one frame (the paper's)"),
            *(LayerSpec(name, _WIDTHS[i + 1], f"mean over time of SampleCNN's pooled block {i + 1} (of 9)")
              for i, name in enumerate(BLOCKS)),
        )

    @property
    def default_layer(self) -> str:
        """The representation CLMR evaluates."""
        return "representation"

    def front_end(self) -> ClmrFrontEnd:
        """A new CLMR front end under this encoder's rules."""
        return ClmrFrontEnd(self.rules)

    def prepare(self) -> None:
        """Import and cache the checkpoint (first use converts it; later uses read the cache).

        Raises:
            WeightsError: no weights were given, or they are unreadable, pinned otherwise or not CLMR's SampleCNN.
        """
        if self._imported is not None:
            return
        if self.weights is None and self.weights_sha256 is None:
            raise WeightsError(_NO_WEIGHTS)
        self._imported = import_checkpoint(self.weights or "", self.weights_sha256)

    @property
    def version(self) -> str:
        """First 16 hex digits of the sha256 of the encoder's state dict (the same for any file holding it)."""
        return self._prepared(self._imported.weights_sha256[:16] if self._imported else None)

    def _build(self, device: torch.device) -> None:
        if self._imported is None:
            msg = f"encoder {self.name!r} has no weights before prepare()"
            raise EncoderError(msg)
        net = SampleCnn()
        net.load_state_dict(safetensors.torch.load_file(self._imported.path), strict=True)
        self._net = net.to(device).eval()

    def _compile_network(self) -> None:
        # One shape per call (see Encoder.compile): never trace for dynamic shapes.
        self._net = torch.compile(self._net, dynamic=False)

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        out = self._net(windows.to(torch.float32), tuple(layers))
        return {name: out[name] for name in layers}
