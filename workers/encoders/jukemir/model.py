"""Jukebox's top level as a feature extractor: the VQ-VAE's top-level encoder and codebook, and the top-level prior
run only as deep as the deepest layer asked for.

Written from Jukebox's published architecture (github.com/openai/jukebox at 08efbbc: module structure, state-dict
names, constants), not from its code; tests/workers/test_jukemir.py holds it to a reference implementation's
activations. Submodules are named so that state-dict keys follow the release's (see `checkpoint.release_key`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from catalog_embed.workers.encoders.jukemir.config import JukeboxConfig

# --- VQ-VAE: the top level's encoder and codebook ----------------------------------------------------------------


class ResidualUnit(nn.Module):
    """ReLU, dilated 3-tap convolution, ReLU, 1x1 convolution, added to the input."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=dilation, dilation=dilation),
            nn.ReLU(),
            nn.Conv1d(width, width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, width, t) -> (n, width, t)."""
        return x + self.model(x)


class DilatedStack(nn.Module):
    """`depth` residual units with dilations growth ** 0, growth ** 1, ..."""

    def __init__(self, width: int, depth: int, growth: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*(ResidualUnit(width, growth**d) for d in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, width, t) -> (n, width, t)."""
        return self.model(x)


class LevelBlock(nn.Module):
    """`downs` times (a kernel-4 stride-2 convolution halving the length, a dilated stack), then a 3-tap
    convolution to the latent width."""

    def __init__(self, in_channels: int, downs: int, config: JukeboxConfig) -> None:
        super().__init__()
        width = config.vqvae_width
        stages: list[nn.Module] = [
            nn.Sequential(
                nn.Conv1d(in_channels if i == 0 else width, width, 4, stride=2, padding=1),
                DilatedStack(width, config.vqvae_depth, config.dilation_growth),
            )
            for i in range(downs)
        ]
        self.model = nn.Sequential(*stages, nn.Conv1d(width, config.emb_width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, in_channels, t) -> (n, emb_width, t / 2 ** downs)."""
        return self.model(x)


class TopLevelEncoder(nn.Module):
    """Audio to the VQ-VAE's top-level codes: its encoder (every level's downsampling, from raw audio) and the
    nearest vector of its codebook."""

    def __init__(self, config: JukeboxConfig) -> None:
        super().__init__()
        self.level_blocks = nn.ModuleList(
            LevelBlock(1 if level == 0 else config.emb_width, downs, config) for level, downs in enumerate(config.downs_t)
        )
        self.register_buffer("codebook", torch.zeros(config.codebook_size, config.emb_width))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(n, samples) float audio in [-1, 1] -> (n, samples / hop) long codes.

        Always float32, also under autocast: a code is an argmin, and reduced precision would flip near ties.
        """
        with torch.autocast(audio.device.type, enabled=False):
            x = audio.float().unsqueeze(1)
            for block in self.level_blocks:
                x = block(x)
            latents = x.transpose(1, 2).reshape(-1, x.shape[1])
            # Squared distances expanded as Jukebox computes them, so that near ties resolve the same way.
            codebook = self.codebook.float()
            distance = (
                latents.pow(2).sum(-1, keepdim=True) - 2 * latents @ codebook.t() + codebook.pow(2).sum(-1)[None]
            )
            return distance.argmin(-1).view(x.shape[0], x.shape[2])


# --- the top-level prior -------------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """Jukebox's position-wise linear map: `x @ w + b`, `w` stored (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n_in, n_out))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_in) -> (..., n_out)."""
        return torch.matmul(x, self.w) + self.b


class FactoredAttention(nn.Module):
    """One block's self-attention, restricted by `kind` (`ATTENTION_KINDS`) over the context as (blocks, block_ctx).

    The previous-row kind sees the whole previous block without a mask; the first block, which has none, sees zeros
    (its attention is uniform over zero values), as in Jukebox.
    """

    def __init__(self, config: JukeboxConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.heads = config.heads
        self.block_ctx = config.n_ctx // config.blocks
        self.c_attn = Conv1D(config.width, 3 * config.attn_width)
        self.c_proj = Conv1D(config.attn_width, config.width)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """(b, l, d) queries, keys, values -> (b, l, d), in `heads` heads, scaled by 1 / sqrt(d / heads)."""
        b, lq, d = q.shape
        split = lambda x: x.view(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
        return out.transpose(1, 2).reshape(b, lq, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, n_ctx, width) -> (n, n_ctx, width)."""
        n, length, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        d, bc = q.shape[-1], self.block_ctx
        rows = length // bc
        if self.kind == "row":
            a = self._attend(*(t.reshape(n * rows, bc, d) for t in (q, k, v)), causal=True)
        elif self.kind == "column":
            columns = [t.reshape(n, rows, bc, d).transpose(1, 2).reshape(n * bc, rows, d) for t in (q, k, v)]
            a = self._attend(*columns, causal=True).view(n, bc, rows, d).transpose(1, 2)
        else:
            shifted = [F.pad(t.reshape(n, rows, bc, d)[:, :-1], (0, 0, 0, 0, 1, 0)).reshape(n * rows, bc, d) for t in (k, v)]
            a = self._attend(q.reshape(n * rows, bc, d), *shifted, causal=False)
        return self.c_proj(a.reshape(n, length, d))


class Mlp(nn.Module):
    """Linear, quick GELU (x * sigmoid(1.702 x)), linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(width, hidden)
        self.c_proj = Conv1D(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., width) -> (..., width)."""
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))


class TransformerBlock(nn.Module):
    """Jukebox's residual block: `a = attn(ln_0(x))`, `m = mlp(ln_1(x + a))`, out `x + a + m`."""

    def __init__(self, config: JukeboxConfig, kind: str) -> None:
        super().__init__()
        self.ln_0 = nn.LayerNorm(config.width)
        self.attn = FactoredAttention(config, kind)
        self.ln_1 = nn.LayerNorm(config.width)
        self.mlp = Mlp(config.width, config.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, n_ctx, width) -> (n, n_ctx, width)."""
        a = self.attn(self.ln_0(x))
        m = self.mlp(self.ln_1(x + a))
        return x + a + m


class LabelConditioner(nn.Module):
    """The prior's label and timing embeddings, for the one label JukeMIR gives every clip.

    JukeMIR states artist "unknown" and genre "unknown" (id 0 in Jukebox's v2 id lists; the other four genre slots
    empty), a total length of `total_length_s`, offset 0, and a clip of one chunk. The artist and genre embeddings
    sum to the start token; the timing embeddings (total length; absolute position and position relative to the
    total, each interpolated over the chunk's tokens and binned) sum to a per-token signal.
    """

    def __init__(self, config: JukeboxConfig) -> None:
        super().__init__()
        self.config = config
        self.bow_genre_emb = nn.Embedding(config.genre_bins, config.width)
        self.artist_emb = nn.Embedding(config.artist_bins, config.width)
        self.total_length_emb = nn.Embedding(config.time_bins, config.width)
        self.absolute_pos_emb = nn.Embedding(config.time_bins, config.width)
        self.relative_pos_emb = nn.Embedding(config.time_bins, config.width)

    def time_bins(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bins of the total length (1,), absolute (n_ctx,) and relative (n_ctx,) positions.

        Float32 arithmetic in Jukebox's order (interpolate, normalise to the range, scale, floor), so that positions
        on a bin's edge fall on the same side.
        """
        c = self.config
        sr, bins = c.sample_rate, c.time_bins
        total = torch.tensor([float(c.total_samples)], device=device)
        start, end = torch.zeros(1, device=device), torch.full((1,), float(c.chunk_samples), device=device)
        interpolation = torch.arange(c.n_ctx, dtype=torch.float32, device=device) / c.n_ctx

        def binned(position: torch.Tensor, low: float, high: float) -> torch.Tensor:
            return (bins * ((position - low) / (high - low))).floor().long()

        absolute = start + (end - start) * interpolation
        relative_start, relative_end = start / total, (end / total).clamp(0.0, 1.0)
        relative = relative_start + (relative_end - relative_start) * interpolation
        return (
            binned(total, c.min_duration_s * sr, c.max_duration_s * sr),
            binned(absolute, 0.0, c.max_duration_s * sr),
            binned(relative, 0.0, 1.0),
        )

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The start token (width,) and the timing signal (n_ctx, width)."""
        device = self.artist_emb.weight.device
        start = self.artist_emb.weight[0] + self.bow_genre_emb.weight[0]
        total, absolute, relative = self.time_bins(device)
        timing = self.total_length_emb(total) + self.absolute_pos_emb(absolute) + self.relative_pos_emb(relative)
        return start, timing


class Prior(nn.Module):
    """The top-level prior's transformer up to `depth` blocks, on JukeMIR's input.

    Its input is the codes' embeddings shifted right by one, the start token in front, plus a learned position
    embedding and the timing signal; its output at block L is the residual stream after L blocks (JukeMIR builds
    the prior with `prior_depth = L` and reads the transformer's output).
    """

    def __init__(self, config: JukeboxConfig, depth: int) -> None:
        super().__init__()
        self.x_emb = nn.Embedding(config.codebook_size, config.width)
        self.pos_emb = nn.Parameter(torch.zeros(config.n_ctx, config.width))
        self.blocks = nn.ModuleList(TransformerBlock(config, config.attention_kind(d)) for d in range(depth))

    def forward(self, codes: torch.Tensor, start: torch.Tensor, timing: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """(n, n_ctx) codes -> each requested block's (1-based) output averaged over the tokens, (n, width) float32."""
        x = self.x_emb(codes)
        x = torch.cat([start.expand(x.shape[0], 1, -1).to(x.dtype), x[:, :-1]], dim=1)
        x = x + self.pos_emb + timing
        out: dict[int, torch.Tensor] = {}
        for depth, block in enumerate(self.blocks[: max(layers)], start=1):
            x = block(x)
            if depth in layers:
                out[depth] = x.float().mean(dim=1)
        return out


class JukeboxFeatures(nn.Module):
    """Audio chunks to the prior's activations: VQ-VAE codes, then the prior to the deepest requested layer."""

    def __init__(self, config: JukeboxConfig, depth: int) -> None:
        super().__init__()
        self.config = config
        self.vqvae = TopLevelEncoder(config)
        self.labels = LabelConditioner(config)
        self.prior = Prior(config, depth)

    def forward(self, audio: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """(n, encode_samples) audio -> {layer: (n, width)}: the first `n_ctx` codes' activations, mean-pooled."""
        codes = self.vqvae(audio)[:, : self.config.n_ctx]
        start, timing = self.labels()
        return self.prior(codes, start, timing, layers)


def parameter_count(config: JukeboxConfig, depth: int) -> int:
    """Parameters of `JukeboxFeatures(config, depth)`, counted without allocating them."""
    with torch.device("meta"):
        network = JukeboxFeatures(config, depth)
    return sum(p.numel() for p in network.parameters()) + network.vqvae.codebook.numel()


def memory_bytes(config: JukeboxConfig, depth: int, bytes_per_parameter: int) -> int:
    """About the memory one chunk needs run to `depth`: the parameters, and the widest float32 activations alive at
    once (the residual stream and a block's input, attention and MLP outputs; queries, keys and values; the MLP's
    hidden layer; the VQ-VAE's first convolution over the audio)."""
    activations = config.n_ctx * (4 * config.width + 3 * config.attn_width + config.mlp_width) * 4
    audio = config.encode_samples * config.vqvae_width * 4 * 2
    return parameter_count(config, depth) * bytes_per_parameter + activations + audio
