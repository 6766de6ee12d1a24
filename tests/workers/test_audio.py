"""Decoding real files in every codec, downmix, resampling quality, caps, and every kind of bad file."""

from __future__ import annotations

import io
import socket
import subprocess
import sys

import av
import numpy as np
import pytest
import soxr
import torch

from catalog_embed.schemas.errors import AudioDecodeError, AudioTooLongError, AudioTooShortError, SourceReadError
from catalog_embed.workers.audio import (
    DecodeConfig,
    DeviceResampler,
    _Downmix,
    decode,
    load_audio,
    resample,
    resampled_length,
    resamples_on_device,
)
from tests.helpers.reference import MUSICNN_REFERENCE


def test_every_codec_decodes_to_mono_float32_at_the_requested_rate(small_catalog, small_labels):
    good = [label for label in small_labels if label["broken"] is None]
    assert {label["codec"] for label in good} == {"mp3", "ogg", "opus", "flac", "m4a", "wav"}
    for label in good:
        audio = load_audio(str(small_catalog.root / "audio" / f"{label['track_id']}.{label['codec']}"), 16_000)
        assert audio.samples.dtype == np.float32
        assert audio.samples.ndim == 1
        assert audio.sample_rate == 16_000
        assert abs(audio.duration_s - 4.0) < 0.05, label
        assert 0.05 < np.abs(audio.samples).max() <= 1.0, label


@pytest.mark.parametrize(
    ("kind", "error", "needle"),
    [
        ("truncated", AudioDecodeError, "truncated|corrupt audio stream"),
        ("empty", AudioDecodeError, "empty"),
        ("not_audio", AudioDecodeError, "not a readable media file"),
        ("corrupt_header", AudioDecodeError, "corrupt audio stream|not a readable media file"),
        ("missing", SourceReadError, "not found"),
    ],
)
def test_broken_files_raise_named_errors(small_catalog, small_labels, kind, error, needle):
    broken = [label for label in small_labels if label["broken"] == kind]
    assert broken
    for label in broken:
        with pytest.raises(error, match=needle):
            load_audio(str(small_catalog.root / "audio" / f"{label['track_id']}.{label['codec']}"), 16_000)


def test_truncated_mp3_is_detected_from_its_declared_duration(small_catalog, small_labels):
    label = next(la for la in small_labels if la["broken"] == "truncated" and la["codec"] == "mp3")
    with pytest.raises(AudioDecodeError, match="truncated: decoded"):
        load_audio(str(small_catalog.root / "audio" / f"{label['track_id']}.mp3"), 16_000)


def test_stereo_is_downmixed_by_mean_and_matches_the_reference_loader():
    ref = np.load(f"{MUSICNN_REFERENCE}/chord_44k1_stereo__MSD_musicnn.npz")
    audio = load_audio(f"{MUSICNN_REFERENCE}/chord_44k1_stereo.wav", 16_000)
    assert audio.source_channels == 2
    assert audio.source_sample_rate == 44_100
    # librosa's load (mean downmix, soxr HQ resampling) is the reference; ours does the same, so only float
    # rounding may differ (measured: bit-identical; torchaudio's Kaiser-best sinc deviated by 1.4e-6).
    assert audio.samples.shape == ref["audio"].shape
    assert np.abs(audio.samples - ref["audio"]).max() < 1e-7


def test_native_rate_decoding_skips_resampling_and_averages_the_channels():
    path = f"{MUSICNN_REFERENCE}/chord_44k1_stereo.wav"
    with av.open(path) as container:
        to_float = av.AudioResampler(format="fltp")
        frames = [out.to_ndarray() for frame in container.decode(audio=0) for out in to_float.resample(frame)]
    channels = np.concatenate(frames, axis=1)
    audio = load_audio(path, None)
    assert audio.sample_rate == audio.source_sample_rate == 44_100
    np.testing.assert_array_equal(audio.samples, channels.mean(axis=0, dtype=np.float32))


def test_the_downmix_grows_past_its_estimate_and_follows_channel_count_changes():
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((channels, 1152)).astype(np.float32) for channels in (2, 2, 1, 6, 2)]
    downmix = _Downmix(capacity=1)  # a header that declared far too little: the buffer grows
    for frame in frames:
        downmix.add(tuple(plane.tobytes() for plane in frame), frame.shape[1])
    expected = np.concatenate([frame.mean(axis=0, dtype=np.float32) for frame in frames])
    np.testing.assert_allclose(downmix.samples(), expected, rtol=1e-6, atol=1e-7)


def _tones(rate: int, freqs: tuple[tuple[float, float], ...], seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return sum(amplitude * np.sin(2 * np.pi * f * t) for f, amplitude in freqs).astype(np.float32)


def _level_db(signal: np.ndarray, reference: np.ndarray) -> float:
    """Mean power of `signal` relative to `reference`'s (the two may differ in rate and length)."""
    return float(10 * np.log10(np.mean(signal.astype(np.float64) ** 2) / np.mean(reference.astype(np.float64) ** 2)))


def test_resampler_is_soxr_hq_keeps_tones_and_rejects_aliases():
    """The figures the module docstring quotes, 44.1 kHz to 16 kHz."""
    inner = slice(1_000, -1_000)  # edges depend on each resampler's padding convention
    noise = np.random.default_rng(0).standard_normal(44_100 * 3).astype(np.float32) * 0.1
    assert np.abs(resample(noise, 44_100, 16_000) - soxr.resample(noise, 44_100, 16_000, quality="HQ")).max() < 1e-7
    # Tones in the passband come out as if synthesised at 16 kHz (measured 133 dB; Kaiser-best sinc 112 dB).
    passband = ((440, 0.3), (3_000, 0.2))
    ours, exact = resample(_tones(44_100, passband), 44_100, 16_000), _tones(16_000, passband)
    assert _level_db(exact[inner], ours[inner] - exact[inner]) > 120
    # A tone above the new Nyquist frequency must not fold back (measured -143 dB; Kaiser-best sinc -118 dB).
    above = _tones(44_100, ((10_000, 0.5),))
    assert _level_db(resample(above, 44_100, 16_000)[inner], above) < -120


@pytest.mark.parametrize("source_rate", [8_000, 11_025, 22_050, 32_000, 44_100, 48_000, 96_000])
def test_the_device_resampler_reproduces_soxr_hq(source_rate):
    """What the encoder's device computes from native-rate audio is what the decoder's soxr would have shipped."""
    noise = np.random.default_rng(source_rate).standard_normal(source_rate * 2 + 13).astype(np.float32) * 0.3
    expected = soxr.resample(noise, source_rate, 16_000, quality="HQ")
    resampled = DeviceResampler(16_000)(torch.from_numpy(noise), source_rate).numpy()
    assert len(resampled) == len(expected) == resampled_length(len(noise), source_rate, 16_000)
    # soxr's own start-up differs for some rates in its first milliseconds (measured: 2 samples from 44.1 kHz, 49
    # from 96 kHz); past them only float32 rounding differs (measured at most 1.2e-6).
    settled = 16_000 * 5 // 1000
    assert np.abs(resampled[settled:] - expected[settled:]).max() < 1e-5
    assert np.sqrt(np.mean((resampled - expected) ** 2)) < 1e-4


def test_the_device_takes_the_usual_rates_and_not_those_that_would_need_gigabytes_of_taps():
    assert all(resamples_on_device(rate, 16_000) for rate in (8_000, 11_025, 22_050, 44_100, 48_000, 96_000, 192_000))
    assert not resamples_on_device(44_099, 16_000)  # coprime with 16 kHz: 16,000 phases of 44,705 taps


def test_resampled_lengths_are_soxrs():
    for n in (1, 2, 159, 160, 441, 44_101, 132_317, 1_000_003):
        for source_rate in (8_000, 22_050, 44_100, 48_000):
            expected = len(soxr.resample(np.zeros(n, np.float32), source_rate, 16_000, quality="HQ"))
            assert resampled_length(n, source_rate, 16_000) == expected, (n, source_rate)


def _encode(target, fmt: str, codec: str, samples: np.ndarray, rate: int) -> None:
    """Write mono float samples in `samples` to `target` (a path or a file object) with a real encoder."""
    with av.open(target, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _wav_bytes(seconds: float, rate: int = 8_000) -> bytes:
    buffer = io.BytesIO()
    _encode(buffer, "wav", "pcm_s16le", np.sin(np.arange(int(seconds * rate)) * 0.05) * 0.3, rate)
    return buffer.getvalue()


def test_duration_and_size_caps(tmp_path):
    path = tmp_path / "long.wav"
    path.write_bytes(_wav_bytes(5.0))
    with pytest.raises(AudioTooLongError, match="--max-duration"):
        load_audio(str(path), 8_000, DecodeConfig(max_duration_s=2.0))
    with pytest.raises(AudioTooShortError, match="shorter than the 10 s minimum"):
        load_audio(str(path), 8_000, DecodeConfig(min_duration_s=10.0))
    with pytest.raises(SourceReadError, match="--max-file-mb"):
        load_audio(str(path), 8_000, DecodeConfig(max_file_mb=0.01))
    assert load_audio(str(path), 8_000).duration_s == pytest.approx(5.0)


def test_a_file_without_audio_stream_is_a_decode_error():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    buffer.seek(0)
    with pytest.raises(AudioDecodeError, match="no audio stream"):
        decode(buffer, 16_000)


def _encode_mp3(path, seconds: float = 3.0, rate: int = 44_100) -> None:
    _encode(str(path), "mp3", "mp3", 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate), rate)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _playlist(segment: str) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3.0,\n{segment}\n#EXT-X-ENDLIST\n"


@pytest.fixture
def hostile_catalog(tmp_path):
    """Files that make FFmpeg open other resources: playlists, concat lists, session descriptions."""
    outside, catalog = tmp_path / "outside", tmp_path / "catalog"
    outside.mkdir()
    catalog.mkdir()
    _encode_mp3(outside / "secret.mp3")
    _encode_mp3(catalog / "inside.mp3")
    (catalog / "local.m3u8").write_text(_playlist(str(outside / "secret.mp3")))
    (catalog / "file_uri.m3u8").write_text(_playlist(f"file://{outside / 'secret.mp3'}"))
    (catalog / "remote.m3u8").write_text(_playlist(f"http://127.0.0.1:{_closed_port()}/track.mp3"))
    (catalog / "list.flac").write_text("ffconcat version 1.0\nfile 'inside.mp3'\n")
    (catalog / "session.wav").write_text(
        "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
        f"m=audio {_closed_port()} RTP/AVP 0\na=rtpmap:0 PCMU/8000\n"
    )
    return catalog


@pytest.mark.parametrize(
    ("name", "demuxer"),
    [("local.m3u8", "hls"), ("file_uri.m3u8", "hls"), ("remote.m3u8", "hls"), ("list.flac", "concat")],
)
def test_files_that_reference_other_resources_are_refused(hostile_catalog, name, demuxer):
    """An HLS playlist or concat list decodes nothing it points at, inside the catalog or not."""
    with pytest.raises(AudioDecodeError, match=f"'{demuxer}' .*not an allowed audio container"):
        load_audio(str(hostile_catalog / name), 16_000)


def test_session_description_is_refused_without_opening_sockets(hostile_catalog):
    """FFmpeg's SDP demuxer binds UDP ports and waits for RTP: it must be refused before it starts.

    Run in a child process so that a decoder that does start waiting fails this test instead of hanging it.
    """
    script = (
        "import sys\n"
        "from catalog_embed.schemas.errors import AudioDecodeError\n"
        "from catalog_embed.workers.audio import load_audio\n"
        "try:\n"
        "    load_audio(sys.argv[1], 16_000)\n"
        "except AudioDecodeError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(hostile_catalog / "session.wav")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "'sdp'" in done.stdout and "not an allowed audio container" in done.stdout, done.stdout + done.stderr
