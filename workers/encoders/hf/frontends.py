"""Front ends of `hf:` checkpoints: the features a `transformers` feature extractor makes, in torch.

A feature extractor is NumPy on the host, one clip at a time. For the supported families the same features are
computed here with torch, batched over a track's windows, on whichever device the front end sits (the encoder's
with `--front-end-on encoder`); each is held to the extractor's own output within 1e-5 on real audio
(tests/workers/test_hf.py):

- wav2vec2 / HuBERT-style (`Wav2Vec2FeatureExtractor`): the raw window, zero-mean unit-variance per window when
  the extractor normalises (`do_normalize`).
- AST (`ASTFeatureExtractor`): Kaldi fbank (25 ms Hanning-windowed frames every 10 ms, DC removal,
  pre-emphasis 0.97, 512-point power spectrum, Kaldi mel banks from 20 Hz, natural log), then `(x - mean) / (2 std)`.
- Whisper (`WhisperFeatureExtractor`): centred 400-point STFT, slaney mel, log10, floored 8 below the window's
  maximum, `(x + 4) / 4`.
- CLAP (`ClapFeatureExtractor`): centred STFT power, the extractor's mel filters (htk for its "fusion"
  truncation, stacked four times as the extractor does; slaney otherwise), dB; in float64 as the extractor
  computes, so quiet bins agree too.

Anything else (another family, or an extractor setting these do not reproduce, such as Whisper's dither) runs the
extractor itself on the host (`ExtractorFeatures`), named in the front end's config and the encoder's description.

Windows: back to back, each `window_samples` long at the extractor's sampling rate; a trailing partial window is
dropped, and a track shorter than one window is zero-padded to one before its features are made (for every
encoder of this project alike). The extractor pads a short clip its own way (AST pads fbank frames, CLAP repeats
the clip, wav2vec2 does not pad); those short-clip rules are not reproduced.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
import torchaudio

from catalog_embed.workers.encoders.base import FrontEnd


class CheckpointFrontEnd(FrontEnd):
    """Cuts a waveform into the checkpoint's windows and makes each window's features with `features`.

    Args:
        sample_rate: the extractor's sampling rate.
        window_samples: samples per window.
        features: maps (n, window_samples) windows to the model's input, (n, ...).
        extractor_json: the extractor's serialised settings, whose hash keys the features.
    """

    def __init__(self, sample_rate: int, window_samples: int, features: torch.nn.Module, extractor_json: str) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self._window_samples = window_samples
        self.features = features
        self._extractor_sha256 = hashlib.sha256(extractor_json.encode()).hexdigest()

    @property
    def window_samples(self) -> int:
        """Samples per window."""
        return self._window_samples

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Map a (samples,) waveform to (n_windows, ...) model inputs, all windows of the track in one batch."""
        x = self.padded(waveform)
        n_windows = x.numel() // self._window_samples
        windows = x[: n_windows * self._window_samples].reshape(n_windows, self._window_samples)
        return self.features(windows).contiguous()

    def window_starts(self, n_samples: int) -> list[float]:
        """Start time in seconds of each window `forward` yields for a waveform of `n_samples`."""
        size = self._window_samples
        return [i * size / self.sample_rate for i in range(max(n_samples, size) // size)]

    def config(self) -> dict[str, Any]:
        """Every parameter that changes the windows: rate, length, which features, the extractor's settings."""
        return {
            "sample_rate": self.sample_rate,
            "window_samples": self._window_samples,
            "features": self.features.kind,
            "extractor_sha256": self._extractor_sha256,
        }


class ZeroMeanUnitVariance(torch.nn.Module):
    """wav2vec2-style input: the raw window, normalised per window as `Wav2Vec2FeatureExtractor` does when asked."""

    kind = "torch:waveform"

    def __init__(self, normalize: bool) -> None:
        super().__init__()
        self.normalize = normalize
        if normalize:
            self.kind = "torch:zero_mean_unit_var"

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> (n, samples)."""
        if not self.normalize:
            return windows
        # The extractor's rule: population variance plus 1e-7 under the root.
        mean = windows.mean(dim=1, keepdim=True)
        var = windows.var(dim=1, keepdim=True, correction=0)
        return (windows - mean) / torch.sqrt(var + 1e-7)


class KaldiFbank(torch.nn.Module):
    """AST's input: Kaldi-compatible log mel filterbank frames, normalised with the extractor's mean and std.

    The same computation as `torchaudio.compliance.kaldi.fbank` with the extractor's arguments, written for a batch
    of windows (that function takes one waveform).
    """

    kind = "torch:kaldi_fbank"
    PREEMPHASIS = 0.97

    def __init__(self, extractor: Any) -> None:
        super().__init__()
        rate = extractor.sampling_rate
        self.frame = int(rate * 0.025)  # Kaldi's default 25 ms frames every 10 ms
        self.shift = int(rate * 0.010)
        self.n_fft = 1 << (self.frame - 1).bit_length()  # Kaldi rounds the FFT up to a power of two
        self.max_length = extractor.max_length
        self.do_normalize = extractor.do_normalize
        self.mean, self.std = float(extractor.mean), float(extractor.std)
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
            extractor.num_mel_bins, self.n_fft, float(rate), 20.0, 0.0, 100.0, -500.0, 1.0
        )
        # The banks cover n_fft / 2 bins; the Nyquist bin gets weight 0, as in Kaldi.
        banks = torch.nn.functional.pad(banks.float(), (0, 1))
        self.register_buffer("banks", banks, persistent=False)
        self.register_buffer("window", torch.hann_window(self.frame, periodic=False), persistent=False)

    def window_samples(self) -> int:
        """Samples that make exactly `max_length` frames."""
        return self.frame + (self.max_length - 1) * self.shift

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> (n, max_length, num_mel_bins)."""
        frames = windows.unfold(1, self.frame, self.shift)  # (n, frames, frame)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - self.PREEMPHASIS * previous) * self.window
        power = torch.fft.rfft(frames, n=self.n_fft).abs().pow(2)
        fbank = (power @ self.banks.T).clamp_min(torch.finfo(torch.float32).eps).log()
        fbank = fbank[:, : self.max_length]
        if fbank.shape[1] < self.max_length:  # the extractor zero-pads missing frames
            fbank = torch.nn.functional.pad(fbank, (0, 0, 0, self.max_length - fbank.shape[1]))
        if self.do_normalize:
            fbank = (fbank - self.mean) / (self.std * 2)
        return fbank


class WhisperLogMel(torch.nn.Module):
    """Whisper's input: log10 mel spectrogram floored at 8 below each window's maximum, scaled to about [-1, 1]."""

    kind = "torch:whisper_log_mel"

    def __init__(self, extractor: Any) -> None:
        super().__init__()
        self.n_fft, self.hop = extractor.n_fft, extractor.hop_length
        self.register_buffer("filters", torch.from_numpy(np.asarray(extractor.mel_filters, np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> (n, n_mels, samples / hop)."""
        stft = torch.stft(windows, self.n_fft, self.hop, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2  # the last frame is dropped, as Whisper does
        log_mel = (self.filters.T @ power).clamp_min(1e-10).log10()
        floor = log_mel.amax(dim=(1, 2), keepdim=True) - 8.0
        return (torch.maximum(log_mel, floor) + 4.0) / 4.0


class ClapLogMel(torch.nn.Module):
    """CLAP's input: the dB mel spectrogram of a whole window, (n, channels, frames, n_mels)."""

    kind = "torch:clap_mel"

    def __init__(self, extractor: Any) -> None:
        super().__init__()
        self.n_fft, self.hop = extractor.fft_window_size, extractor.hop_length
        fusion = extractor.truncation == "fusion"
        # A window of exactly the model's length is neither padded nor cut: "fusion" stacks its mel four times
        # (htk filters), "rand_trunc" gives it once (slaney filters).
        self.channels = 4 if fusion else 1
        filters = extractor.mel_filters if fusion else extractor.mel_filters_slaney
        self.register_buffer("filters", torch.from_numpy(np.asarray(filters, np.float64)), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft, dtype=torch.float64), persistent=False)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> (n, channels, frames, n_mels)."""
        stft = torch.stft(windows.double(), self.n_fft, self.hop, window=self.window, return_complex=True)
        # The extractor keeps the spectrum in complex64 before taking its power in float64: round the same way.
        power = stft.to(torch.complex64).to(torch.complex128).abs() ** 2
        mel = (self.filters.T @ power).clamp_min(1e-10)
        db = (10.0 * torch.log10(mel)).float().transpose(1, 2)  # (n, frames, n_mels)
        return db.unsqueeze(1).expand(-1, self.channels, -1, -1)


class ExtractorFeatures(torch.nn.Module):
    """The fallback: the checkpoint's own feature extractor, on the host, for a batch of windows."""

    def __init__(self, extractor: Any, input_name: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.input_name = input_name
        self.kind = f"extractor:{type(extractor).__name__}"

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> the extractor's `input_name` output for those windows, on the windows' device."""
        clips = list(windows.detach().cpu().numpy())
        out = self.extractor(clips, sampling_rate=self.extractor.sampling_rate, return_tensors="np")
        return torch.from_numpy(np.asarray(out[self.input_name], np.float32)).to(windows.device)
