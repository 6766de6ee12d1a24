"""MULE's SF-NFNet-F0 music encoder (McCallum et al., 2022) in PyTorch, with its log-mel front end.

SF-NFNet is a SlowFast (Feichtenhofer et al., 2019) normaliser-free ResNet (Brock et al., 2021) over log-mel
slices: a slow path (time stride 16, wide) and a fast path (time stride 4, narrow) of NF bottleneck blocks with
squeeze-excite, the fast path fused into the slow one before each of the four stages. The released embedding is
`gelu_s(concat(GAP(slow), GAP(fast)))`, 1728 values per 3 s slice.

This port was written from the published facts of the network (layer shapes, constants and reference outputs),
not from the original code. The released weights are CC BY-NC 4.0 and are not shipped: `MuleSfnfnetF0` imports
the release's `model.keras` (see `catalog_embed.workers.encoders.keras_import`) from a path the user passes.

Tensors are NCHW with (frequency, time) as (H, W).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import safetensors.torch
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from catalog_embed.schemas.errors import EncoderError, WeightsError
from catalog_embed.workers.encoders import keras_import
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence

GELU_GAIN = 1.7015043497085571
"""Scale that makes GELU preserve unit variance for unit-Gaussian inputs (the NFNet 'gamma')."""

ALPHA = 0.2
"""Residual branch scale of every NF block."""

_WS_EPS = 1e-4
_SLOW_WIDTHS = (256, 512, 1536, 1536)
_FAST_WIDTHS = (32, 64, 192, 192)
_DEPTHS = (1, 2, 6, 3)
_FREQ_STRIDES = (1, 2, 2, 2)
_SLOW_GROUP = 128
_FAST_GROUP = 16
_FUSION_TIME_WIDTHS = (32, 32, 64, 192)
_FUSION_WIDTHS = (128, 256, 512, 3072)

TAPS = (
    "slow_stem", "fast_stem",
    *(f"{name}{i}" for i in range(4) for name in ("fusion", "slow_stage", "fast_stage")),
    "slow_pooled", "fast_pooled", "concat_preact", "embedding",
)
"""Every tensor `SfNfNetF0.forward` can return: spatial maps (n, C, F, T) and pooled vectors (n, C)."""


def gelu_s(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU scaled by `GELU_GAIN`; the tanh approximation moves the embedding by ~1e-3."""
    return F.gelu(x) * GELU_GAIN


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) of one axis: any odd pixel goes at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class WSConv2d(nn.Module):
    """Conv2d with scaled weight standardisation (Brock et al., 2021), a learned gain and a bias.

    Each output channel's raw kernel `weight_v` (O, I/groups, kh, kw) is standardised over (I/groups, kh, kw) with
    the biased variance: w = (v - mean) * rsqrt(max(var * fan_in, 1e-4)) * gain. At inference the weights are
    constant, so `freeze()` computes w once; until then (or after a state dict is loaded) it is recomputed per
    call. Padding is TensorFlow's 'same'.
    """

    standardized: torch.Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        self.groups = groups
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel))
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.normal_(self.weight_v)
        self.register_buffer("standardized", None, persistent=False)
        self.register_load_state_dict_post_hook(_thaw_after_load)

    def standardize(self) -> torch.Tensor:
        """The standardised kernel, computed in float64 from the raw parameters."""
        v = self.weight_v.double()
        fan_in = v[0].numel()
        mean = v.mean(dim=(1, 2, 3), keepdim=True)
        var = v.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=_WS_EPS)) * self.gain.double().view(-1, 1, 1, 1)
        return ((v - mean) * scale).to(self.weight_v.dtype)

    def freeze(self) -> None:
        """Cache the standardised kernel for inference."""
        with torch.no_grad():
            self.standardized = self.standardize()

    def thaw(self) -> None:
        """Drop the cached kernel (parameters changed)."""
        self.standardized = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with TF 'same' padding; symmetric padding is left to the convolution (no copy)."""
        weight = self.standardized if self.standardized is not None else self.standardize()
        (top, bottom), (left, right) = (
            same_padding(size, k, s) for size, k, s in zip(x.shape[-2:], self.kernel, self.stride, strict=True)
        )
        if top == bottom and left == right:
            return F.conv2d(x, weight, self.bias, self.stride, (top, left), groups=self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, weight, self.bias, self.stride, groups=self.groups)


def _thaw_after_load(module: WSConv2d, _incompatible_keys: object) -> None:
    """A cached standardised kernel is stale once new parameters are loaded (a function, so modules pickle)."""
    module.thaw()


class SqueezeExcite(nn.Module):
    """x * 2 * sigmoid(fc2(relu(fc1(GAP(x))))); the factor 2 keeps the expected scale at 1 (NFNet)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale the channels of x."""
        s = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))
        return x * (2.0 * torch.sigmoid(s))[:, :, None, None]


class NFBlock(nn.Module):
    """NF bottleneck block with a factorised (1x3 then 3x1) grouped middle, squeeze-excite and a skip gain.

    The residual path sees beta * gelu_s(x). A transition block (first of a stage) also feeds that to its
    shortcut: [avgpool (2, 1) when it downsamples frequency] then a 1x1 conv; other blocks skip with x itself.
    Output: skip + alpha * skip_gain * residual.
    """

    def __init__(
        self, in_channels: int, out_channels: int, group_size: int, freq_stride: int, beta: float, transition: bool
    ) -> None:
        super().__init__()
        mid = out_channels // 2
        groups = mid // group_size
        self.beta = beta
        self.freq_stride = freq_stride
        self.conv0 = WSConv2d(in_channels, mid, (1, 1))
        self.conv1 = WSConv2d(mid, mid, (1, 3), (freq_stride, 1), groups)
        self.conv2 = WSConv2d(mid, mid, (3, 1), groups=groups)
        self.conv3 = WSConv2d(mid, out_channels, (1, 1))
        self.se = SqueezeExcite(out_channels, out_channels // 2)
        # Zero at initialisation in the original (each block starts as the identity); trained values differ.
        self.skip_gain = nn.Parameter(torch.zeros(()))
        self.shortcut_conv = WSConv2d(in_channels, out_channels, (1, 1)) if transition else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        h = gelu_s(x) * self.beta
        if self.shortcut_conv is None:
            skip = x
        else:
            pooled = h
            if self.freq_stride > 1:
                # ceil_mode averages a trailing odd row over the rows present, as TF's 'same' average pool.
                pooled = F.avg_pool2d(h, (self.freq_stride, 1), (self.freq_stride, 1), ceil_mode=True)
            skip = self.shortcut_conv(pooled)
        r = gelu_s(self.conv0(h))
        r = gelu_s(self.conv1(r))
        r = gelu_s(self.conv2(r))
        r = self.se(self.conv3(r))
        return skip + r * (self.skip_gain * ALPHA)


class Stem(nn.Module):
    """Four weight-standardised convs with gelu_s between them (none after the last)."""

    def __init__(self, widths: tuple[int, ...], kernels: tuple[tuple[int, int], ...],
                 strides: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        channels = (1, *widths)
        for i, (kernel, stride) in enumerate(zip(kernels, strides, strict=True)):
            self.add_module(f"conv{i}", WSConv2d(channels[i], channels[i + 1], kernel, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stem."""
        convs = list(self.children())
        for conv in convs[:-1]:
            x = gelu_s(conv(x))
        return convs[-1](x)


class Fusion(nn.Module):
    """Fast-to-slow lateral connection: a 1x7 conv with time stride 4 (fast to slow frame rate), then a 1x1 conv."""

    def __init__(self, in_channels: int, time_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_time = WSConv2d(in_channels, time_channels, (1, 7), (1, 4))
        self.conv_proj = WSConv2d(time_channels, out_channels, (1, 1))

    def forward(self, fast: torch.Tensor) -> torch.Tensor:
        """Map fast-path features to the slow path's frame rate and width (no activation, as released)."""
        return self.conv_proj(self.conv_time(fast))


def _path(in_widths: tuple[int, ...], widths: tuple[int, ...], group_size: int) -> nn.ModuleDict:
    """The four stages of one path as `stage{i}.block{j}`, with the released betas.

    beta = 1 / sqrt(expected input variance): the variance starts at 1 after the stem, grows by alpha^2 per
    block, and the release resets it to 1 + alpha^2 at each stage boundary (this reproduces its betas exactly).
    """
    stages = nn.ModuleDict()
    expected_var = 1.0
    for s, (cin, cout, depth, stride) in enumerate(zip(in_widths, widths, _DEPTHS, _FREQ_STRIDES, strict=True)):
        if s > 0:
            expected_var = 1.0 + ALPHA**2
        blocks = nn.ModuleDict()
        for b in range(depth):
            first = b == 0
            blocks[f"block{b}"] = NFBlock(
                cin if first else cout, cout, group_size, stride if first else 1, expected_var**-0.5, first
            )
            expected_var += ALPHA**2
        stages[f"stage{s}"] = blocks
    return stages


class SfNfNetF0(nn.Module):
    """SF-NFNet-F0 as released with MULE: 62,345,742 parameters, (n, 1, 96, 300) log-mel slices in.

    The state dict keys follow the release's layer roles (`slow.stage2.block3.conv1.weight_v`, ...), with raw
    (unstandardised) conv kernels in OIHW. Call `freeze()` after loading weights for inference.
    """

    def __init__(self) -> None:
        super().__init__()
        self.slow_stem = Stem((16, 32, 64, 128), ((3, 1), (3, 1), (3, 1), (3, 3)), ((2, 8), (1, 1), (1, 1), (2, 2)))
        self.fast_stem = Stem((2, 4, 8, 16), ((3, 3),) * 4, ((2, 2), (1, 1), (1, 1), (2, 2)))
        fast_in = (16, *_FAST_WIDTHS[:3])
        for i in range(4):
            self.add_module(f"fusion{i}", Fusion(fast_in[i], _FUSION_TIME_WIDTHS[i], _FUSION_WIDTHS[i]))
        slow_in = tuple(w + f for w, f in zip((128, *_SLOW_WIDTHS[:3]), _FUSION_WIDTHS, strict=True))
        self.slow = _path(slow_in, _SLOW_WIDTHS, _SLOW_GROUP)
        self.fast = _path(fast_in, _FAST_WIDTHS, _FAST_GROUP)

    def freeze(self) -> SfNfNetF0:
        """Precompute every standardised kernel (constant at inference); returns self."""
        for module in self.modules():
            if isinstance(module, WSConv2d):
                module.freeze()
        return self

    def forward(self, x: torch.Tensor, taps: tuple[str, ...] = ("embedding",)) -> dict[str, torch.Tensor]:
        """Run the network as far as the requested taps need.

        Args:
            x: (n, 1, 96, 300) standardised log-mel slices.
            taps: names from `TAPS`.

        Returns:
            The requested tensors by name.
        """
        wanted = set(taps)
        unknown = wanted.difference(TAPS)
        if unknown:
            msg = f"unknown taps {sorted(unknown)}; choose from {TAPS}"
            raise ValueError(msg)
        out: dict[str, torch.Tensor] = {}

        def keep(name: str, value: torch.Tensor) -> bool:
            """Record `value` if it was asked for; True once every tap is recorded (the rest can be skipped)."""
            if name in wanted:
                out[name] = value
            return len(out) == len(wanted)

        slow = self.slow_stem(x)
        fast = self.fast_stem(x)
        keep("slow_stem", slow)
        keep("fast_stem", fast)
        for i in range(4):
            fused = getattr(self, f"fusion{i}")(fast)
            keep(f"fusion{i}", fused)
            slow = torch.cat([slow, fused], dim=1)
            for block in self.slow[f"stage{i}"].values():
                slow = block(slow)
            if keep(f"slow_stage{i}", slow):
                return out
            for block in self.fast[f"stage{i}"].values():
                fast = block(fast)
            if keep(f"fast_stage{i}", fast):
                return out
        concat = torch.cat([slow.mean(dim=(2, 3)), fast.mean(dim=(2, 3))], dim=1)
        keep("slow_pooled", concat[:, : _SLOW_WIDTHS[-1]])
        keep("fast_pooled", concat[:, _SLOW_WIDTHS[-1]:])
        keep("concat_preact", concat)
        keep("embedding", gelu_s(concat))
        return out


def state_shapes() -> dict[str, tuple[int, ...]]:
    """Shape of every state dict entry of `SfNfNetF0`, without allocating it."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in SfNfNetF0().state_dict().items()}


class MuleFrontEnd(FrontEnd):
    """MULE's front end: 16 kHz waveform -> standardised 96-band log-mel slices of 300 frames (3 s).

    Steps, as in the release:
    - Amplitude: the release reads 16-bit PCM and divides by 2^16, so its waveforms span [-0.5, 0.5). Ours
      arrive in the usual [-1, 1] float convention, so they are halved here; the log compression below is not
      scale-invariant (a factor 2 moves the log-mel by up to log10(4)).
    - Power spectrogram: n_fft 2048, periodic Hann window of 400 samples centred in the frame, hop 160 (100
      frames/s), centred frames with reflect padding.
    - 96 HTK mel bands over 0-8000 Hz, each triangular filter scaled to unit L2 norm, then log10(10000 x + 1).
    - Slices of 300 frames centred on frames 200, 400, 600, ... (every centre before the last frame), each
      clamped to lie inside the spectrogram, so the last slice ends at the last frame; each slice standardised
      to mean 0 and population std 1 (std floored at 0.01 so silence is not amplified).
    - Audio shorter than one slice is zero-padded at the end to `window_samples` (2.99 s), which gives exactly
      300 frames: one slice starting at 0 s.
    """

    sample_rate = 16000
    amplitude_scale = 0.5
    n_fft = 2048
    win_length = 400
    hop_length = 160
    n_mels = 96
    f_min = 0.0
    f_max = 8000.0
    log_multiplier = 10000.0
    slice_frames = 300
    slice_hop = 200
    std_floor = 0.01

    def __init__(self) -> None:
        super().__init__()
        filters = torchaudio.functional.melscale_fbanks(
            self.n_fft // 2 + 1, self.f_min, self.f_max, self.n_mels, self.sample_rate, norm=None, mel_scale="htk"
        )
        filters = filters / filters.norm(dim=0, keepdim=True)
        self.register_buffer("mel_filters", filters.T.contiguous(), persistent=False)  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("window", torch.hann_window(self.win_length, periodic=True), persistent=False)

    @property
    def window_samples(self) -> int:
        """47,840 samples, the fewest that give one slice: centred frames sit every hop from sample 0."""
        return (self.slice_frames - 1) * self.hop_length

    def _centers(self, n_frames: int) -> list[int]:
        half = self.slice_frames // 2
        return [min(max(c, half), n_frames - half) for c in range(self.slice_hop, n_frames, self.slice_hop)]

    def _n_frames(self, n_samples: int) -> int:
        return 1 + max(n_samples, self.window_samples) // self.hop_length

    def window_starts(self, n_samples: int) -> list[float]:
        """Start (s) of each slice: frame f is centred on sample f * hop, so a slice starts at its first frame."""
        half = self.slice_frames // 2
        return [(c - half) * self.hop_length / self.sample_rate for c in self._centers(self._n_frames(n_samples))]

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(samples,) waveform in [-1, 1] -> (96, frames) log-mel, after padding to one slice."""
        x = waveform.to(self.window.device, torch.float32) * self.amplitude_scale
        if x.shape[-1] < self.window_samples:
            x = F.pad(x, (0, self.window_samples - x.shape[-1]))
        spec = torch.stft(
            x, self.n_fft, self.hop_length, self.win_length, self.window,
            center=True, pad_mode="reflect", return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()
        return torch.log10(self.log_multiplier * (self.mel_filters @ power) + 1.0)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(samples,) float waveform in [-1, 1] at 16 kHz -> (n_slices, 1, 96, 300) float32."""
        mel = self.log_mel(waveform)
        half = self.slice_frames // 2
        slices = torch.stack([mel[:, c - half : c + half] for c in self._centers(mel.shape[-1])])
        mean = slices.mean(dim=(1, 2), keepdim=True)
        std = slices.std(dim=(1, 2), correction=0, keepdim=True).clamp_min(self.std_floor)
        return ((slices - mean) / std).unsqueeze(1)

    def config(self) -> dict[str, Any]:
        """Every constant that shapes the slices."""
        return {
            "sample_rate": self.sample_rate,
            "amplitude_scale": self.amplitude_scale,
            "n_fft": self.n_fft,
            "win_length": self.win_length,
            "window": "hann_periodic",
            "hop_length": self.hop_length,
            "center": True,
            "pad_mode": "reflect",
            "power": 2.0,
            "n_mels": self.n_mels,
            "f_min": self.f_min,
            "f_max": self.f_max,
            "mel_scale": "htk",
            "mel_norm": "l2",
            "log": f"log10({self.log_multiplier:g} x + 1)",
            "slice_frames": self.slice_frames,
            "slice_hop": self.slice_hop,
            "std_floor": self.std_floor,
            "short_audio": "zero-pad to one slice",
        }


_NO_WEIGHTS = (
    "the MULE weights are not shipped with catalog-embed: they are licensed CC BY-NC 4.0 (non-commercial use "
    "only). Download model.keras from the SF-NFNet-F0 release of PandoraMedia/music-audio-representations on "
    "GitHub (https://github.com/PandoraMedia/music-audio-representations), check that its licence fits your use, "
    "and pass it with --weights PATH_OR_URI (or weights=... in Python)"
)


@dataclass
class MuleSfnfnetF0(Encoder):
    """MULE (SF-NFNet-F0) embeddings: 1728 values per 3 s slice, from weights the user supplies.

    Attributes:
        weights: the release's `model.keras`, its `model.weights.h5`, or a directory holding either or a
            converted `model.safetensors` + `config.json`; a local path or any fsspec URI.
        weights_sha256: when given, the sha256 that file must have (a converted directory: of its
            model.safetensors); a cached conversion of it is then used without reading `weights` again.
    """

    name: ClassVar[str] = "mule-sfnfnet-f0"
    description: ClassVar[str] = (
        "MULE SF-NFNet-F0 (McCallum et al. 2022), a contrastively trained general music representation; "
        "weights not shipped (CC BY-NC 4.0): pass --weights"
    )
    licence: ClassVar[Licence] = Licence(code="Apache-2.0", weights="CC-BY-NC-4.0")
    compilable: ClassVar[bool] = True

    weights: str | None = None
    weights_sha256: str | None = None
    _imported: keras_import.ImportedWeights | None = field(default=None, init=False, repr=False)
    _net: SfNfNetF0 | None = field(default=None, init=False, repr=False)

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The released embedding, its two halves, and pooled earlier slow-path stages."""
        return (
            LayerSpec("embedding", 1728, "gelu_s(concat(GAP slow, GAP fast)): the released MULE embedding"),
            LayerSpec("slow", 1536, "slow-path half of `embedding` (its first 1536 values)"),
            LayerSpec("fast", 192, "fast-path half of `embedding` (its last 192 values)"),
            LayerSpec("slow_stage1", 512, "mean over frequency and time of the slow path after stage 1 (raw)"),
            LayerSpec("slow_stage2", 1536, "mean over frequency and time of the slow path after stage 2 (raw)"),
        )

    @property
    def default_layer(self) -> str:
        """The released embedding."""
        return "embedding"

    def front_end(self) -> MuleFrontEnd:
        """A new MULE front end."""
        return MuleFrontEnd()

    def prepare(self) -> None:
        """Import and cache the weights (first use converts the Keras file; later uses read the cache).

        Raises:
            WeightsError: no weights were given, they cannot be read, or they do not match the pin.
        """
        if self._imported is not None:
            return
        if self.weights is None:
            raise WeightsError(_NO_WEIGHTS)
        self._imported = keras_import.import_weights(self.weights, state_shapes(), self.weights_sha256)

    @property
    def version(self) -> str:
        """First 16 hex digits of the sha256 of the release's model.weights.h5 (same for model.keras)."""
        return self._prepared(self._imported.weights_sha256[:16] if self._imported else None)

    @property
    def weights_path(self) -> Path:
        """The converted safetensors file; valid after `prepare()`."""
        if self._imported is None:
            msg = f"encoder {self.name!r} has no weights before prepare()"
            raise EncoderError(msg)
        return self._imported.safetensors

    def _build(self, device: torch.device) -> None:
        net = SfNfNetF0()
        net.load_state_dict(safetensors.torch.load_file(self.weights_path), strict=True)
        self._net = net.to(device).eval().freeze()

    def _compile_network(self) -> None:
        # One shape per call (see Encoder.compile): never trace for dynamic shapes.
        self._net = torch.compile(self._net, dynamic=False)

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        stage_taps = {"slow_stage1", "slow_stage2"}
        taps = tuple(sorted({name if name in stage_taps else "embedding" for name in layers}))
        out = self._net(windows.to(torch.float32), taps)
        split = _SLOW_WIDTHS[-1]
        result: dict[str, torch.Tensor] = {}
        for name in layers:
            if name in stage_taps:
                result[name] = out[name].mean(dim=(2, 3))
            elif name == "slow":
                result[name] = out["embedding"][:, :split]
            elif name == "fast":
                result[name] = out["embedding"][:, split:]
            else:
                result[name] = out["embedding"]
        return result


def write_standin_weights(directory: Path, seed: int = 0) -> str:
    """Write seeded random SF-NFNet-F0 weights (skip gains non-zero, so every block contributes) as a converted
    weights directory; returns its path. For measuring arithmetic (precision, speed) where the released weights
    are not at hand: the embeddings mean nothing."""
    torch.manual_seed(seed)
    net = SfNfNetF0()
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.endswith("skip_gain"):
                parameter.uniform_(0.1, 0.5)
    safetensors.torch.save_file(net.state_dict(), str(directory / keras_import.CONVERTED_WEIGHTS))
    config = {"encoder": keras_import.ENCODER, "weights_sha256": "0" * 64}
    (directory / keras_import.CONVERTED_CONFIG).write_text(json.dumps(config))
    return str(directory)
