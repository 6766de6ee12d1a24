"""A small but complete HEAR 2021 API module, the `hear:` encoder's test subject (`hear:tests.helpers.hear_module`).

The real HEAR modules on PyPI do not install here (`hearbaseline` pins numpy 1.19 and needs TensorFlow), so this
module follows the API as the HEAR 2021 rules state it, with a real network: a log-mel spectrogram (25 ms Hann
frames every 10 ms, centred on their timestamps) projected by a linear layer and tanh to 24 values per timestamp.
The scene embedding is the mean and the maximum over time of those (48 values), so the two layers the encoder
reads differ in what they hold and in width. Weights come from a fixed seed, or from a safetensors file given to
`load_model`.
"""

from __future__ import annotations

import torch
import torchaudio
from safetensors.torch import load_file

SAMPLE_RATE = 16_000
FRAME = 400  # 25 ms
HOP = 160  # 10 ms: timestamps every 10 ms, within HEAR's 50 ms suggestion
N_MELS = 32
WIDTH = 24


class TinyMelProjection(torch.nn.Module):
    """Log-mel frames projected to `WIDTH` values per timestamp; the attributes are the ones HEAR requires."""

    sample_rate = SAMPLE_RATE
    timestamp_embedding_size = WIDTH
    scene_embedding_size = 2 * WIDTH

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(FRAME))
        fbanks = torchaudio.functional.melscale_fbanks(FRAME // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE)
        self.register_buffer("fbanks", fbanks)
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.nn.Linear(N_MELS, WIDTH)
        with torch.no_grad():
            self.projection.weight.copy_(torch.randn(WIDTH, N_MELS, generator=generator) / N_MELS**0.5)
            self.projection.bias.copy_(torch.randn(WIDTH, generator=generator) * 0.1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(..., FRAME) audio frames -> (..., WIDTH) embeddings."""
        power = torch.fft.rfft(frames * self.window).abs() ** 2
        return torch.tanh(self.projection(torch.log(power @ self.fbanks + 1e-6)))


def load_model(model_file_path: str = "") -> torch.nn.Module:
    """The model: seeded weights, or the safetensors state dict at `model_file_path`."""
    model = TinyMelProjection()
    if model_file_path:
        model.load_state_dict(load_file(model_file_path))
    return model


def get_timestamp_embeddings(audio: torch.Tensor, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_samples) -> embeddings (n_sounds, n_timestamps, WIDTH) and their timestamps in ms."""
    if audio.ndim != 2:
        msg = f"audio must be (n_sounds, n_samples), got {tuple(audio.shape)}"
        raise ValueError(msg)
    padded = torch.nn.functional.pad(audio, (FRAME // 2, FRAME // 2))
    frames = padded.unfold(1, FRAME, HOP)
    embeddings = model.to(audio.device)(frames)
    times = torch.arange(frames.shape[1], device=audio.device) * (HOP * 1000 / SAMPLE_RATE)
    return embeddings, times.expand(len(audio), -1)


def get_scene_embeddings(audio: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """(n_sounds, n_samples) -> (n_sounds, 2 * WIDTH): mean and maximum of the timestamp embeddings over time."""
    embeddings, _ = get_timestamp_embeddings(audio, model)
    return torch.cat([embeddings.mean(dim=1), embeddings.amax(dim=1)], dim=1)
