"""The demo catalog: real renders in every codec, decoded back with PyAV, checked against their labels."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_embed.schemas.errors import ConfigError
from catalog_embed.workers.demo_catalog import (
    BROKEN_KINDS,
    CODECS,
    DemoCatalog,
    DemoCatalogConfig,
    _plan,
    render_demo_catalog,
)

CONFIG = DemoCatalogConfig(n_tracks=14, duration_s=4.0, seed=3)

# The General MIDI families in program order (programs 8k..8k+7 form family k), written out independently of
# the module under test.
GM_FAMILIES = (
    "piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic", "percussive", "sound_effects",
)  # fmt: skip
PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MAJOR = (0, 2, 4, 5, 7, 9, 11)
HARMONIC_MINOR = (0, 2, 3, 5, 7, 8, 11)
# Extension -> (PyAV container format name, accepted decoder names, decoded sample rate).
EXPECTED_CODECS = {
    "mp3": ("mp3", {"mp3", "mp3float"}, 44_100),
    "ogg": ("ogg", {"vorbis", "libvorbis"}, 44_100),
    "opus": ("ogg", {"opus", "libopus"}, 48_000),
    "flac": ("flac", {"flac"}, 44_100),
    "m4a": ("mov,mp4,m4a,3gp,3g2,mj2", {"aac"}, 44_100),
    "wav": ("wav", {"pcm_s16le"}, 44_100),
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> DemoCatalog:
    return render_demo_catalog(tmp_path_factory.mktemp("demo") / "a", CONFIG)


@pytest.fixture(scope="module")
def rows(catalog: DemoCatalog) -> list[dict]:
    """Manifest rows joined with their labels."""
    labels = {row["track_id"]: row for row in pq.read_table(catalog.labels_path).to_pylist()}
    return [{**row, **labels[row["track_id"]]} for row in pq.read_table(catalog.manifest_path).to_pylist()]


def _decode(path: str) -> tuple[str, str, int, int, np.ndarray]:
    """Container format, decoder, sample rate, channels and (channels, samples) float32 audio of a file."""
    with av.open(path) as container:
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")
        blocks = [out.to_ndarray() for frame in container.decode(stream) for out in to_float.resample(frame)]
        context = stream.codec_context
        return container.format.name, context.name, context.sample_rate, context.channels, np.concatenate(blocks, 1)


def test_tables_are_complete_and_consistent(catalog: DemoCatalog, rows: list[dict]) -> None:
    manifest = pq.read_table(catalog.manifest_path)
    labels = pq.read_table(catalog.labels_path)
    assert manifest.schema.names == ["track_id", "uri", "title"]
    assert labels.schema.names == [
        "track_id", "instrument_family", "program", "key", "tonic", "mode", "tempo", "codec", "split", "artist",
        "broken",
    ]  # fmt: skip
    assert pa.types.is_integer(labels.schema.field("program").type)
    assert pa.types.is_floating(labels.schema.field("tempo").type)
    assert manifest["track_id"].to_pylist() == labels["track_id"].to_pylist()
    assert [r["track_id"] for r in rows] == [f"demo-{i:04d}" for i in range(1, CONFIG.n_tracks + 1)]
    assert catalog.n_tracks == len(rows) == CONFIG.n_tracks
    for row in rows:
        uri = Path(row["uri"])
        assert uri.is_absolute() and uri.parent == catalog.root / "audio"
        assert uri.name == f"{row['track_id']}.{row['codec']}"
        assert row["title"]
        assert GM_FAMILIES[row["program"] // 8] == row["instrument_family"]
        assert row["key"] == f"{PITCH_NAMES[row['tonic']]} {row['mode']}"
        assert row["mode"] in ("major", "minor")
        assert 60 <= row["tempo"] <= 180
        assert row["split"] in ("train", "valid", "test")
        assert row["artist"].startswith("artist-")
    good = [r for r in rows if r["broken"] is None]
    broken = [r for r in rows if r["broken"] is not None]
    assert catalog.n_broken == len(broken) == CONFIG.n_broken
    assert sorted(r["broken"] for r in broken) == sorted(kind for kind, _ in BROKEN_KINDS)
    # Round-robin: every configured codec among the good files, counts within one of each other.
    counts = [sum(r["codec"] == c for r in good) for c in CONFIG.codecs]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    assert len({r["artist"] for r in rows}) >= 2
    assert "instrument_family" in (catalog.root / "README.txt").read_text()


def test_good_files_decode_as_labeled(rows: list[dict]) -> None:
    for row in (r for r in rows if r["broken"] is None):
        container_format, decoder, rate, channels, audio = _decode(row["uri"])
        expected_format, expected_decoders, expected_rate = EXPECTED_CODECS[row["codec"]]
        assert container_format == expected_format, row["track_id"]
        assert decoder in expected_decoders, row["track_id"]
        assert (rate, channels) == (expected_rate, 2), row["track_id"]
        assert audio.shape[1] / rate == pytest.approx(CONFIG.duration_s, abs=0.1), row["track_id"]
        assert 0.1 < np.abs(audio).max() <= 1.0, row["track_id"]


def test_broken_files_fail_to_decode(rows: list[dict]) -> None:
    for row in (r for r in rows if r["broken"] is not None):
        path = Path(row["uri"])
        if row["broken"] == "missing":
            assert not path.exists()
            continue
        if row["broken"] == "empty":
            assert path.stat().st_size == 0
            continue
        try:
            _, _, rate, _, audio = _decode(row["uri"])
        # IndexError: no audio stream; ValueError: an audio stream without a single decodable frame.
        except (av.FFmpegError, IndexError, ValueError):
            continue
        # A truncated mp3 decodes without an error, to a prefix: only its length gives it away.
        assert row["broken"] == "truncated", row
        assert audio.shape[1] / rate < CONFIG.duration_s - 0.5, row


def _chroma(audio: np.ndarray, rate: int) -> np.ndarray:
    """Pitch-class energy, normalised to sum 1: per semitone from E2 to D#7, the geometric mean of the power at
    its first three harmonics, so a note's overtones (its fifth and third, octaves up) count for little."""
    mono = audio.mean(axis=0).astype(np.float64)
    n_fft = 16_384
    frames = np.lib.stride_tricks.sliding_window_view(mono, n_fft)[:: n_fft // 2] * np.hanning(n_fft)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2)[:, 1:]  # without DC, whose log frequency is -inf
    log_freqs = np.log2(np.fft.rfftfreq(n_fft, 1 / rate)[1:])
    chroma = np.zeros(12)
    for midi in range(40, 100):
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        # Power within half a semitone of each harmonic, per frame.
        bands = [power[:, np.abs(log_freqs - np.log2(h * f0)) < 1 / 24].sum(1) for h in (1, 2, 3)]
        chroma[midi % 12] += np.exp(np.log(np.stack(bands) + 1e-20).mean(axis=0)).sum()
    return chroma / chroma.sum()


def test_audio_is_in_its_labeled_key(rows: list[dict]) -> None:
    mode_heard = []
    for row in (r for r in rows if r["broken"] is None):
        _, _, rate, _, audio = _decode(row["uri"])
        chroma = _chroma(audio, rate)
        scale = MAJOR if row["mode"] == "major" else HARMONIC_MINOR

        def in_scale(tonic: int, chroma: np.ndarray = chroma, scale: tuple[int, ...] = scale) -> float:
            return float(chroma[[(tonic + step) % 12 for step in scale]].sum())

        tonic = row["tonic"]
        # The key's 7 pitch classes hold most of the energy (7/12 = 0.58 for audio in no key) and clearly more
        # than those of the same mode a semitone or a tritone away, which share 2 to 4 pitch classes with it.
        assert in_scale(tonic) >= 0.7, (row["key"], chroma.round(2))
        for shift in (1, 6, 11):
            assert in_scale(tonic) - in_scale(tonic + shift) >= 0.05, (row["key"], shift, chroma.round(2))
        # Mode: major's third and sixth against minor's (harmonic minor has the major scale's seventh).
        relative = np.roll(chroma, -tonic)
        minor_over_major = (relative[3] + relative[8]) / (relative[4] + relative[9])
        mode_heard.append((minor_over_major > 1) == (row["mode"] == "minor"))
    # Overtones blur the thirds of a few short tracks; across the catalog the mode must be heard.
    assert sum(mode_heard) >= 0.75 * len(mode_heard), mode_heard


def test_rendering_is_deterministic_whatever_the_worker_count(
    catalog: DemoCatalog, tmp_path: Path
) -> None:
    again = render_demo_catalog(tmp_path / "b", CONFIG, workers=2)
    assert pq.read_table(again.labels_path).equals(pq.read_table(catalog.labels_path))
    first, second = pq.read_table(catalog.manifest_path), pq.read_table(again.manifest_path)
    assert first.drop(["uri"]).equals(second.drop(["uri"]))
    assert [Path(u).name for u in first["uri"].to_pylist()] == [Path(u).name for u in second["uri"].to_pylist()]

    def digests(root: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "audio").iterdir())}

    # Every encoder and muxer runs bit-exact, so even the lossy files match byte for byte.
    assert digests(again.root) == digests(catalog.root)
    assert (again.root / "README.txt").read_text() == (catalog.root / "README.txt").read_text()


def test_a_different_seed_gives_a_different_catalog() -> None:
    def choices(config: DemoCatalogConfig) -> list[tuple]:
        return [(t.family, t.program, t.tonic, t.mode, t.tempo, t.broken) for t in _plan(config)]

    assert choices(CONFIG) == choices(CONFIG)
    assert choices(CONFIG) != choices(DemoCatalogConfig(n_tracks=14, duration_s=4.0, seed=CONFIG.seed + 1))


def test_default_catalog_is_balanced() -> None:
    """The default 240 tracks: every family 20 times, every key 10 times, splits about 70/15/15 per family."""
    tracks = _plan(DemoCatalogConfig())
    families = {t.family for t in tracks}
    assert len(families) == 12
    for family in families:
        members = [t for t in tracks if t.family == family]
        assert len(members) == 20
        assert sorted(t.split for t in members).count("train") == 14
    keys = [(t.tonic, t.mode) for t in tracks]
    assert all(keys.count(key) == 10 for key in set(keys)) and len(set(keys)) == 24
    assert len({t.artist for t in tracks}) == 30
    assert {t.codec for t in tracks if t.broken is None} == set(CODECS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_tracks": 4, "n_broken": 6}, "n_broken"),
        ({"codecs": ("mp3", "aiff")}, "codecs"),
        ({"sample_rate": 44_000}, "sample_rate"),
        ({"duration_s": 0.0}, "duration_s"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DemoCatalogConfig(**kwargs)


def test_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not an empty folder"):
        render_demo_catalog(tmp_path, DemoCatalogConfig(n_tracks=1, duration_s=1.0, n_broken=0))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("module", "hint"),
    [("tinysoundfont", "pip install --no-deps tinysoundfont==0.3.7"), ("pretty_midi", "catalog-embed[demo]")],
)
def test_missing_renderer_is_a_config_error_with_the_install_command(
    module: str, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError, match=re.escape(hint)):
        render_demo_catalog(tmp_path / "out", DemoCatalogConfig(n_tracks=1, duration_s=1.0, n_broken=0))
    assert not (tmp_path / "out").exists()
