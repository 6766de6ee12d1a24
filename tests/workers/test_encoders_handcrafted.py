"""The hand-crafted baseline encoders: shapes, versions, and chroma-stats telling keys apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders import encoder_names, get_encoder

SR = 22_050


def _triad(key: int) -> list[int]:
    """Pitch classes of the tonic triad of key `key` (0-11 major, 12-23 minor, tonic C = 0)."""
    root, third = key % 12, 4 if key < 12 else 3
    return [root, (root + third) % 12, (root + 7) % 12]


def _render(pitch_classes: list[int], octave: int, seed: int, seconds: float = 3.0) -> torch.Tensor:
    """A chord of harmonic tones with random partial amplitudes and phases, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    x = 0.05 * rng.normal(size=len(t))
    for pc in pitch_classes:
        f0 = 261.6255653 * 2 ** (pc / 12 + octave)
        for h in (1, 2, 3):
            x += rng.uniform(0.5, 1) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
    return torch.tensor(x / np.abs(x).max(), dtype=torch.float32)


@pytest.mark.parametrize(("name", "dim"), [("mfcc-stats", 120), ("chroma-stats", 72)])
def test_shapes_and_contract(name, dim):
    assert name in encoder_names()
    encoder = get_encoder(name)
    assert encoder.licence.code == "Apache-2.0" and encoder.licence.weights == "none"
    assert encoder.layer("stats").dim == dim and encoder.default_layer == "stats"
    encoder.load("cpu")
    front = encoder.front_end()
    windows = front(torch.randn(int(SR * 7.5)))
    assert windows.shape == (2, 3 * SR) and front.window_starts(int(SR * 7.5)) == [0.0, 3.0]
    assert front(torch.randn(1000)).shape == (1, 3 * SR)
    out = encoder.embed(windows)["stats"]
    assert out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert encoder.version == get_encoder(name).version
    assert encoder.version != get_encoder(name, sample_rate=16_000).version
    with pytest.raises(EncoderError, match="expects"):
        encoder.embed(torch.randn(2, 100))


def test_sample_rate_is_checked():
    with pytest.raises(EncoderError, match="16000 or 22050 Hz"):
        get_encoder("mfcc-stats", sample_rate=44_100)


def test_chroma_stats_separates_keys():
    encoder = get_encoder("chroma-stats")
    encoder.load("cpu")
    front = encoder.front_end()

    def embed(key: int, octave: int, seed: int) -> torch.Tensor:
        return encoder.embed(front(_render(_triad(key), octave, seed)))["stats"][0]

    reference = torch.stack([embed(k, -1, k) for k in range(24)])
    probe = torch.stack([embed(k, 0, 100 + k) for k in range(24)])
    # Another octave, other partial amplitudes and phases: still nearest to its own key among all 24.
    assert torch.equal(torch.cdist(probe, reference).argmin(dim=1), torch.arange(24))
    # The mean chroma (the first 12 dims) peaks on the triad's three pitch classes.
    for key in range(24):
        assert set(reference[key, :12].topk(3).indices.tolist()) == set(_triad(key))


def test_statistics_do_not_depend_on_the_other_windows_in_the_batch():
    for name in ("mfcc-stats", "chroma-stats"):
        encoder = get_encoder(name)
        encoder.load("cpu")
        n = encoder.front_end().window_samples
        rng = np.random.default_rng(0)
        quiet = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 1e-3)
        loud = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        alone = encoder.embed(quiet[None])["stats"]
        together = encoder.embed(torch.stack([quiet, loud]))["stats"][:1]
        torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)


def test_features_match_torchaudio_transforms():
    """The statistics encoders take the power spectrum their own way (`PowerSpectrogram`): the features are still
    torchaudio's MFCC and power STFT, to float rounding."""
    windows = torch.randn(3, 1, 3 * SR) * 0.1
    mfcc = get_encoder("mfcc-stats").feature_module()
    reference = torchaudio.transforms.MFCC(SR, 20, melkwargs={"n_fft": 2048, "hop_length": 512, "n_mels": 128})
    chroma = get_encoder("chroma-stats").feature_module()
    power = torchaudio.transforms.Spectrogram(n_fft=4096, hop_length=1024, power=2.0)
    with torch.inference_mode():
        torch.testing.assert_close(mfcc(windows), reference(windows), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(chroma[0](windows), power(windows), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chroma(windows), chroma[1](power(windows)), rtol=1e-5, atol=1e-6)
