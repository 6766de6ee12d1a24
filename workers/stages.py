"""The two compute stages of the embed job, shared by every runner.

`DecodeStage` (CPU: read, decode, resample, front end) turns a work item into windows or a failure.
`EmbedStage` (the encoder's device) embeds windows batched across tracks and pools them per track.
Both follow the stage contract: a frozen config, expensive state built once in `setup()`, no engine imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from schemas.errors import FrontEndError, TrackError
from schemas.manifest import WorkItem
from schemas import failpoints
from workers.audio import DecodeConfig, load_audio
from workers.encoders import Encoder, FrontEnd, get_encoder


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder, which outputs, where and how it runs.

    Attributes:
        model: registry name (see `catalog-embed models`).
        layers: layers to write; the first fills the `embedding` column, others `embedding_<layer>`. Empty means
            the encoder's default layer.
        device: 'cpu', 'cuda' or 'cuda:N'; asking for CUDA without a GPU is an error.
        batch_windows: windows per encoder call, assembled across tracks.
        weights: weights file or folder for encoders that do not fetch their own.
        weights_sha256: pin the weights; a mismatch is an error.
    """

    model: str = "musicnn-msd"
    layers: tuple[str, ...] = ()
    device: str = "cpu"
    batch_windows: int = 64
    weights: str | None = None
    weights_sha256: str | None = None

    def build(self) -> Encoder:
        """Construct the encoder (no weights loaded)."""
        options = {k: v for k, v in (("weights", self.weights), ("weights_sha256", self.weights_sha256)) if v}
        return get_encoder(self.model, **options)

    def resolved_layers(self, encoder: Encoder) -> tuple[str, ...]:
        """The layers to write, validated against the encoder (raises EncoderError naming valid ones)."""
        layers = self.layers or (encoder.default_layer,)
        for name in layers:
            encoder.layer(name)
        return layers


@dataclass
class TrackFeatures:
    """A decoded track's encoder input."""

    item: WorkItem
    windows: torch.Tensor  # (n_windows, *window_shape)
    starts: list[float]
    duration_s: float


@dataclass
class TrackFailure:
    """A track that could not be embedded, with the stage and reason."""

    item: WorkItem
    stage: str
    error_type: str
    message: str

    @classmethod
    def from_error(cls, item: WorkItem, error: BaseException, stage: str | None = None) -> TrackFailure:
        """Describe `error` raised while processing `item`."""
        return cls(
            item=item,
            stage=stage or getattr(error, "stage", "unknown"),
            error_type=type(error).__name__,
            message=str(error) or repr(error),
        )


@dataclass
class TrackEmbedding:
    """A track's pooled embeddings (one vector per requested layer) and optional timeline."""

    item: WorkItem
    duration_s: float
    n_windows: int
    pooled: dict[str, np.ndarray]  # layer -> (dim,) float32
    timeline: np.ndarray | None = None  # (n_windows, dim) of the first layer
    starts: list[float] = field(default_factory=list)


@dataclass
class DecodeStage:
    """Read, decode and window one track on the CPU."""

    encoder: EncoderConfig
    decode: DecodeConfig = DecodeConfig()
    _front_end: FrontEnd | None = field(default=None, init=False, repr=False)

    def setup(self) -> None:
        """Build the front end once per worker."""
        if self._front_end is None:
            self._front_end = self.encoder.build().front_end().eval()

    def __call__(self, item: WorkItem) -> TrackFeatures | TrackFailure:
        """Decode `item`; every per-track error becomes a TrackFailure, never an exception."""
        self.setup()
        front_end = self._front_end
        failpoints.hit("decode", item.uri)
        try:
            audio = load_audio(item.uri, front_end.sample_rate, self.decode)
        except TrackError as exc:
            return TrackFailure.from_error(item, exc)
        try:
            with torch.inference_mode():
                windows = front_end(torch.from_numpy(audio.samples))
            starts = front_end.window_starts(len(audio.samples))
        except (RuntimeError, ValueError) as exc:
            return TrackFailure.from_error(item, FrontEndError(f"front end failed: {exc}"))
        return TrackFeatures(item=item, windows=windows, starts=starts, duration_s=audio.duration_s)


@dataclass
class EmbedStage:
    """Embed windows batched across tracks and mean-pool them per track."""

    encoder: EncoderConfig
    keep_timeline: bool = False
    _model: Encoder | None = field(default=None, init=False, repr=False)
    _layers: tuple[str, ...] = field(default=(), init=False, repr=False)

    def setup(self) -> None:
        """Load the encoder once per worker on the configured device."""
        if self._model is None:
            model = self.encoder.build()
            self._layers = self.encoder.resolved_layers(model)
            model.load(self.encoder.device)
            self._model = model

    @property
    def model(self) -> Encoder:
        """The loaded encoder."""
        self.setup()
        return self._model

    def __call__(self, tracks: list[TrackFeatures]) -> list[TrackEmbedding]:
        """Embed every window of `tracks` in batches of `batch_windows`, then pool per track."""
        if not tracks:
            return []
        model = self.model
        windows = torch.cat([t.windows for t in tracks])
        outputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in self._layers}
        for start in range(0, len(windows), self.encoder.batch_windows):
            batch = model.embed(windows[start : start + self.encoder.batch_windows], self._layers)
            for layer, values in batch.items():
                outputs[layer].append(values.float().cpu())
        per_layer = {layer: torch.cat(chunks).numpy() for layer, chunks in outputs.items()}
        results = []
        offset = 0
        for track in tracks:
            n = len(track.windows)
            pooled = {layer: values[offset : offset + n].mean(axis=0) for layer, values in per_layer.items()}
            timeline = per_layer[self._layers[0]][offset : offset + n] if self.keep_timeline else None
            results.append(
                TrackEmbedding(
                    item=track.item,
                    duration_s=track.duration_s,
                    n_windows=n,
                    pooled=pooled,
                    timeline=timeline,
                    starts=track.starts,
                )
            )
            offset += n
        return results
