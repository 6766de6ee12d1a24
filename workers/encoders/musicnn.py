"""musicnn (Pons & Serra, 2019): a music-tagging CNN on log-mel patches, ported to PyTorch.

The pretrained weights are the TensorFlow checkpoints that ship in the `musicnn` 0.1.0 wheel on PyPI (ISC
licence, like the original code). `prepare()` downloads that wheel once (sha256-pinned), reads the checkpoints
with our own reader (`catalog_embed.workers.encoders.tf_checkpoint`; TensorFlow is never needed), converts the 64 model
variables to PyTorch layout and caches them as safetensors; later runs are offline.

Each 3 s window (187 frames x 96 mel bands) goes through an input BatchNorm, a front end of "timbral" convolutions
(7 frames x 38 or 67 mel bands) and "temporal" convolutions (128, 64, 32 frames x 1 band), each max-pooled over
frequency, a mid end of three residual 1-D convolutions, then max and mean pooling over time and a dense back end. Every
BatchNorm has epsilon 1e-3 and follows conv -> bias -> ReLU, as in the original. Two faults of the original's
feature extractor are not reproduced: every window's mid-end and penultimate features are its own (the original
repeats the first patch's), and weights that fail to load are an error (the original goes on with random ones).

Layers:
    penultimate (200): the BatchNorm'd dense layer the tagger is read from; the default embedding.
    pool (1506): max and mean over time of the mid-end features, interleaved (max0, mean0, max1, mean1, ...) as
        the original flattens them.
    max_pool, mean_pool (753 each): the two halves of `pool`, de-interleaved.
    taggram (50): sigmoid tag probabilities, labelled with the variant's tag names.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchaudio
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F  # noqa: N812

from catalog_embed.schemas.errors import EncoderError, WeightsError
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence
from catalog_embed.workers.encoders.tf_checkpoint import read_checkpoint
from catalog_embed.workers.encoders.weights import cache_dir, fetch_pypi_wheel, state_dict_sha256

__all__ = ["MTT_TAGS", "MSD_TAGS", "Musicnn", "MusicnnFrontEnd", "MusicnnNet"]

SAMPLE_RATE = 16_000
N_FFT = 512
HOP_LENGTH = 256
N_MELS = 96
F_MAX = 8_000.0
PATCH_FRAMES = 187
BN_EPSILON = 1e-3

WHEEL_PROJECT = "musicnn"
WHEEL_VERSION = "0.1.0"
WHEEL_FILENAME = "musicnn-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "f38a4890c648c1ddbb141c5d96d2b0a8cfcd36746002d896989f7b88beb65cfa"
# Names the state dict's names and tensor layouts: bump it when they change, so that cache entries written for an
# older layout are converted again rather than failing to load.
_CACHE_LAYOUT = "musicnn-torch-1"

MSD_TAGS: tuple[str, ...] = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s", "alternative rock",
    "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock", "soul", "indie rock", "Mellow",
    "electronica", "80s", "folk", "90s", "chill", "instrumental", "punk", "oldies", "blues", "hard rock",
    "ambient", "acoustic", "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country",
    "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb",
    "indie pop", "sad", "House", "happy",
)  # fmt: skip

MTT_TAGS: tuple[str, ...] = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano",
    "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing", "vocals",
    "no vocals", "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop", "soft",
    "sitar", "solo", "man", "classic", "choir", "voice", "new age", "dance", "male voice", "female vocal",
    "beats", "harp", "cello", "no voice", "weird", "country", "metal", "female voice", "choral",
)  # fmt: skip

_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "MSD": ("Million Song Dataset (Last.fm tags)", MSD_TAGS),
    "MTT": ("MagnaTagATune", MTT_TAGS),
}


class MusicnnFrontEnd(FrontEnd):
    """16 kHz mono waveform -> (n, 187, 96) log-compressed mel patches, as musicnn computes them.

    The mel power spectrogram uses an n_fft of 512, a hop of 256, a periodic Hann window, centred frames with zero
    padding, and 96 Slaney-scale, Slaney-normalised bands from 0 to 8 kHz. As in the original, the power is
    rounded to float16 before `log10(10000 x + 1)` is taken in float32 (the rounding is part of what the network
    was trained on). Patches of 187 frames (2.992 s) follow each other without overlap and a trailing partial
    patch is dropped.

    Audio shorter than one patch (`window_samples`, 47,616 samples) is zero-padded at the end to exactly that
    length, so it yields one window. (The original crashes on such audio; its training padded short clips by
    repetition, which would invent music that is not there.)
    """

    sample_rate = SAMPLE_RATE

    def __init__(self) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE,
            n_fft=N_FFT,
            win_length=N_FFT,
            hop_length=HOP_LENGTH,
            f_min=0.0,
            f_max=F_MAX,
            pad=0,
            n_mels=N_MELS,
            window_fn=torch.hann_window,
            power=2.0,
            normalized=False,
            center=True,
            pad_mode="constant",
            norm="slaney",
            mel_scale="slaney",
        )

    @property
    def window_samples(self) -> int:
        """Samples of the shortest audio that gives one full patch: centred frames are 1 + samples // hop."""
        return (PATCH_FRAMES - 1) * HOP_LENGTH

    def mel_power(self, waveform: torch.Tensor) -> torch.Tensor:
        """The (frames, 96) mel power spectrogram of a (samples,) float32 waveform."""
        return self.mel(waveform).transpose(0, 1)

    def spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """The (frames, 96) log-compressed mel spectrogram of a (samples,) float32 waveform, before patching."""
        # The product stays in float32: taken in float16, as numpy 2 would do, it overflows on loud music.
        return torch.log10(self.mel_power(waveform).to(torch.float16).to(torch.float32) * 10000.0 + 1.0)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Map a (samples,) float32 waveform at 16 kHz to (n_windows, 187, 96) float32 patches.

        Raises:
            FrontEndError: the waveform is not one-dimensional or is empty.
        """
        spectrogram = self.spectrogram(self.padded(waveform))
        n_windows = spectrogram.shape[0] // PATCH_FRAMES
        return spectrogram[: n_windows * PATCH_FRAMES].reshape(n_windows, PATCH_FRAMES, N_MELS)

    def window_starts(self, n_samples: int) -> list[float]:
        """Start time in seconds of each window `forward` yields for a waveform of `n_samples`."""
        frames = 1 + max(n_samples, self.window_samples) // HOP_LENGTH
        seconds_per_window = PATCH_FRAMES * HOP_LENGTH / SAMPLE_RATE
        return [i * seconds_per_window for i in range(frames // PATCH_FRAMES)]

    def config(self) -> dict[str, Any]:
        """Every parameter that changes the windows, JSON-serialisable."""
        return {
            "sample_rate": SAMPLE_RATE,
            "n_fft": N_FFT,
            "win_length": N_FFT,
            "window": "hann-periodic",
            "hop_length": HOP_LENGTH,
            "center": True,
            "pad_mode": "constant",
            "power": 2.0,
            "n_mels": N_MELS,
            "f_min": 0.0,
            "f_max": F_MAX,
            "mel_scale": "slaney",
            "mel_norm": "slaney",
            "compression": "log10(10000*float16(power)+1)",
            "patch_frames": PATCH_FRAMES,
            "patch_hop": PATCH_FRAMES,
            "short_audio": "zero-pad-to-one-patch",
        }


class _FrozenBatchNorm(nn.Module):
    """Inference-time BatchNorm as the per-channel affine map `x * scale + shift` along dimension 1.

    The four statistics keep PyTorch's BatchNorm names so the state dict reads naturally; `fold()` turns them into
    scale and shift once, in float64, after the weights are loaded.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels), persistent=False)
        self.register_buffer("shift", torch.zeros(channels), persistent=False)

    def fold(self) -> None:
        """Compute scale and shift from the loaded statistics."""
        scale = self.weight.double() / torch.sqrt(self.running_var.double() + BN_EPSILON)
        shift = self.bias.double() - self.running_mean.double() * scale
        self.scale = scale.to(self.weight.dtype)
        self.shift = shift.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.view(view), x, self.scale.view(view))


class _FreqMaxBlock(nn.Module):
    """Convolution over (time, mel) -> bias -> ReLU -> BatchNorm -> max over the mel axis: (n, filters, time).

    Bias, ReLU and a BatchNorm with a positive scale are monotone non-decreasing per channel, so they commute
    exactly with the max and are applied after it, on a tensor 30 to 96 times smaller. A channel whose BatchNorm
    scale is negative turns the max into a min; `fold()` negates that channel's kernel (exact in floating point),
    so one max serves every channel and the sign is restored before the bias.
    """

    def __init__(self, weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        filters = weight_shape[0]
        self.weight = nn.Parameter(torch.zeros(weight_shape))
        self.bias = nn.Parameter(torch.zeros(filters))
        self.bn = _FrozenBatchNorm(filters)
        self.register_buffer("signed_weight", torch.zeros(weight_shape), persistent=False)
        self.register_buffer("sign", torch.ones(filters), persistent=False)

    def fold(self) -> None:
        """Derive the signed kernel from the loaded weights; `bn` must be folded first."""
        self.sign = torch.where(self.bn.scale < 0, -1.0, 1.0).to(self.weight.dtype)
        self.signed_weight = self.weight.detach() * self.sign.view((-1,) + (1,) * (self.weight.dim() - 1))

    def _finish(self, signed_max: torch.Tensor) -> torch.Tensor:
        pooled = torch.addcmul(self.bias.view(1, -1, 1), signed_max, self.sign.view(1, -1, 1))
        return self.bn(torch.relu_(pooled))


# Filter positions along the mel axis per convolution in the timbral blocks' lean layout (59 and 30 in all).
_TIMBRAL_OFFSETS_PER_CALL = 16
# Polyphase factor of the temporal convolutions' lean layout; divides each of their lengths (128, 64, 32).
_TEMPORAL_PHASES = 8


class _TimbralBlock(_FreqMaxBlock):
    """7-frame filters spanning part of the mel axis, on the input zero-padded by 3 frames at each end.

    With `lean` set (see `MusicnnNet.lean`), each of the mel offsets the filter slides to becomes a batch entry of
    a 1-D convolution over time whose channels are that offset's mel bands: the same products, with a 7-tap
    kernel instead of a 7 x 38 or 7 x 67 one.
    """

    def __init__(self, filters: int, mel_bands: int) -> None:
        super().__init__((filters, 1, 7, mel_bands))
        self.lean = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1, time, mel) -> (n, filters, time)."""
        if not self.lean:
            return self._finish(F.conv2d(x, self.signed_weight, padding=(3, 0)).amax(dim=3))
        n, _, time, mel = x.shape
        bands = self.signed_weight.shape[3]
        offsets = mel - bands + 1
        kernel = self.signed_weight.squeeze(1).transpose(1, 2)
        windows = x.squeeze(1).unfold(2, bands, 1)  # (n, time, offsets, bands), a view
        signed_max = None
        # A few filter positions at a time, folding their max in: the convolution's output for all 59 positions
        # would be 9 MB per window in float32, twice what the whole network needs in bfloat16.
        for first in range(0, offsets, _TIMBRAL_OFFSETS_PER_CALL):
            part = windows[:, :, first : first + _TIMBRAL_OFFSETS_PER_CALL]
            count = part.shape[2]
            # (n * count, bands, time): the mel bands under each filter position, as channels.
            y = F.conv1d(part.permute(0, 2, 3, 1).reshape(n * count, bands, time), kernel, padding=3)
            part_max = y.view(n, count, *y.shape[1:]).amax(dim=1)
            signed_max = part_max if signed_max is None else torch.maximum(signed_max, part_max)
        return self._finish(signed_max)


class _TemporalBlock(_FreqMaxBlock):
    """Filters along time only (one mel band each), with TensorFlow's 'same' padding.

    Each mel band is convolved on its own, so the bands are folded into the batch of a Conv1d; the max over mel
    then runs across whole contiguous (filters, time) planes, which is much faster than along a short inner axis.
    """

    def __init__(self, filters: int, length: int) -> None:
        super().__init__((filters, 1, length))
        # TensorFlow's 'same' padding puts the odd extra zero at the end of the time axis.
        self.time_padding = (length // 2 - 1, length // 2)
        self.lean = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n * mel, 1, time) -> (n, filters, time)."""
        padded = F.pad(x, self.time_padding)
        if not self.lean:
            y = F.conv1d(padded, self.signed_weight)
        else:
            # Tap j = _TEMPORAL_PHASES * a + b: channel b is the input shifted by b samples, convolved with taps
            # b, b + 8, ... at dilation 8. The same products, as a kernel of length / 8 taps.
            filters, _, length = self.signed_weight.shape
            shifted = padded.squeeze(1).unfold(1, _TEMPORAL_PHASES, 1).transpose(1, 2)
            phased = self.signed_weight.view(filters, length // _TEMPORAL_PHASES, _TEMPORAL_PHASES).transpose(1, 2)
            y = F.conv1d(shifted, phased, dilation=_TEMPORAL_PHASES)
        return self._finish(y.view(x.shape[0] // N_MELS, N_MELS, *y.shape[1:]).amax(dim=1))


class _MidEndConv(nn.Module):
    """Conv1d over time (kernel 7, zero padding 3 each side) -> ReLU -> BatchNorm."""

    def __init__(self, in_channels: int, filters: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, filters, 7, padding=3)
        self.bn = _FrozenBatchNorm(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


# Each PyTorch module and the TensorFlow variable scope its weights come from.
_CONV_SCOPES: dict[str, str] = {
    "timbral.0": "conv2d",
    "timbral.1": "conv2d_1",
    "temporal.0": "conv2d_2",
    "temporal.1": "conv2d_3",
    "temporal.2": "conv2d_4",
    "midend.0": "conv2d_5",
    "midend.1": "conv2d_6",
    "midend.2": "conv2d_7",
}
_BN_SCOPES: dict[str, str] = {
    "input_bn": "batch_normalization",
    "timbral.0.bn": "batch_normalization_1",
    "timbral.1.bn": "batch_normalization_2",
    "temporal.0.bn": "batch_normalization_3",
    "temporal.1.bn": "batch_normalization_4",
    "temporal.2.bn": "batch_normalization_5",
    "midend.0.bn": "batch_normalization_6",
    "midend.1.bn": "batch_normalization_7",
    "midend.2.bn": "batch_normalization_8",
    "pool_bn": "batch_normalization_9",
    "dense_bn": "batch_normalization_10",
}
_DENSE_SCOPES: dict[str, str] = {"dense": "dense", "logits": "dense_1"}
_BN_VARIABLES: dict[str, str] = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}


class MusicnnNet(nn.Module):
    """The musicnn network: (n, 187, 96) log-mel patches -> named outputs.

    Intermediate outputs carry the names of the reference notes; time-varying ones come back as
    (n, time, features) like the original's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = _FrozenBatchNorm(1)
        # Timbral filters span 7 frames and 40% or 70% of the mel axis; the input is zero-padded 3 + 3 in time.
        self.timbral = nn.ModuleList(_TimbralBlock(204, int(fraction * N_MELS)) for fraction in (0.4, 0.7))
        self.temporal = nn.ModuleList(_TemporalBlock(51, length) for length in (128, 64, 32))
        self.midend = nn.ModuleList([_MidEndConv(561, 64), _MidEndConv(64, 64), _MidEndConv(64, 64)])
        self.pool_bn = _FrozenBatchNorm(1506)
        self.dense = nn.Linear(1506, 200)
        self.dense_bn = _FrozenBatchNorm(200)
        self.logits = nn.Linear(200, 50)

    @property
    def lean(self) -> bool:
        """Whether the front-end convolutions run in their lean layout (the same products in another shape).

        The timbral filters span 7 x 38 and 7 x 67 (time x mel) and the temporal ones 128, 64 and 32 frames. In
        IEEE float32 on CUDA, cuDNN's choice for such large kernels favours FFT-based algorithms, whose workspace
        holds the spectra of the whole batch for every output channel (204 channels x a padded 193 x 96 plane,
        complex, is some 50 MB per window for one timbral layer): the likely cause of the ~110 MB per window
        measured on an H200 against 4.7 MB in bfloat16, for which cuDNN has no FFT algorithms. The lean layout asks for
        small kernels only: 7-tap 1-D convolutions over time with the mel bands under each filter position as
        channels (16 positions per call, so that their output stays small too), and the temporal filters split
        into 8 phases at dilation 8 (FFT algorithms take no dilation), so cuDNN picks implicit-GEMM algorithms
        with little workspace. On the CPU the original layout is faster (measured on 2 cores: the timbral
        convolution 1.3-1.9x, the temporal one 1.25-1.4x slower in the lean layout, unchunked, under heavy load).
        """
        return all(block.lean for block in (*self.timbral, *self.temporal))

    @lean.setter
    def lean(self, value: bool) -> None:
        for block in (*self.timbral, *self.temporal):
            block.lean = value

    def fold(self) -> None:
        """Precompute the BatchNorm affine maps; call once after loading the weights."""
        modules = list(self.modules())
        for module in modules:
            if isinstance(module, _FrozenBatchNorm):
                module.fold()
        for module in modules:
            if isinstance(module, _FreqMaxBlock):
                module.fold()

    def forward(
        self, patches: torch.Tensor, keep: frozenset[str] = frozenset({"penultimate"})
    ) -> dict[str, torch.Tensor]:
        """Run the network, returning the outputs named in `keep`.

        Args:
            patches: (n, 187, 96) float32 log-mel patches.
            keep: output names: input_bn, f74, f77, s128, s64, s32, timbral, temporal, frontend, cnn1, cnn2,
                cnn3, midend_concat, max_pool, mean_pool, flat_pool, flat_pool_bn, dense_relu, penultimate,
                logits, taggram.
        """
        out: dict[str, torch.Tensor] = {}

        def record(name: str, value: torch.Tensor, time_major: bool = False) -> None:
            if name in keep:
                out[name] = value.transpose(1, 2) if time_major else value

        x = self.input_bn(patches.unsqueeze(1))
        if "input_bn" in keep:
            out["input_bn"] = x.squeeze(1)
        timbral = [block(x) for block in self.timbral]
        by_mel = x.squeeze(1).transpose(1, 2).reshape(-1, 1, PATCH_FRAMES)
        temporal = [block(by_mel) for block in self.temporal]
        for name, value in zip(("f74", "f77", "s128", "s64", "s32"), timbral + temporal, strict=True):
            record(name, value, time_major=True)
        frontend = torch.cat(timbral + temporal, dim=1)
        record("timbral", frontend[:, :408], time_major=True)
        record("temporal", frontend[:, 408:], time_major=True)
        record("frontend", frontend, time_major=True)

        cnn1 = self.midend[0](frontend)
        cnn2 = self.midend[1](cnn1) + cnn1
        cnn3 = self.midend[2](cnn2) + cnn2
        for name, value in (("cnn1", cnn1), ("cnn2", cnn2), ("cnn3", cnn3)):
            record(name, value, time_major=True)
        midend = torch.cat([frontend, cnn1, cnn2, cnn3], dim=1)
        record("midend_concat", midend, time_major=True)

        max_pool = midend.amax(dim=2)
        mean_pool = midend.mean(dim=2)
        record("max_pool", max_pool)
        record("mean_pool", mean_pool)
        flat_pool = torch.stack([max_pool, mean_pool], dim=2).flatten(1)
        record("flat_pool", flat_pool)
        flat_pool_bn = self.pool_bn(flat_pool)
        record("flat_pool_bn", flat_pool_bn)
        dense_relu = torch.relu(self.dense(flat_pool_bn))
        record("dense_relu", dense_relu)
        penultimate = self.dense_bn(dense_relu)
        record("penultimate", penultimate)
        logits = self.logits(penultimate)
        record("logits", logits)
        record("taggram", torch.sigmoid(logits))
        return out


def convert_checkpoint(tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map the 64 TensorFlow model variables of a musicnn checkpoint to `MusicnnNet`'s state dict.

    TensorFlow kernels are HWIO, i.e. (time, freq, in, out); PyTorch wants (out, in, time, freq). The temporal
    kernels are one mel band wide and the mid-end "2-D" kernels span the whole feature axis, so both become
    Conv1d kernels (out, in, time).

    Raises:
        WeightsError: a variable is missing or has an unexpected shape.
    """

    def get(name: str) -> torch.Tensor:
        try:
            return torch.from_numpy(np.ascontiguousarray(tensors[name], dtype=np.float32))
        except KeyError:
            msg = f"musicnn checkpoint lacks variable {name!r}"
            raise WeightsError(msg) from None

    state: dict[str, torch.Tensor] = {}
    for module, scope in _CONV_SCOPES.items():
        kernel = get(f"{scope}/kernel")
        if module.startswith("midend"):
            state[f"{module}.conv.weight"] = kernel[:, :, 0, :].permute(2, 1, 0)
            state[f"{module}.conv.bias"] = get(f"{scope}/bias")
        elif module.startswith("temporal"):
            state[f"{module}.weight"] = kernel[:, 0, :, :].permute(2, 1, 0)
            state[f"{module}.bias"] = get(f"{scope}/bias")
        else:
            state[f"{module}.weight"] = kernel.permute(3, 2, 0, 1)
            state[f"{module}.bias"] = get(f"{scope}/bias")
    for module, scope in _BN_SCOPES.items():
        for torch_name, tf_name in _BN_VARIABLES.items():
            state[f"{module}.{torch_name}"] = get(f"{scope}/{tf_name}")
    for module, scope in _DENSE_SCOPES.items():
        state[f"{module}.weight"] = get(f"{scope}/kernel").T
        state[f"{module}.bias"] = get(f"{scope}/bias")
    expected = MusicnnNet().state_dict()
    for name, value in state.items():
        if value.shape != expected[name].shape:
            msg = f"musicnn checkpoint: {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
            raise WeightsError(msg)
    return {name: value.contiguous() for name, value in sorted(state.items())}


@contextmanager
def _ieee_float32_convolutions(device: torch.device) -> Iterator[None]:
    """Keep cuDNN from running float32 convolutions in TF32, which PyTorch allows by default.

    TF32 keeps 10 mantissa bits: musicnn's layers would drift about 1e-3 from the original, 40 times the
    tolerance the port is held to. The flag is process-wide, so it is restored on the way out.
    """
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    previous = cudnn.allow_tf32
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32 = previous


def _is_model_variable(name: str) -> bool:
    # Adam's two slots per variable and its beta powers are training state, not weights.
    return not name.endswith(("/Adam", "/Adam_1")) and name not in ("beta1_power", "beta2_power")


def _read_cached_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached state dict, or None when there is none or it was written for another layout."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as cached:
            if (cached.metadata() or {}).get("layout") != _CACHE_LAYOUT:
                return None
            return {name: cached.get_tensor(name) for name in cached.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        msg = f"cached musicnn weights {path} are unreadable ({exc}): delete the file to convert them again"
        raise WeightsError(msg) from exc


_LAYERS: tuple[tuple[str, int, str], ...] = (
    ("penultimate", 200, "BatchNorm'd 200-d dense layer before the tag logits (the usual musicnn embedding)"),
    ("pool", 1506, "max and mean over time of the 753 mid-end features, interleaved max0, mean0, max1, ..."),
    ("max_pool", 753, "max over time of the 753 mid-end features"),
    ("mean_pool", 753, "mean over time of the 753 mid-end features"),
)

# On a CPU the timbral convolutions write about 9 MB per window that the max over mel bands then reads back; in
# sub-batches of 2 or 3 it is still in cache. On 2 cores that measured about 1.9x the windows/s of batches of 16
# run in one piece; sub-batches of 1 were 8% slower, of 4 15% slower.
_CPU_SUB_BATCH = 2

# Our layer names and the network outputs they are read from.
_LAYER_SOURCES: dict[str, str] = {
    "penultimate": "penultimate",
    "pool": "flat_pool",
    "max_pool": "max_pool",
    "mean_pool": "mean_pool",
    "taggram": "taggram",
}


@dataclass
class Musicnn(Encoder):
    """musicnn with the weights trained on the Million Song Dataset ("MSD") or MagnaTagATune ("MTT").

    Args:
        variant: "MSD" or "MTT".

    Raises:
        EncoderError: unknown variant.
    """

    variant: str = "MSD"
    description: ClassVar[str] = "musicnn (Pons & Serra 2019) music tagger, 3 s log-mel patches at 16 kHz"
    licence: ClassVar[Licence] = Licence(code="ISC", weights="ISC")
    compilable: ClassVar[bool] = True
    _state: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)
    _version: str | None = field(default=None, init=False, repr=False)
    _net: MusicnnNet | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.variant not in _VARIANTS:
            msg = f"unknown musicnn variant {self.variant!r}; choose one of: {', '.join(_VARIANTS)}"
            raise EncoderError(msg)
        self.name = f"musicnn-{self.variant.lower()}"
        dataset, tags = _VARIANTS[self.variant]
        self._layers = tuple(LayerSpec(name, dim, description) for name, dim, description in _LAYERS) + (
            LayerSpec("taggram", len(tags), f"sigmoid probabilities of the 50 {dataset} tags", tags),
        )

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Every named output this encoder can produce."""
        return self._layers

    @property
    def default_layer(self) -> str:
        """The penultimate (200-d) layer, the embedding musicnn's authors recommend for transfer."""
        return "penultimate"

    def front_end(self) -> MusicnnFrontEnd:
        """A new front end module matching this encoder."""
        return MusicnnFrontEnd()

    @property
    def weights_path(self) -> Path:
        """Where the converted weights of this variant are cached."""
        return cache_dir() / "musicnn" / f"{self.variant}-{WHEEL_SHA256[:16]}.safetensors"

    def prepare(self) -> None:
        """Convert the variant's checkpoint from the PyPI wheel on first use; later, read the cached safetensors.

        Raises:
            WeightsError: the wheel cannot be fetched or is corrupt, or the cached file is unreadable.
        """
        if self._state is not None:
            return
        path = self.weights_path
        state = _read_cached_weights(path)
        if state is None:
            state = self._convert_to(path)
        self._state = state
        self._version = state_dict_sha256(state)[:16]

    def _convert_to(self, path: Path) -> dict[str, torch.Tensor]:
        wheel = fetch_pypi_wheel(WHEEL_PROJECT, WHEEL_VERSION, WHEEL_FILENAME, WHEEL_SHA256)
        prefix = f"musicnn/{self.variant}_musicnn/"
        try:
            with zipfile.ZipFile(wheel) as archive:
                index = archive.read(f"{prefix}.index")
                data = archive.read(f"{prefix}.data-00000-of-00001")
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            msg = f"{wheel} does not hold the musicnn {self.variant} checkpoint: {exc}"
            raise WeightsError(msg) from exc
        state = convert_checkpoint(read_checkpoint(index, [data], include=_is_model_variable))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent or interrupted conversion never leaves a half-written cache entry.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            save_file(state, tmp_path, metadata={"layout": _CACHE_LAYOUT, "source": f"{WHEEL_FILENAME}:{prefix}"})
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
        return state

    @property
    def version(self) -> str:
        """First 16 hex digits of the sha256 of the converted weights (names, shapes and bytes)."""
        return self._prepared(self._version)

    def _build(self, device: torch.device) -> None:
        if self._state is None:
            msg = f"encoder {self.name!r}: call prepare() before building it"
            raise EncoderError(msg)
        net = MusicnnNet()
        try:
            net.load_state_dict(self._state, strict=True)
        except RuntimeError as exc:
            msg = f"musicnn weights at {self.weights_path} do not fit the network ({exc}): delete the file"
            raise WeightsError(msg) from exc
        net.fold()
        net.lean = device.type == "cuda" and self.precision == "fp32"
        self._net = net.to(device).eval()

    def fix_batch(self, batch_windows: int) -> None:
        """`Encoder.fix_batch`; on a CPU for the `_CPU_SUB_BATCH` windows the network is called with at a time, so
        that a short batch is padded to that, not to `batch_windows`."""
        on_cpu = self.device is not None and self.device.type == "cpu"
        super().fix_batch(min(batch_windows, _CPU_SUB_BATCH) if on_cpu else batch_windows)

    def _compile_network(self) -> None:
        # One shape per call (see Encoder.compile): never trace for dynamic shapes.
        self._net = torch.compile(self._net, dynamic=False)

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if windows.dim() != 3 or tuple(windows.shape[1:]) != (PATCH_FRAMES, N_MELS):
            msg = f"musicnn expects (n, {PATCH_FRAMES}, {N_MELS}) windows, got {tuple(windows.shape)}"
            raise EncoderError(msg)
        windows = windows.to(torch.float32)
        keep = frozenset(_LAYER_SOURCES[name] for name in layers)
        n = windows.shape[0]
        if n == 0:
            return {name: windows.new_zeros(0, self.layer(name).dim) for name in layers}
        step = _CPU_SUB_BATCH if windows.device.type == "cpu" else n
        with _ieee_float32_convolutions(windows.device):
            parts = [self._net(windows[start : start + step], keep) for start in range(0, n, step)]
        return {name: torch.cat([part[_LAYER_SOURCES[name]] for part in parts]) for name in layers}
