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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import av
import av.logging
import fsspec
import numpy as np
import soxr

from schemas.errors import AudioDecodeError, AudioTooLongError, AudioTooShortError, SourceReadError

# soxr's HQ recipe, librosa's default ("soxr_hq") and so the musicnn reference's.
_SOXR_QUALITY = "HQ"

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
    """Decoded mono audio."""

    samples: np.ndarray  # (n,) float32
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    codec: str

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return len(self.samples) / self.sample_rate


def load_audio(uri: str, sample_rate: int | None, config: DecodeConfig = DecodeConfig()) -> Audio:
    """Read, decode, downmix and resample one file.

    Args:
        uri: any fsspec URI.
        sample_rate: the rate to resample to; None keeps the file's own rate (for resampling elsewhere).
        config: limits of the decode stage.

    Raises:
        SourceReadError: the file is missing, unreadable or above `max_file_mb`.
        AudioDecodeError: the bytes hold no decodable audio stream, or a container that may reference others.
        AudioTooLongError / AudioTooShortError: outside the configured duration bounds.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        size = fs.size(path)
    except FileNotFoundError as exc:
        msg = f"file not found: {uri}"
        raise SourceReadError(msg) from exc
    except OSError as exc:
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
            audio = decode(fh, sample_rate, config)
    except (AudioDecodeError, AudioTooLongError):
        raise
    except OSError as exc:
        msg = f"cannot read {uri}: {exc}"
        raise SourceReadError(msg) from exc
    if audio.duration_s < config.min_duration_s:
        msg = f"audio is {audio.duration_s:.2f} s, shorter than the {config.min_duration_s:g} s minimum"
        raise AudioTooShortError(msg)
    return audio


def decode(fh: IO[bytes], sample_rate: int | None, config: DecodeConfig = DecodeConfig()) -> Audio:
    """Decode the first audio stream of an open binary file to mono float32 at `sample_rate` (None: its own).

    Only the bytes of `fh` are read: containers that reference other resources are refused (`AUDIO_DEMUXERS`).
    """
    with _open(fh) as container:
        if not container.streams.audio:
            msg = "the file has no audio stream"
            raise AudioDecodeError(msg)
        stream = container.streams.audio[0]
        source_rate = stream.codec_context.sample_rate or stream.rate
        if not source_rate:
            msg = "the audio stream declares no sample rate"
            raise AudioDecodeError(msg)
        max_samples = int(config.max_duration_s * source_rate) + 1
        # Normalise every sample format to planar float without touching rate or layout (most decoders already
        # give planar float: then frames pass through untouched).
        to_float = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        n_samples = 0
        try:
            for frame in container.decode(stream):
                for converted in to_float.resample(frame):
                    # Averaging the planes where they lie costs a third of what to_ndarray() and mean() cost per frame.
                    n = converted.samples
                    planes = converted.planes
                    total = np.frombuffer(planes[0], np.float32, n).copy()
                    for plane in planes[1:]:
                        total += np.frombuffer(plane, np.float32, n)
                    if len(planes) > 1:
                        total *= np.float32(1 / len(planes))
                    chunks.append(total)
                    n_samples += n
                if n_samples > max_samples:
                    msg = f"audio is longer than the {config.max_duration_s:g} s cap (raise --max-duration)"
                    raise AudioTooLongError(msg)
        except av.FFmpegError as exc:
            # A stream that breaks after some good frames is corrupt: embedding its prefix would silently
            # misrepresent the track, so it fails as a whole.
            msg = f"corrupt audio stream ({stream.codec_context.name}): {exc}"
            raise AudioDecodeError(msg) from exc
        if n_samples == 0:
            msg = f"the {stream.codec_context.name} stream decoded to no samples (empty or truncated)"
            raise AudioDecodeError(msg)
        _check_complete(stream, n_samples / source_rate)
        mono = np.concatenate(chunks)
        target_rate = sample_rate or source_rate
        return Audio(
            samples=resample(mono, source_rate, target_rate),
            sample_rate=target_rate,
            source_sample_rate=source_rate,
            source_channels=stream.codec_context.channels,
            codec=stream.codec_context.name,
        )


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
    """Band-limited resampling of mono float32 audio with soxr's HQ mode (librosa's default)."""
    if source_rate == target_rate:
        return samples
    return soxr.resample(samples, source_rate, target_rate, quality=_SOXR_QUALITY)
