"""`HFEncoder`: any `transformers` audio checkpoint as an encoder (`--model hf:<repo-id or local path>[@revision]`).

Families (told apart by the checkpoint's feature extractor and model type) and what each gives:

| family   | checkpoints                                  | window                                   | default layer |
|----------|----------------------------------------------|------------------------------------------|---------------|
| wav2vec2 | wav2vec2, HuBERT, WavLM, data2vec-audio, MERT | `window_s` (default 10 s), configurable  | hidden_N      |
| ast      | Audio Spectrogram Transformer                | the extractor's `max_length` frames      | pooled        |
| whisper  | Whisper (the encoder only)                   | the extractor's `chunk_length` (30 s)    | hidden_N      |
| clap     | CLAP (the audio tower and its projection)    | the extractor's `max_length_s` (10 s)    | pooled        |
| other    | any other checkpoint with an audio extractor | `window_s` (default 10 s)                | hidden_N      |

Layers: `hidden_0` .. `hidden_N` are the model's hidden states (`output_hidden_states`: `hidden_0` the input to
the first transformer layer, `hidden_N` the last one's output; for CLAP the stages of its Swin tower, whose width
grows per stage), `pooled` the model's pooled output where it has one (AST: the mean of its CLS and distillation
tokens; CLAP: `audio_embeds`, the projected and L2-normalised embedding ClapModel compares with text). A window's
embedding of a hidden state is its mean over time (over every token: CLAP's and AST's tokens are patches of the
spectrogram); the track's embedding is the mean of its windows' (the pipeline's pooling).

Version: `<revision>-<weights>`: the first 12 hex digits of the snapshot's commit ('local' for a folder) and 16 of
the sha256 over the weight files (`checkpoint.weights_digest`). Licence: the model card's `license:`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence
from catalog_embed.workers.encoders.hf.checkpoint import (
    CheckpointRef,
    card_licence,
    resolve_folder,
    weight_files,
    weights_digest,
)
from catalog_embed.workers.encoders.hf.frontends import (
    CheckpointFrontEnd,
    ClapLogMel,
    ExtractorFeatures,
    KaldiFbank,
    WhisperLogMel,
    ZeroMeanUnitVariance,
)

DEFAULT_WINDOW_S = 10.0
"""Window of the families whose model takes any length (wav2vec2-style, other): long enough for musical context,
short enough that attention over it stays cheap (10 s at 16 kHz is 499 wav2vec2 frames)."""

POOLED = "pooled"
_REMOTE_CODE_HINT = "it ships its own Python code: read it, then pass --trust-remote-code to run it"


def _hidden(i: int) -> str:
    return f"hidden_{i}"


class Family(ABC):
    """How one family of checkpoints is windowed, featurised, loaded and read out."""

    name: ClassVar[str]
    input_name: ClassVar[str]
    fixed_window: ClassVar[bool] = True
    """Whether the model fixes the window (`window_s` is then refused)."""
    pooled_default: ClassVar[bool] = False
    """Whether the pooled output is the default layer (else the last hidden state)."""

    def __init__(self, config: Any, extractor: Any) -> None:
        self.config = config
        self.extractor = extractor

    @abstractmethod
    def window_samples(self, window_s: float | None) -> int:
        """Samples per window at the extractor's rate."""

    @abstractmethod
    def hidden_dims(self) -> list[int]:
        """Width of each hidden state, `hidden_0` first."""

    def pooled_dim(self) -> int | None:
        """Width of the pooled output; None where the model has none."""
        return None

    @property
    def default_layer(self) -> str:
        """The layer used when none is asked for."""
        return POOLED if self.pooled_default else _hidden(len(self.hidden_dims()) - 1)

    def features(self) -> torch.nn.Module:
        """The torch front end matching the extractor, or the extractor itself where torch does not reproduce it."""
        return ExtractorFeatures(self.extractor, self.input_name)

    def load(self, folder: Path, trust_remote_code: bool) -> torch.nn.Module:
        """The network, in float32, in eval mode, on the CPU."""
        from transformers import AutoModel  # transformers only once a network is built

        return AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=torch.float32)

    def run(self, network: torch.nn.Module, inputs: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """The hidden states and the pooled output (None where there is none) for a batch of inputs."""
        out = network(**{self.input_name: inputs}, output_hidden_states=True)
        return tuple(out.hidden_states), getattr(out, "pooler_output", None)


class _Sequence(Family):
    """Families whose hidden states are `hidden_size` wide, one per layer plus the embeddings."""

    def hidden_dims(self) -> list[int]:
        """`hidden_size` for the embeddings and each of `num_hidden_layers`."""
        size, layers = getattr(self.config, "hidden_size", None), getattr(self.config, "num_hidden_layers", None)
        if not isinstance(size, int) or not isinstance(layers, int):
            msg = (
                f"model type {self.config.model_type!r} does not state hidden_size and num_hidden_layers, so its "
                "layers are unknown: hf: takes wav2vec2/HuBERT-style, AST, Whisper, CLAP and similar checkpoints"
            )
            raise EncoderError(msg)
        return [size] * (layers + 1)


class Wav2Vec2Family(_Sequence):
    """wav2vec2 / HuBERT-style encoders: raw waveform in (`input_values`)."""

    name = "wav2vec2"
    input_name = "input_values"
    fixed_window = False

    def window_samples(self, window_s: float | None) -> int:
        """`window_s` (default `DEFAULT_WINDOW_S`) at the extractor's rate."""
        return round((window_s or DEFAULT_WINDOW_S) * self.extractor.sampling_rate)

    def features(self) -> torch.nn.Module:
        """Zero-mean unit-variance per window when the extractor normalises, else the raw window."""
        return ZeroMeanUnitVariance(bool(self.extractor.do_normalize))


class OtherFamily(_Sequence):
    """Any other audio checkpoint: its extractor on the host, its hidden states read out."""

    name = "other"
    fixed_window = False

    def __init__(self, config: Any, extractor: Any) -> None:
        super().__init__(config, extractor)
        self.input_name = extractor.model_input_names[0]

    def window_samples(self, window_s: float | None) -> int:
        """`window_s` (default `DEFAULT_WINDOW_S`) at the extractor's rate."""
        return round((window_s or DEFAULT_WINDOW_S) * self.extractor.sampling_rate)


class AstFamily(_Sequence):
    """Audio Spectrogram Transformer: Kaldi fbank frames in (`input_values`), `max_length` of them."""

    name = "ast"
    input_name = "input_values"
    pooled_default = True  # what AST's classifier reads

    def window_samples(self, window_s: float | None) -> int:
        """The samples giving exactly the extractor's `max_length` frames."""
        return KaldiFbank(self.extractor).window_samples()

    def pooled_dim(self) -> int:
        """The mean of the CLS and distillation tokens: `hidden_size`."""
        return self.config.hidden_size

    def features(self) -> torch.nn.Module:
        """Kaldi fbank in torch."""
        return KaldiFbank(self.extractor)


class WhisperFamily(Family):
    """Whisper's encoder: log-mel in (`input_features`), always `chunk_length` seconds (30 s)."""

    name = "whisper"
    input_name = "input_features"

    def window_samples(self, window_s: float | None) -> int:
        """The extractor's `n_samples`, which must match the encoder's positions (Whisper takes no other length)."""
        positions = self.config.max_source_positions
        if self.extractor.nb_max_frames != 2 * positions:
            msg = (
                f"the checkpoint's extractor makes {self.extractor.nb_max_frames} frames per window but its encoder "
                f"takes {2 * positions}: the checkpoint's preprocessor_config.json does not fit its model"
            )
            raise EncoderError(msg)
        return self.extractor.n_samples

    def hidden_dims(self) -> list[int]:
        """`d_model` for the embeddings and each encoder layer (the last after the final layer norm)."""
        return [self.config.d_model] * (self.config.encoder_layers + 1)

    def features(self) -> torch.nn.Module:
        """Whisper's log-mel in torch; the extractor itself when it dithers (random noise is not reproducible)."""
        if self.extractor.dither:
            return super().features()
        return WhisperLogMel(self.extractor)

    def load(self, folder: Path, trust_remote_code: bool) -> torch.nn.Module:
        """The encoder alone: the decoder is dropped once loaded."""
        return super().load(folder, trust_remote_code).get_encoder()


class ClapFamily(Family):
    """CLAP's audio tower: mel in (`input_features`), `max_length_s` seconds at 48 kHz."""

    name = "clap"
    input_name = "input_features"
    pooled_default = True  # `audio_embeds`: the space CLAP's text tower shares

    def window_samples(self, window_s: float | None) -> int:
        """The extractor's `nb_max_samples`."""
        return self.extractor.nb_max_samples

    def hidden_dims(self) -> list[int]:
        """The patch embedding's width, then each Swin stage's (doubling after each but the last)."""
        audio = self.config.audio_config
        stages = len(audio.depths)
        width = audio.patch_embeds_hidden_size
        return [width] + [width * 2 ** min(i + 1, stages - 1) for i in range(stages)]

    def pooled_dim(self) -> int:
        """The projection's width."""
        return self.config.projection_dim

    def features(self) -> torch.nn.Module:
        """CLAP's mel in torch."""
        return ClapLogMel(self.extractor)

    def load(self, folder: Path, trust_remote_code: bool) -> torch.nn.Module:
        """The audio tower and its projection, without the text tower."""
        from transformers import ClapAudioModelWithProjection

        with _quiet_tower_load():
            return ClapAudioModelWithProjection.from_pretrained(folder, dtype=torch.float32)

    def load_text(self, folder: Path) -> torch.nn.Module:
        """The text tower and its projection, without the audio tower (`text_embeds`, not yet normalised)."""
        from transformers import ClapTextModelWithProjection

        with _quiet_tower_load():
            return ClapTextModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()

    def run(self, network: torch.nn.Module, inputs: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Hidden states (channels first: (n, C, H, W)) and the normalised `audio_embeds`."""
        # A window is never longer than the model's length, so fusion's "longer" branch never applies.
        is_longer = torch.zeros(len(inputs), 1, dtype=torch.bool, device=inputs.device)
        out = network(input_features=inputs, is_longer=is_longer, output_hidden_states=True)
        return tuple(out.hidden_states), torch.nn.functional.normalize(out.audio_embeds, dim=-1)


@contextmanager
def _quiet_tower_load() -> Iterator[None]:
    """Silence transformers' loading report and progress bar for one load of one CLAP tower.

    Loading one side of a ClapModel checkpoint reports every weight of the other tower as unexpected: it is left
    out on purpose. The bar is dropped too: `similar --text` prints its answer, not a loader's progress.
    """
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def family_of(config: Any, extractor: Any) -> Family:
    """The family of a checkpoint from its config and feature extractor."""
    kind = type(extractor).__name__
    if kind == "ClapFeatureExtractor" and config.model_type == "clap":
        return ClapFamily(config, extractor)
    if kind == "ASTFeatureExtractor" and config.model_type == "audio-spectrogram-transformer":
        return AstFamily(config, extractor)
    if kind == "WhisperFeatureExtractor" and config.model_type == "whisper":
        return WhisperFamily(config, extractor)
    if kind == "Wav2Vec2FeatureExtractor":
        return Wav2Vec2Family(config, extractor)
    return OtherFamily(config, extractor)


@dataclass
class HFEncoder(Encoder):
    """A `transformers` audio checkpoint; see the module docstring for families, layers and windows.

    Args:
        checkpoint: the name after `hf:`: a hub repository id or a local folder, with an optional `@revision`.
        trust_remote_code: run Python code the checkpoint ships (never the default).
        window_s: window length in seconds for families whose model takes any length (wav2vec2-style, other).
    """

    checkpoint: str = ""
    trust_remote_code: bool = False
    window_s: float | None = None
    _ref: CheckpointRef = field(init=False, repr=False)
    _folder: Path | None = field(default=None, init=False, repr=False)
    _family: Family | None = field(default=None, init=False, repr=False)
    _version: str | None = field(default=None, init=False, repr=False)
    _window_samples: int = field(default=0, init=False, repr=False)
    _network: torch.nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._ref = CheckpointRef.parse(self.checkpoint)
        self.name = self._ref.name
        if self.window_s is not None and not self.window_s > 0:
            msg = f"--window-s must be positive, got {self.window_s}"
            raise EncoderError(msg)
        code = "checkpoint's own code: see the model card" if self.trust_remote_code else "Apache-2.0 (transformers)"
        self.licence = Licence(code=code, weights="unresolved: run prepare()")
        self.description = f"transformers checkpoint {self._ref.source}"

    def _resolved(self) -> Family:
        """Resolve the checkpoint (config and extractor, no weights read) once; every check before any audio."""
        if self._family is not None:
            return self._family
        from transformers import AutoConfig, AutoFeatureExtractor
        from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor

        folder, revision = resolve_folder(self._ref)
        where = f"{self.name}"
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(load_problem(where, "its config.json", exc)) from None
        try:
            extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            if "trust_remote_code" in str(exc):
                raise EncoderError(load_problem(where, "its feature extractor", exc)) from None
            extractor = None
        if not isinstance(extractor, SequenceFeatureExtractor) or not getattr(extractor, "sampling_rate", None):
            msg = (
                f"{where} (model type {config.model_type!r}) has no audio feature extractor "
                "(preprocessor_config.json with a sampling_rate): hf: takes audio checkpoints such as wav2vec2, "
                "HuBERT, MERT, AST, CLAP or Whisper"
            )
            raise EncoderError(msg)
        family = family_of(config, extractor)
        if family.fixed_window and self.window_s is not None:
            msg = f"{where}: a {family.name} checkpoint fixes its own window; drop --window-s"
            raise EncoderError(msg)
        if not weight_files(folder):
            msg = f"{where}: {folder} holds no weights (*.safetensors or *.bin): download the whole checkpoint"
            raise EncoderError(msg)
        family.hidden_dims()  # a model type whose layers are unknown fails here, not on the first batch
        self._window_samples = family.window_samples(self.window_s)
        self._folder, self._family = folder, family
        self._version = f"{revision[:12]}-{weights_digest(folder)[:16]}"
        self.licence = Licence(code=self.licence.code, weights=card_licence(folder))
        self.description = (
            f"transformers {family.name} checkpoint {self._ref.source}, "
            f"{self._window_samples / extractor.sampling_rate:g} s windows at {extractor.sampling_rate} Hz, "
            f"front end {family.features().kind}"
        )
        return family

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """`hidden_0` .. `hidden_N`, then `pooled` where the model has a pooled output."""
        family = self._resolved()
        specs = [LayerSpec(_hidden(i), dim, f"hidden state {i}, mean over time") for i, dim in
                 enumerate(family.hidden_dims())]
        if (pooled := family.pooled_dim()) is not None:
            specs.append(LayerSpec(POOLED, pooled, "the model's pooled output"))
        return tuple(specs)

    @property
    def family(self) -> Family:
        """The checkpoint's family, resolving the checkpoint (no weights read)."""
        return self._resolved()

    @property
    def folder(self) -> Path:
        """The local folder holding the checkpoint, resolving it (no weights read)."""
        self._resolved()
        return self._folder

    @property
    def default_layer(self) -> str:
        """Per family: see the module docstring."""
        return self._resolved().default_layer

    def front_end(self) -> FrontEnd:
        """Windows of the checkpoint's length, featurised in torch (or by the extractor: see `frontends`)."""
        family = self._resolved()
        extractor_json = json.dumps(family.extractor.to_dict(), sort_keys=True, default=str)
        return CheckpointFrontEnd(
            family.extractor.sampling_rate, self._window_samples, family.features(), extractor_json
        )

    def prepare(self) -> None:
        """Resolve the checkpoint: fetched into the hub cache on first use, then offline."""
        self._resolved()

    @property
    def version(self) -> str:
        """`<revision>-<weights sha256>`: see the module docstring."""
        return self._prepared(self._version)

    def _build(self, device: torch.device) -> None:
        family = self._resolved()
        try:
            network = family.load(self._folder, self.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise EncoderError(load_problem(self.name, "its weights", exc)) from None
        self._network = network.eval().to(device)

    def _forward(self, windows: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        hidden, pooled = self._family.run(self._network, windows)
        outputs = {}
        for name in layers:
            if name == POOLED:
                outputs[name] = pooled
            else:
                state = hidden[int(name.removeprefix("hidden_"))]
                # (n, time, dim) for sequence models; (n, channels, freq, time) for CLAP's Swin stages.
                outputs[name] = state.mean(dim=(2, 3)) if state.dim() == 4 else state.mean(dim=1)
        return outputs


def load_problem(where: str, what: str, exc: BaseException) -> str:
    """One line saying why `transformers` could not load part (`what`) of checkpoint `where`, and what to do."""
    text = str(exc)
    if "trust_remote_code" in text:
        return f"{where}: {_REMOTE_CODE_HINT}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{where}: transformers could not load {what} ({first}): check the checkpoint folder or repository id"
