"""The architecture of Jukebox's top level as JukeMIR uses it, as data: a 5B configuration and any smaller one.

The constants of `JUKEBOX_5B` are Jukebox's published hyperparameters (github.com/openai/jukebox at 08efbbc,
`jukebox/hparams.py`: `vqvae`, `labels`, `prior_5b`, and the defaults they inherit) and JukeMIR's extraction
settings (github.com/p-lambda/jukemir at 2415556, `representations/jukebox/main.py`). A configuration of the same
architecture with other numbers (tests build tiny ones) is the same code with other shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from catalog_embed.schemas.errors import WeightsError

ATTENTION_KINDS = ("row", "column", "previous_row")
"""Factored attention over the context seen as (blocks, block_ctx): within one's own block (causal), across blocks
at one's own offset (causal), and the whole previous block (Jukebox's attn_func 1, 2 and 3)."""


@dataclass(frozen=True)
class JukeboxConfig:
    """Every number the VQ-VAE's top-level encoder, the top-level prior and JukeMIR's conditioning depend on.

    Attributes:
        sample_rate: audio rate the VQ-VAE was trained at.
        downs_t: stride-2 downsamplings of each VQ-VAE level; the top level's encoder runs them all, so its hop is
            2 ** sum(downs_t).
        emb_width: width of the VQ-VAE's latent (and of its codebook's vectors).
        codebook_size: codes in the top level's codebook (the prior's vocabulary).
        vqvae_width: channels of the top-level encoder's convolutions.
        vqvae_depth: residual units per downsampling, with dilations growth ** 0, growth ** 1, ...
        dilation_growth: the dilation's growth rate between residual units.
        n_ctx: tokens the prior reads at once (JukeMIR's chunk).
        width: the prior's residual width.
        depth: transformer blocks of the released prior.
        heads: attention heads.
        attn_width: the attention's query/key/value width (Jukebox's m_attn x width).
        mlp_width: the MLP's hidden width (m_mlp x width).
        blocks: the factorisation of the context: `n_ctx / blocks` tokens per block.
        attention: kinds of attention of consecutive blocks, cycled (`ATTENTION_KINDS`; Jukebox's attn_order 2).
        genre_bins, artist_bins: the label conditioner's vocabularies.
        max_genres: genre slots of a label (a bag of words; empty slots are -1).
        time_bins: bins of each of the three timing embeddings.
        min_duration_s, max_duration_s: the timing embeddings' range of total lengths (and absolute positions).
        total_length_s: the total length JukeMIR states for every clip (it conditions as if on a 62 s song).
        encode_samples: audio the VQ-VAE reads per chunk (JukeMIR encodes the first 25 s and keeps the first
            `n_ctx` tokens, so the last tokens see the audio after them as the prior was trained to).
    """

    sample_rate: int = 44100
    downs_t: tuple[int, ...] = (3, 2, 2)
    emb_width: int = 64
    codebook_size: int = 2048
    vqvae_width: int = 32
    vqvae_depth: int = 4
    dilation_growth: int = 3
    n_ctx: int = 8192
    width: int = 4800
    depth: int = 72
    heads: int = 8
    attn_width: int = 1200
    mlp_width: int = 4800
    blocks: int = 128
    attention: tuple[str, ...] = ATTENTION_KINDS
    genre_bins: int = 120
    artist_bins: int = 4111
    max_genres: int = 5
    time_bins: int = 128
    min_duration_s: float = 60.0
    max_duration_s: float = 600.0
    total_length_s: float = 62.0
    encode_samples: int = 25 * 44100

    def __post_init__(self) -> None:
        problems = []
        if self.n_ctx % self.blocks:
            problems.append(f"n_ctx {self.n_ctx} is not a multiple of blocks {self.blocks}")
        if self.attn_width % self.heads:
            problems.append(f"attn_width {self.attn_width} is not a multiple of heads {self.heads}")
        if not self.attention or set(self.attention) - set(ATTENTION_KINDS):
            problems.append(f"attention must cycle kinds of {ATTENTION_KINDS}, got {self.attention}")
        if self.encode_samples < self.chunk_samples:
            problems.append(f"encode_samples {self.encode_samples} is under one chunk ({self.chunk_samples})")
        if not self.min_duration_s * self.sample_rate <= self.total_samples < self.max_duration_s * self.sample_rate:
            problems.append(f"total_length_s {self.total_length_s} is outside [min_duration_s, max_duration_s)")
        if problems:
            msg = f"not a Jukebox configuration: {'; '.join(problems)}"
            raise WeightsError(msg)

    @property
    def hop(self) -> int:
        """Audio samples per top-level token (128 for Jukebox)."""
        return 2 ** sum(self.downs_t)

    @property
    def chunk_samples(self) -> int:
        """Audio samples of one chunk of `n_ctx` tokens (1,048,576: 23.78 s for Jukebox)."""
        return self.n_ctx * self.hop

    @property
    def total_samples(self) -> int:
        """The total length the label states, in samples, a multiple of the hop (JukeMIR's `hps.sample_length`)."""
        return int(self.total_length_s * self.sample_rate) // self.hop * self.hop

    def attention_kind(self, block: int) -> str:
        """The attention of transformer block `block` (0-based)."""
        return self.attention[block % len(self.attention)]

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-ready data (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: object, source: str) -> JukeboxConfig:
        """A configuration from `to_json`'s form; fields left out keep Jukebox 5B's values.

        Raises:
            WeightsError: not an object, unknown fields, or numbers that do not make a Jukebox.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - set(fields):
            extra = sorted(set(data) - set(fields)) if isinstance(data, dict) else []
            msg = f"{source} is not a Jukebox configuration: {'unknown fields ' + ', '.join(extra) if extra else 'not an object'}"
            raise WeightsError(msg)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**values)
        except (TypeError, WeightsError) as exc:
            msg = f"{source} is not a Jukebox configuration: {str(exc).removeprefix('not a Jukebox configuration: ')}"
            raise WeightsError(msg) from exc


JUKEBOX_5B = JukeboxConfig()
"""Jukebox 5B's top level: the VQ-VAE of `hparams.vqvae` (levels 3, downs_t (3, 2, 2), strides 2, emb_width 64,
l_bins 2048, width 32 x multiplier 1 at the top, depth 4, dilation growth 3) and the prior of `hparams.prior_5b`
(n_ctx 8192, width 4800, depth 72, heads 8, attn_order 2, blocks 128, m_attn 0.25, m_mlp 1.0; labels y_bins
(120, 4111), t_bins 128, max_bow_genre_size 5, durations 60-600 s)."""
