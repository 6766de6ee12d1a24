"""Audio decoding: any fsspec URI -> mono float32 at the encoder's sample rate.

PyAV (FFmpeg) decodes mp3, Ogg Vorbis, Opus, FLAC, m4a/AAC, WAV and the rest of the containers in
`AUDIO_DEMUXERS`, reading only the bytes of the file it was given. Channels are downmixed by their mean (as librosa
and the musicnn reference do), averaged straight from the decoder's float planes. Resampling is soxr's HQ mode, what
librosa and so the musicnn reference use. Measured 44.1 kHz to 16 kHz (`tests/workers/test_audio.py`): on the
reference chord the output is bit-identical to the reference's (the deviation from soxr HQ is zero), passband tones
come out 133 dB above the error, and a tone above the new Nyquist frequency 143 dB down. torchaudio's Kaiser-best
sinc (64 zero crossings), used before, gave 1.3e-6 from the reference, 112 dB and -118 dB. On one core, 44.1 kHz
stereo mp3 and Vorbis decode and resample to 16 kHz about 1.6x as fast as before (`bench/decode_bench.py`): FFmpeg's
decoder itself is now most of the cost.

When the front end runs on the encoder's device, decoding stops at the file's own rate (`load_audio` with no
`sample_rate`) and `DeviceResampler` resamples there, batch after batch: soxr HQ's own filter, read off soxr once per
pair of rates and run as a strided convolution, so a track has the same samples (to float32 rounding), windows and
duration wherever it was resampled. torchaudio's resamplers differ from soxr HQ in the 7-8 kHz transition band,
which the encoders' mel filters reach: Kaiser-best moved musicnn's embeddings of demo tracks by up to 2.4e-3 in
cosine distance, more than bf16 does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import IO

import av
import av.logging
import fsspec
import numpy as np
import soxr
import torch

from catalog_embed.schemas.errors import AudioDecodeError, AudioTooLongError, AudioTooShortError, SourceReadError
from catalog_embed.workers.transient import configure_s3fs, retry_transient, storage_unavailable

configure_s3fs()  # here too: decode workers are processes of their own that import this module, not the store

# soxr's HQ recipe, librosa's default ("soxr_hq") and so the musicnn reference's.
_SOXR_QUALITY = "HQ"

SOXR_HQ = "soxr_hq"
"""The default resampler: soxr's HQ mode, after the channels are averaged."""
SWR = "swr"
"""FFmpeg's own resampler (libswresample at its defaults, as `ffmpeg -ar RATE` runs it), inside the decode loop:
for encoders whose original preprocessing was the FFmpeg command line (CLMR's)."""
RESAMPLERS = (SOXR_HQ, SWR)
CHANNEL_RULES = ("mean", "each")
"""How channels reach the front end: averaged to mono (the default), or each kept, (channels, samples)."""

# How far, in input samples per unit of `max(1, source/target rate)`, soxr HQ's filter reaches either side of an
# output sample: its taps beyond are below 1e-7 (measured from 8 to 96 kHz into 16 kHz, `soxr_polyphase`).
_SOXR_REACH = 110
# The most taps `DeviceResampler` holds for a pair of rates (16 MB in float32). 44.1 kHz to 16 kHz takes 0.17 M; a
# rate sharing almost no factor with the target (44,099 Hz: 16,000 phases) would take gigabytes, and is resampled by
# the decoder instead (`resamples_on_device`).
_MAX_DEVICE_TAPS = 2**22

# Demuxers that read nothing but the bytes they are given. FFmpeg does what a file says: a playlist (hls, dash), a
# list (concat), a session description (sdp, rtp, rtsp) or an image sequence (image2) opens other files, URLs or
# sockets, whatever the catalog's URI policy allows. Only these are probed past their header; "mov" also covers
# mp4/m4a and "matroska" webm/mka (FFmpeg matches any of a demuxer's names).
AUDIO_DEMUXERS = ("mp3", "ogg", "flac", "wav", "w64", "aiff", "caf", "mov", "aac", "matroska", "asf", "wv", "ape")
_CONTAINER_OPTIONS = {
    "format_whitelist": ",".join(AUDIO_DEMUXERS),
    # No protocol at all: the container reads our file object and can open nothing else, not even a local file.
    # (Opened from a path, FFmpeg would inherit the file protocol's short list; from a file object it allows all.)
    "protocol_whitelist": "",
    # Probe no further than the header: the decode loop reads the stream anyway. FFmpeg's default (5 MB) made
    # opening a WAV cost five times decoding it (1 s of 44.1 kHz stereo: 10 ms against 2). Checked: mp3, Ogg
    # Vorbis and Opus, FLAC, WAV, m4a, ADTS AAC, Matroska, AIFF, W64, CAF and ASF files decode to the same samples.
    "probesize": "32",
}
_NOT_ON_WHITELIST = "Format not on whitelist"

_TRUNCATION_TOLERANCE_S = 0.5
_TRUNCATION_TOLERANCE_SHARE = 0.02


@dataclass(frozen=True)
class DecodeConfig:
    """Limits and policy of the decode stage.

    Attributes:
        max_file_mb: files larger than this are refused before download (a failure row, not a dead worker).
        max_duration_s: decoding stops and the track fails past this duration (default 30 minutes, as MULE).
        min_duration_s: shorter audio fails as too short. Audio at least this long but shorter than one encoder
            window is zero-padded to one window by the front end (so a 2 s jingle still gets an embedding).
        max_memory_mb: memory a decode worker process may allocate beyond what it holds after start-up; a
            decoder that balloons on hostile input fails its track instead of taking the machine down.
    """

    max_file_mb: float = 512.0
    max_duration_s: float = 1800.0
    min_duration_s: float = 1.0
    max_memory_mb: float = 4096.0


@dataclass(frozen=True)
class Audio:
    """Decoded audio: mono, or one row per channel when decoded with `channels="each"`."""

    samples: np.ndarray  # (n,) float32, or (channels, n)
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    codec: str

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return self.samples.shape[-1] / self.sample_rate


def load_audio(
    uri: str,
    sample_rate: int | None,
    config: DecodeConfig = DecodeConfig(),
    channels: str = "mean",
    resampler: str = SOXR_HQ,
) -> Audio:
    """Read, decode, downmix and resample one file.

    Args:
        uri: any fsspec URI.
        sample_rate: the rate to resample to; None keeps the file's own rate (for resampling elsewhere).
        config: limits of the decode stage.
        channels: "mean" (mono) or "each" (one row per channel), see `CHANNEL_RULES`.
        resampler: `SOXR_HQ` or `SWR`.

    Raises:
        SourceReadError: the file is missing, unreadable or above `max_file_mb`.
        AudioDecodeError: the bytes hold no decodable audio stream, or a container that may reference others.
        AudioTooLongError / AudioTooShortError: outside the configured duration bounds.
        StorageUnavailableError: its store kept failing (throttled, unreachable, stalled) through the client's
            retries and ours: not the track's fault, so no failure of the track either; the run stops resumable.
    """
    # The client retries each request; a decoder whose read failed mid-stream has to start over, whole.
    return retry_transient(
        lambda: _load_audio(uri, sample_rate, config, channels, resampler), f"reading the audio file {uri}"
    )


def _load_audio(uri: str, sample_rate: int | None, config: DecodeConfig, channels: str, resampler: str) -> Audio:
    """`load_audio` once; a transient storage error passes through (see `catalog_embed.workers.transient`)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        size = fs.size(path)
    except FileNotFoundError as exc:
        msg = f"file not found: {uri}"
        raise SourceReadError(msg) from exc
    except OSError as exc:
        if storage_unavailable(exc):
            raise
        msg = f"cannot stat {uri}: {exc}"
        raise SourceReadError(msg) from exc
    if size is not None and size > config.max_file_mb * 2**20:
        msg = f"file is {size / 2**20:.1f} MB, above the {config.max_file_mb:g} MB cap (raise --max-file-mb)"
        raise SourceReadError(msg)
    if size == 0:
        msg = "file is empty (0 bytes)"
        raise AudioDecodeError(msg)
    try:
        with fs.open(path, "rb") as fh:
            audio = decode(fh, sample_rate, config, channels, resampler)
    except (AudioDecodeError, AudioTooLongError):
        raise
    except OSError as exc:
        if storage_unavailable(exc):
            raise
        msg = f"cannot read {uri}: {exc}"
        raise SourceReadError(msg) from exc
    if audio.duration_s < config.min_duration_s:
        msg = f"audio is {audio.duration_s:.2f} s, shorter than the {config.min_duration_s:g} s minimum"
        raise AudioTooShortError(msg)
    return audio


def decode(
    fh: IO[bytes],
    sample_rate: int | None,
    config: DecodeConfig = DecodeConfig(),
    channels: str = "mean",
    resampler: str = SOXR_HQ,
) -> Audio:
    """Decode the first audio stream of an open binary file to float32 at `sample_rate` (None: its own).

    Only the bytes of `fh` are read: containers that reference other resources are refused (`AUDIO_DEMUXERS`).
    Mono by the channels' mean unless `channels` is "each"; resampled by `resampler` (see `RESAMPLERS`).
    """
    with _open(fh) as container:
        if not container.streams.audio:
            msg = "the file has no audio stream"
            raise AudioDecodeError(msg)
        stream = container.streams.audio[0]
        source_rate = stream.codec_context.sample_rate or stream.rate
        if not source_rate:
            msg = f"corrupt audio stream ({stream.codec_context.name}): its header declares no sample rate"
            raise AudioDecodeError(msg)
        target_rate = sample_rate or source_rate
        # FFmpeg's resampler runs in the loop and counts samples at the target rate; soxr runs after it.
        loop_rate = target_rate if resampler == SWR else source_rate
        max_samples = int(config.max_duration_s * loop_rate) + 1
        # Normalise every sample format to planar float without touching the layout, nor the rate but for SWR
        # (most decoders already give planar float: then frames pass through untouched).
        to_float = av.AudioResampler(format="fltp", rate=loop_rate if resampler == SWR else None)
        capacity = min(_declared_samples(stream, loop_rate), max_samples)
        mono = _Downmix(capacity) if channels == "mean" else _Channels()
        try:
            for frame in itertools.chain(container.decode(stream), [None] if resampler == SWR else []):
                for converted in to_float.resample(frame):  # None flushes FFmpeg's resampler
                    mono.add(converted.planes, converted.samples)
                if mono.n_samples > max_samples:
                    msg = f"audio is longer than the {config.max_duration_s:g} s cap (raise --max-duration)"
                    raise AudioTooLongError(msg)
        except av.FFmpegError as exc:
            # A stream that breaks after some good frames is corrupt: embedding its prefix would silently
            # misrepresent the track, so it fails as a whole.
            msg = f"corrupt audio stream ({stream.codec_context.name}): {exc}"
            raise AudioDecodeError(msg) from exc
        if mono.n_samples == 0:
            msg = f"the {stream.codec_context.name} stream decoded to no samples (empty or truncated)"
            raise AudioDecodeError(msg)
        _check_complete(stream, mono.n_samples / loop_rate)
        return Audio(
            samples=resample(mono.samples(), loop_rate, target_rate),
            sample_rate=target_rate,
            source_sample_rate=source_rate,
            source_channels=stream.codec_context.channels,
            codec=stream.codec_context.name,
        )


class _Downmix:
    """Mono audio averaged from planar float frames into one buffer that grows by doubling.

    One numpy call per frame adds the channels where the decoder left them; the 1/channels scale is applied at the
    end, once per run of frames with the same channel count. Measured on a 44.1 kHz stereo mp3, this loop costs a
    fifth of what FFmpeg's decoding costs, against a third for a copy, an add and a scale per frame.
    """

    def __init__(self, capacity: int) -> None:
        self._buffer = np.empty(max(capacity, 1), np.float32)
        self._runs: list[tuple[int, int]] = []  # (first sample, channels) where the channel count changes
        self.n_samples = 0

    def add(self, planes: tuple, n: int) -> None:
        """Append one frame's `n` samples, given as one float32 plane per channel."""
        end = self.n_samples + n
        if end > len(self._buffer):
            grown = np.empty(max(end, 2 * len(self._buffer)), np.float32)
            grown[: self.n_samples] = self._buffer[: self.n_samples]
            self._buffer = grown
        out = self._buffer[self.n_samples : end]
        first = np.frombuffer(planes[0], np.float32, n)
        if len(planes) == 1:
            out[:] = first
        else:
            np.add(first, np.frombuffer(planes[1], np.float32, n), out=out)
            for plane in planes[2:]:
                out += np.frombuffer(plane, np.float32, n)
        if not self._runs or self._runs[-1][1] != len(planes):
            self._runs.append((self.n_samples, len(planes)))
        self.n_samples = end

    def samples(self) -> np.ndarray:
        """The mean of the channels, (n_samples,) float32."""
        samples = self._buffer[: self.n_samples]
        ends = [start for start, _ in self._runs[1:]] + [self.n_samples]
        for (start, channels), end in zip(self._runs, ends, strict=True):
            if channels > 1:
                samples[start:end] *= np.float32(1 / channels)
        return samples


class _Channels:
    """Planar float frames kept channel by channel: (channels, n_samples) at the end."""

    def __init__(self) -> None:
        self._frames: list[np.ndarray] = []
        self.n_samples = 0

    def add(self, planes: tuple, n: int) -> None:
        """Append one frame's `n` samples, given as one float32 plane per channel.

        Raises:
            AudioDecodeError: the channel count changed within the stream (no one channel to follow).
        """
        frame = np.stack([np.frombuffer(plane, np.float32, n) for plane in planes])
        if self._frames and len(frame) != len(self._frames[0]):
            msg = f"the stream changes from {len(self._frames[0])} to {len(frame)} channels: decode it to mono"
            raise AudioDecodeError(msg)
        self._frames.append(frame)
        self.n_samples += n

    def samples(self) -> np.ndarray:
        """(channels, n_samples) float32."""
        return np.concatenate(self._frames, axis=1)


def _declared_samples(stream: av.audio.stream.AudioStream, rate: int) -> int:
    """Samples the stream's header declares, plus a frame's worth; a minute's worth when it declares nothing."""
    if stream.duration and stream.time_base is not None:
        return int(stream.duration * stream.time_base * rate) + 8192
    return 60 * rate


def _open(fh: IO[bytes]) -> av.container.InputContainer:
    """Open `fh` as a container of an allowed demuxer, naming the demuxer FFmpeg detected when it is refused."""
    with _ffmpeg_errors_on():
        try:
            return av.open(fh, mode="r", metadata_errors="ignore", container_options=_CONTAINER_OPTIONS)
        except (av.FFmpegError, ValueError) as exc:
            # FFmpeg logs the refusal in the context of the detected demuxer: the log's name is the demuxer's.
            log = getattr(exc, "log", None)
            if log is not None and log[2].startswith(_NOT_ON_WHITELIST):
                msg = (
                    f"{log[1]!r} is not an allowed audio container ({', '.join(AUDIO_DEMUXERS)}): containers that "
                    "can make FFmpeg open other files or sockets (playlists, lists, session descriptions) are refused"
                )
            else:
                msg = f"not a readable media file: {exc}"
            raise AudioDecodeError(msg) from exc


@contextmanager
def _ffmpeg_errors_on() -> Iterator[None]:
    """Let PyAV attach FFmpeg's last error log to the errors raised while the block runs.

    PyAV keeps FFmpeg's log off by default, and errors then lack it. It is switched on, errors only, for the block;
    the logs themselves are captured and dropped, so nothing reaches Python's logging.
    """
    level = av.logging.get_level()
    if level is None:
        av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture():
            yield
    finally:
        av.logging.set_level(level)


def _check_complete(stream: av.audio.stream.AudioStream, decoded_s: float) -> None:
    """Fail a file that decodes to much less than its header declares: an interrupted download or copy.

    Only the stream's own declared duration counts (Xing/Info frames, STREAMINFO, a WAV data size), not FFmpeg's
    bitrate-based estimate, which is wrong for VBR files without a header. Encoder priming and padding differ
    by milliseconds, far below the tolerance.
    """
    if not stream.duration or stream.time_base is None:
        return
    declared_s = float(stream.duration * stream.time_base)
    if declared_s - decoded_s > max(_TRUNCATION_TOLERANCE_S, _TRUNCATION_TOLERANCE_SHARE * declared_s):
        msg = f"truncated: decoded {decoded_s:.2f} s of the {declared_s:.2f} s the file declares"
        raise AudioDecodeError(msg)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling of float32 audio, (n,) or (channels, n), with soxr's HQ mode (librosa's default)."""
    if source_rate == target_rate:
        return samples
    if samples.ndim == 2:  # soxr takes (frames, channels)
        return np.ascontiguousarray(soxr.resample(samples.T, source_rate, target_rate, quality=_SOXR_QUALITY).T)
    return soxr.resample(samples, source_rate, target_rate, quality=_SOXR_QUALITY)


def resampled_length(n_samples: int, source_rate: int, target_rate: int) -> int:
    """Samples that resampling `n_samples` from `source_rate` to `target_rate` gives: soxr's count, the nearest
    integer to the exact length with halves rounded up. `DeviceResampler` is cut or padded to it."""
    return (2 * n_samples * target_rate + source_rate) // (2 * source_rate)


def _polyphase_shape(source_rate: int, target_rate: int) -> tuple[int, int, int]:
    """(P, Q, reach) of `soxr_polyphase`: input and output samples per period, and the taps' reach either side."""
    g = math.gcd(source_rate, target_rate)
    reach = math.ceil(_SOXR_REACH * source_rate / min(source_rate, target_rate))
    return source_rate // g, target_rate // g, reach


def resamples_on_device(source_rate: int, target_rate: int) -> bool:
    """Whether `DeviceResampler` takes audio at `source_rate` to `target_rate`: when its taps stay small."""
    p, q, reach = _polyphase_shape(source_rate, target_rate)
    return q * (2 * reach + p) <= _MAX_DEVICE_TAPS


@lru_cache(maxsize=16)
def soxr_polyphase(source_rate: int, target_rate: int) -> tuple[np.ndarray, int, int]:
    """soxr HQ's resampling from `source_rate` to `target_rate` as the polyphase filter it amounts to.

    soxr is linear, and for rates whose reduced ratio is P:Q periodic: output sample `Q*m + r` is one fixed weighted
    sum of the input samples around `P*m`, whatever m. So resampling a unit impulse at each offset reads the taps
    off, once per pair of rates (0.01-0.1 s). Applied as a strided convolution these reproduce soxr's output to
    float32 rounding, except in soxr's own first few milliseconds for some rates (tests/workers/test_audio.py).

    Returns:
        taps: (Q, W) float32: output `Q*m + r` is `taps[r] @ x[P*m - left : P*m - left + W]`, zeros outside x.
        stride: P, input samples per Q output samples.
        left: input samples before `P*m` that the taps reach.
    """
    p, q, reach = _polyphase_shape(source_rate, target_rate)
    offsets = range(-reach, reach + p)
    block = math.ceil(2 * reach / p) + 1  # an output block whose every tap lies inside the probe signal
    probe = np.zeros(2 * block * p, np.float32)
    taps = np.empty((q, len(offsets)), np.float32)
    for column, offset in enumerate(offsets):
        probe[block * p + offset] = 1.0
        taps[:, column] = soxr.resample(probe, source_rate, target_rate, quality=_SOXR_QUALITY)[
            block * q : block * q + q
        ]
        probe[block * p + offset] = 0.0
    return taps, p, reach


class DeviceResampler:
    """Resamples mono float32 audio to `target_rate` on the device its input lies on (the encoder's GPU), as soxr HQ
    on the CPU does (`soxr_polyphase`), with the taps of each source rate moved to each device once. Only for the
    rates `resamples_on_device` accepts.

    The output has `resampled_length` samples, like soxr's. The convolution runs in IEEE float32, not TF32.
    """

    def __init__(self, target_rate: int) -> None:
        self.target_rate = target_rate
        self._taps: dict[tuple[int, torch.device], tuple[torch.Tensor, int, int]] = {}

    def __call__(self, waveform: torch.Tensor, source_rate: int) -> torch.Tensor:
        """`waveform` (samples,) float32 at `source_rate`, resampled to `target_rate` on its device."""
        if source_rate == self.target_rate:
            return waveform
        key = (source_rate, waveform.device)
        if key not in self._taps:
            taps, stride, left = soxr_polyphase(source_rate, self.target_rate)
            self._taps[key] = torch.from_numpy(taps).to(waveform.device)[:, None, :], stride, left
        taps, stride, left = self._taps[key]
        n_out, width = resampled_length(len(waveform), source_rate, self.target_rate), taps.shape[-1]
        per_block = taps.shape[0]
        blocks = -(-n_out // per_block)
        if blocks == 0:
            return waveform.new_zeros(0)
        right = max(0, (blocks - 1) * stride + width - left - len(waveform))
        padded = torch.nn.functional.pad(waveform[None, None], (left, right))
        # Every track has its own length: cuDNN's autotuner (on for the network's batches of one shape) would time
        # its algorithms for each one, and TF32 would keep 10 bits of the taps.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
            out = torch.nn.functional.conv1d(padded, taps, stride=stride)  # (1, Q, blocks): phase r of block m
        return out[0, :, :blocks].T.reshape(-1)[:n_out]
