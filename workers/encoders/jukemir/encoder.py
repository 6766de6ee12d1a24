"""`jukemir-5b`: JukeMIR's representation (Castellon, Donahue & Liang 2021), Jukebox 5B's top-level prior as a
feature extractor.

As JukeMIR extracts it (github.com/p-lambda/jukemir at 2415556, `representations/jukebox/main.py`): the audio at
44.1 kHz, channels averaged, scaled so that its peak is 1; the VQ-VAE's top-level codes of the first 25 s, of
which the first 8,192 (23.78 s, the prior's context) are kept; the top-level prior, conditioned on artist and genre
"unknown", a 62 s total length and offset 0, run to layer L (36 by default) of 72; the layer's output averaged over
the 8,192 tokens. JukeMIR embeds only a track's first 23.78 s; here every whole 23.78 s chunk is one window
(see `JukemirFrontEnd`) and a track's embedding is their mean, so a track shorter than 47.56 s gets JukeMIR's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import safetensors
import safetensors.torch
import torch

from catalog_embed.schemas.errors import EncoderError, WeightsError
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence, resolve_device
from catalog_embed.workers.encoders.jukemir.checkpoint import (
    CONFIG_FILE,
    PRIOR_FILE,
    VQVAE_FILE,
    ImportedWeights,
    folder_config,
    import_folder,
)
from catalog_embed.workers.encoders.jukemir.config import JUKEBOX_5B, JukeboxConfig
from catalog_embed.workers.encoders.jukemir.model import JukeboxFeatures, TransformerBlock, memory_bytes

ENCODER = "jukemir-5b"
DEFAULT_LAYER = 36
"""JukeMIR's layer: the middle of the 72 blocks, which probed best in the paper."""

CPU_LIMIT_BYTES = 2 << 30
"""Above this much memory the encoder refuses the CPU: Jukebox 5B to layer 36 would take ~11 GB and hours per track
there. Tiny configurations stay below it."""
CPU_OVERRIDE_ENV = "CATALOG_EMBED_JUKEMIR_ON_CPU"
"""Set to 1 to run a configuration above `CPU_LIMIT_BYTES` on the CPU anyway."""

_NO_WEIGHTS = (
    "the Jukebox weights are not shipped with catalog-embed (gigabytes; OpenAI's Noncommercial Use License): "
    f"download {VQVAE_FILE} and {PRIOR_FILE} from https://openaipublic.azureedge.net/jukebox/models/5b/ into one "
    "folder, check that the licence fits your use, and pass the folder with --weights PATH_OR_URI"
)


class JukemirFrontEnd(FrontEnd):
    """JukeMIR's input: peak-normalised 44.1 kHz mono audio, in chunks of the prior's context.

    The track is scaled so that its peak is 1 (silence stays silence), as JukeMIR does before anything else.
    Window i starts at i x 23.78 s (`chunk_samples`) and holds `encode_samples` (25 s): the chunk and the 1.22 s
    after it, which JukeMIR gives the VQ-VAE so that the chunk's last codes see what follows them; past the track's
    end it is zero-padded. A tail shorter than a chunk is dropped; a track shorter than one chunk is zero-padded
    to one window (JukeMIR refuses such a track).
    """

    def __init__(self, config: JukeboxConfig) -> None:
        super().__init__()
        self.jukebox = config
        self.sample_rate = config.sample_rate

    @property
    def window_samples(self) -> int:
        """Samples the VQ-VAE reads per window (25 s)."""
        return self.jukebox.encode_samples

    def _n_windows(self, n_samples: int) -> int:
        return max(n_samples // self.jukebox.chunk_samples, 1)

    def window_starts(self, n_samples: int) -> list[float]:
        """Start (s) of each chunk."""
        return [i * self.jukebox.chunk_samples / self.sample_rate for i in range(self._n_windows(n_samples))]

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(samples,) waveform at 44.1 kHz -> (n_windows, encode_samples) float32."""
        waveform = self.padded(waveform)
        peak = waveform.abs().max()
        if peak > 0:
            waveform = waveform / peak
        n = self._n_windows(waveform.numel())
        hop, size = self.jukebox.chunk_samples, self.jukebox.encode_samples
        waveform = torch.nn.functional.pad(waveform, (0, max((n - 1) * hop + size - waveform.numel(), 0)))
        return waveform.unfold(0, size, hop)[:n].contiguous()

    def config(self) -> dict[str, Any]:
        """Every constant that shapes the windows."""
        return {
            "sample_rate": self.sample_rate,
            "normalisation": "peak of the track scaled to 1",
            "hop_samples": self.jukebox.chunk_samples,
            "window_samples": self.jukebox.encode_samples,
            "tail": "dropped when shorter than a chunk; the lookahead past the end zero-padded",
            "short_audio": "zero-pad to one window",
            "channels": self.channels,
            "resampler": self.resampler,
        }


@dataclass
class JukemirEncoder(Encoder):
    """The mean over a chunk's tokens of the top-level prior's layer L, per 23.78 s chunk.

    Attributes:
        weights: a folder holding Jukebox's `vqvae.pth.tar` and `prior_level_2.pth.tar` (see
            `catalog_embed.workers.encoders.jukemir.checkpoint`); a local path or any fsspec URI.
        weights_sha256: not taken: a folder has no single digest (the cache is keyed by its files' sha256).
    """

    name: ClassVar[str] = ENCODER
    description: ClassVar[str] = (
        "JukeMIR (Castellon et al. 2021): Jukebox 5B's top-level prior, layer 36 of 72 by default, mean over 23.78 s "
        "chunks of 44.1 kHz audio; weights not shipped: pass --weights FOLDER; a GPU (bf16/fp16) needed"
    )
    licence: ClassVar[Licence] = Licence(code="Apache-2.0", weights="Jukebox Noncommercial Use License (OpenAI)")

    weights: str | None = None
    weights_sha256: str | None = None
    _config: JukeboxConfig | None = field(default=None, init=False, repr=False)
    _imported: ImportedWeights | None = field(default=None, init=False, repr=False)
    _net: JukeboxFeatures | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.weights_sha256 is not None:
            msg = f"{ENCODER} takes a weights folder, which has no single sha256: drop --weights-sha256"
            raise EncoderError(msg)

    @property
    def config(self) -> JukeboxConfig:
        """The architecture: the weights folder's `jukemir-config.json`, else Jukebox 5B."""
        if self._config is None:
            self._config = folder_config(self.weights) if self.weights else JUKEBOX_5B
        return self._config

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """`layer1` ... `layer72`: the residual stream after that many of the prior's blocks, mean over tokens."""
        return tuple(
            LayerSpec(f"layer{i}", self.config.width, f"the prior's block {i} of {self.config.depth}, mean over tokens")
            for i in range(1, self.config.depth + 1)
        )

    @property
    def default_layer(self) -> str:
        """JukeMIR's layer 36 (the last block of a configuration with fewer)."""
        return f"layer{min(DEFAULT_LAYER, self.config.depth)}"

    def layer(self, name: str) -> LayerSpec:
        """The spec of `name`; a one-line EncoderError naming the range otherwise."""
        depth = self.config.depth
        index = name.removeprefix("layer")
        if not (name.startswith("layer") and index.isdigit() and 1 <= int(index) <= depth):
            msg = f"encoder {self.name!r} has no layer {name!r}: choose layer1 .. layer{depth} (the prior's blocks)"
            raise EncoderError(msg)
        return self.layers[int(index) - 1]

    def front_end(self) -> JukemirFrontEnd:
        """A new front end for this configuration."""
        return JukemirFrontEnd(self.config)

    def prepare(self) -> None:
        """Import and cache the folder's checkpoints (first use converts them; later uses read the cache).

        Raises:
            WeightsError: no folder given, or its files are missing, unreadable or not Jukebox's.
        """
        if self._imported is not None:
            return
        if self.weights is None:
            raise WeightsError(_NO_WEIGHTS)
        self._imported = import_folder(self.weights)
        self._config = self._imported.config

    @property
    def version(self) -> str:
        """First 16 hex digits of the sha256 of the kept state dict."""
        return self._prepared(self._imported.weights_sha256[:16] if self._imported else None)

    def load(self, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        """As `Encoder.load`, refusing first, before any weights are read, a configuration too large for a CPU.

        Raises:
            EncoderError: see `Encoder.load`; or on a CPU, a network needing more than `CPU_LIMIT_BYTES` (the
                message states how much) unless `CATALOG_EMBED_JUKEMIR_ON_CPU=1`.
        """
        if resolve_device(device).type == "cpu" and os.environ.get(CPU_OVERRIDE_ENV, "") != "1":
            depth = int(self.default_layer.removeprefix("layer"))
            needed = memory_bytes(self.config, depth, 4)
            if needed > CPU_LIMIT_BYTES:
                msg = (
                    f"{self.name} to layer {depth} needs about {needed / 2**30:.1f} GiB of memory in fp32 "
                    f"({memory_bytes(self.config, depth, 2) / 2**30:.1f} GiB in bf16) and hours per track on a CPU: "
                    f"run it with --device cuda --precision bf16, or set {CPU_OVERRIDE_ENV}=1 to run it here anyway"
                )
                raise EncoderError(msg)
        super().load(device, precision)

    def _build(self, device: torch.device) -> None:
        if self._imported is None:
            msg = f"encoder {self.name!r} has no weights before prepare()"
            raise EncoderError(msg)
        net = JukeboxFeatures(self.config, depth=0)
        with safetensors.safe_open(str(self._imported.path), framework="pt") as st:
            net.load_state_dict({key: st.get_tensor(key) for key in net.state_dict()}, strict=True)
        self._net = net.to(device).eval()
        self._deepen(int(self.default_layer.removeprefix("layer")))

    def _deepen(self, depth: int) -> None:
        """Load the prior's blocks up to `depth` that are not loaded yet (only blocks a layer asked for are read).

        In reduced precision the blocks' linear weights are kept in that dtype (half the memory); autocast runs the
        matrix products in it either way, and layer norms stay in float32.
        """
        blocks = self._net.prior.blocks
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.inference_mode(False), safetensors.safe_open(str(self._imported.path), framework="pt") as st:
            for d in range(len(blocks), depth):
                block = TransformerBlock(self.config, self.config.attention_kind(d))
                prefix = f"prior.blocks.{d}."
                block.load_state_dict({key: st.get_tensor(prefix + key) for key in block.state_dict()}, strict=True)
                if dtype is not None:
                    for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                        module.to(dtype)
                blocks.append(block.to(self._net.vqvae.codebook.device).eval())

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        depths = {name: int(name.removeprefix("layer")) for name in layers}
        self._deepen(max(depths.values()))
        out = self._net(windows.to(torch.float32), tuple(sorted(set(depths.values()))))
        return {name: out[depth] for name, depth in depths.items()}


__all__ = ["CONFIG_FILE", "ENCODER", "JukemirEncoder", "JukemirFrontEnd"]
