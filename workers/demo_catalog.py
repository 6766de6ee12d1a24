"""A labeled demo music catalog, rendered offline and deterministically.

Each track is a short tonal piece built with pretty_midi: a lead melody on a scale of its key over a I-IV-V-I
chord progression, a bass line on the chord roots, an accompaniment and, for some artists, a drum kit on MIDI
channel 10. TinySoundFont renders the lead and the band apart with the General MIDI SoundFont that pretty_midi
ships (`TimGM6mb.sf2`), the lead is mixed well above the band (its instrument family is a label), and PyAV
encodes the mix in-process, the codecs spread round-robin across tracks. A few tracks are broken on purpose
(truncated, empty, not audio, corrupt header, missing), as real catalogs are.

The labels (instrument family of the lead, key, tempo, artist, split) are known by construction, so probes
trained on embeddings of this catalog have ground truth. Every random choice flows from `DemoCatalogConfig.seed`
through per-track seed sequences, so the output does not depend on worker count or scheduling: two runs write the
same labels, the same manifest (but for the folder in its absolute `uri`s) and byte-identical audio files, because
the encoders and muxers run in FFmpeg's bit-exact mode (without it, the Ogg muxer draws random stream serial
numbers, and the other formats embed the library version).
"""

from __future__ import annotations

import importlib
import importlib.resources
import io
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog_embed.schemas.errors import ConfigError

# General MIDI families (0-based programs) the lead instrument is drawn from: a few typical programs each, with
# the MIDI note the melody centres on, so every instrument plays in a register where it sounds like itself.
FAMILIES: dict[str, tuple[tuple[int, int], ...]] = {
    "piano": ((0, 67), (1, 67), (4, 67), (6, 67)),
    "chromatic_percussion": ((8, 79), (11, 72), (12, 72), (13, 79)),
    "organ": ((16, 67), (17, 67), (19, 62), (21, 67)),
    "guitar": ((24, 64), (25, 64), (26, 60), (27, 64)),
    "bass": ((32, 45), (33, 45), (35, 45), (38, 48)),
    "strings": ((40, 74), (41, 67), (42, 55), (46, 67)),
    "ensemble": ((48, 67), (49, 67), (52, 67), (53, 67)),
    "brass": ((56, 70), (57, 58), (60, 62), (61, 65)),
    "reed": ((65, 67), (66, 60), (68, 72), (71, 67)),
    "pipe": ((72, 84), (73, 77), (74, 77), (75, 74)),
    "synth_lead": ((80, 69), (81, 69), (84, 67), (87, 64)),
    "synth_pad": ((88, 67), (89, 64), (90, 67), (91, 67)),
}

# Tonic names as mir_eval spells keys ("C major", "Eb minor"): sharps and flats as musicians write them.
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Minor keys use the harmonic minor scale: its raised seventh (the leading tone) is what tells A minor from
# C major, which share every other pitch class, so the key is unambiguous from the audio.
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 11)}
# I-IV-V-I as scale degrees (0-based) of each chord's root; chords are stacked thirds on the scale.
PROGRESSION = (0, 3, 4, 0)


@dataclass(frozen=True)
class _CodecSpec:
    container: str
    codec: str
    sample_rate: int | None  # None: the catalog's sample rate
    bit_rate: int | None
    options: dict[str, str] = field(default_factory=dict)


# Extension -> how PyAV writes it. Opus runs at 48 kHz only (the format decodes to 48 kHz whatever the source),
# so those files are resampled. FFmpeg's only Vorbis encoder is flagged experimental; its output decodes fine.
# Encoding dominates rendering time, hence speed settings: AAC's fast coder halves its encode time, LAME quality 7
# and Opus complexity 5 save a fifth to a third, at a quality loss nobody hears in a demo catalog.
CODECS: dict[str, _CodecSpec] = {
    "mp3": _CodecSpec("mp3", "libmp3lame", None, 192_000, {"compression_level": "7"}),
    "ogg": _CodecSpec("ogg", "vorbis", None, None, {"strict": "experimental"}),
    "opus": _CodecSpec("opus", "libopus", 48_000, 128_000, {"compression_level": "5"}),
    "flac": _CodecSpec("flac", "flac", None, None),
    "m4a": _CodecSpec("ipod", "aac", None, 192_000, {"aac_coder": "fast"}),
    "wav": _CodecSpec("wav", "pcm_s16le", None, None),
}

# The ways a catalog file goes bad, with the extension each broken file carries. Truncation needs a codec whose
# cut is realistic (an interrupted download); a corrupt FLAC header cannot be resynchronised by a demuxer.
BROKEN_KINDS: tuple[tuple[str, str], ...] = (
    ("truncated", "mp3"),
    ("truncated", "flac"),
    ("empty", "ogg"),
    ("not_audio", "mp3"),
    ("corrupt_header", "flac"),
    ("missing", "m4a"),
)

# mp3 and AAC accept these rates; Opus is resampled to 48 kHz regardless.
_SAMPLE_RATES = (16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
_PEAK = 0.89  # -1 dBFS: headroom for lossy codecs, whose decoded peaks overshoot the input's.
_LEAD_OVER_BAND_DB = 8.0
_FADE_S = 0.02  # the render is cut mid-note; a short fade avoids a click at the end
_TRACKS_PER_ARTIST = 8
# An artist's accompaniment: a soft, neutral patch and a pattern that suits it, at low volume under the lead,
# which stays dominant. Sustained patches hold chords: arpeggiated, their long releases pile up voices.
_COMP_STYLES = ((0, "block"), (0, "arpeggio"), (4, "pulse"), (24, "arpeggio"), (48, "block"), (89, "block"))
_SPLITS = (("train", 0.7), ("valid", 0.85), ("test", 1.0))  # cumulative shares
_DRUM_CHANNEL_PROGRAM = 0  # the Standard kit
_CORRUPT_HEADER_BYTES = 512

_TITLE_WORDS = (
    ("Amber", "Quiet", "Northern", "Hollow", "Silver", "Restless", "Golden", "Distant", "Paper", "Velvet", "Iron"),
    ("Harbor", "Lantern", "Meadow", "Signal", "Orchard", "Tide", "Window", "Ember", "Compass", "River", "Atlas"),
)
_NOT_AUDIO = (
    b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
    b"<body><h1>Forbidden</h1><p>You don't have permission to access this resource.</p></body></html>\n"
)

_SCHEMA_MANIFEST = pa.schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
    ]
)
_SCHEMA_LABELS = pa.schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("instrument_family", pa.string(), nullable=False),
        pa.field("program", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("tonic", pa.int32(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("tempo", pa.float64(), nullable=False),
        pa.field("codec", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("artist", pa.string(), nullable=False),
        pa.field("broken", pa.string(), nullable=True),
    ]
)

_README = """\
Demo catalog rendered by `catalog-embed demo-catalog` ({config}).

Synthetic tonal pieces (General MIDI via TinySoundFont, SoundFont TimGM6mb.sf2 shipped with pretty_midi):
a lead melody on the key's scale (harmonic minor for minor keys) over a I-IV-V-I progression, a bass line,
an accompaniment and, for some artists, drums; the lead is mixed 8 dB (RMS) above the rest.
{n_tracks} tracks of {duration:g} s at {rate} Hz stereo (Opus files decode at 48 kHz, as every Opus stream does).

manifest.parquet: what a user would point `catalog-embed embed` at.
  track_id  string   "demo-0001" ...
  uri       string   absolute path of the audio file
  title     string   a made-up title
labels.parquet: ground truth, one row per manifest row.
  track_id           string   joins the manifest
  instrument_family  string   General MIDI family of the lead instrument (the one that dominates the mix)
  program            int      General MIDI program of the lead, 0-based (0 = Acoustic Grand Piano)
  key                string   mir_eval style: tonic and mode, e.g. "C major", "F# minor"
  tonic              int      pitch class of the tonic, 0 = C ... 11 = B
  mode               string   "major" or "minor"
  tempo              float    beats (quarter notes) per minute
  codec              string   file extension: mp3, ogg (Vorbis), opus, flac, m4a (AAC), wav (16-bit PCM)
  split              string   train / valid / test, drawn per instrument family (stratified, not grouped)
  artist             string   synthetic artist; an artist's tracks share an arrangement style (accompaniment
                              instrument and pattern, drums, rhythm), so use it for grouped splits
  broken             string   null for a good file, else why it cannot be decoded: truncated (cut mid-stream;
                              decodes to a prefix), empty (0 bytes), not_audio (an HTML page named .mp3),
                              corrupt_header (random bytes over the header), missing (no file at its uri)
"""


@dataclass(frozen=True)
class DemoCatalogConfig:
    """What to render. The same config renders the same catalog, whatever machine or worker count.

    Attributes:
        n_tracks: manifest rows, broken ones included.
        duration_s: length of every good track in seconds.
        seed: seeds every random choice (keys, instruments, melodies, splits, which tracks break).
        sample_rate: rate of the rendered audio in Hz (Opus files are resampled to 48 kHz).
        codecs: file extensions good tracks are encoded to, assigned round-robin (see `CODECS`).
        n_broken: how many rows are broken on purpose, cycling through `BROKEN_KINDS`.
    """

    n_tracks: int = 240
    duration_s: float = 30.0
    seed: int = 0
    sample_rate: int = 44_100
    codecs: tuple[str, ...] = ("mp3", "ogg", "opus", "flac", "m4a", "wav")
    n_broken: int = 6

    def __post_init__(self) -> None:
        if self.n_tracks < 1:
            msg = f"n_tracks must be at least 1, got {self.n_tracks}"
            raise ConfigError(msg)
        if not 0 <= self.n_broken <= self.n_tracks:
            msg = (
                f"n_broken={self.n_broken} must be between 0 and n_tracks={self.n_tracks}: "
                "ask for fewer broken files or more tracks"
            )
            raise ConfigError(msg)
        if not 0.5 <= self.duration_s <= 600:
            msg = f"duration_s must be between 0.5 and 600 seconds, got {self.duration_s:g}"
            raise ConfigError(msg)
        if self.seed < 0:
            msg = f"seed must be a non-negative integer, got {self.seed}"
            raise ConfigError(msg)
        if self.sample_rate not in _SAMPLE_RATES:
            msg = f"sample_rate {self.sample_rate} is not one every codec accepts; pick one of {_SAMPLE_RATES}"
            raise ConfigError(msg)
        unknown = [c for c in self.codecs if c not in CODECS]
        if unknown or not self.codecs or len(set(self.codecs)) != len(self.codecs):
            msg = f"codecs must be distinct names from {tuple(CODECS)}, got {self.codecs}"
            raise ConfigError(msg)


@dataclass(frozen=True)
class DemoCatalog:
    """A rendered demo catalog.

    Attributes:
        root: the output folder; audio files are under `root/audio`.
        manifest_path: `manifest.parquet` (track_id, uri, title).
        labels_path: `labels.parquet` (ground truth per track, `broken` says which files are bad on purpose).
        n_tracks: manifest rows.
        n_broken: rows whose file is broken or missing.
    """

    root: Path
    manifest_path: Path
    labels_path: Path
    n_tracks: int
    n_broken: int


@dataclass(frozen=True)
class _ArtistStyle:
    comp_program: int
    comp_pattern: str  # see _COMP_STYLES
    drums: bool
    eighth_note_share: float  # how busy the melody is
    comp_pan: int


@dataclass(frozen=True)
class _Track:
    index: int
    track_id: str
    title: str
    family: str
    program: int
    centre_note: int
    tonic: int
    mode: str
    tempo: float
    codec: str
    split: str
    artist: int
    style: _ArtistStyle
    broken: str | None


def render_demo_catalog(
    out: str | Path, config: DemoCatalogConfig | None = None, *, workers: int = 1
) -> DemoCatalog:
    """Render the catalog `config` describes into the folder `out`.

    Writes `audio/<track_id>.<ext>`, `manifest.parquet`, `labels.parquet` and `README.txt`. The output does not
    depend on `workers`.

    Args:
        out: a folder that does not exist yet or is empty.
        config: what to render; the defaults give 240 tracks of 30 s.
        workers: processes rendering and encoding tracks in parallel; 1 renders in this process.

    Returns:
        Where the tables are, and how many rows (and broken rows) they have.

    Raises:
        ConfigError: `out` is not empty, `workers` is below 1, or pretty_midi / tinysoundfont is not installed.
    """
    config = config or DemoCatalogConfig()
    if workers < 1:
        msg = f"workers must be at least 1, got {workers}"
        raise ConfigError(msg)
    _import_pretty_midi()
    _import_tinysoundfont()
    root = Path(out).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        msg = f"{root} exists and is not an empty folder; pick a new or empty output folder"
        raise ConfigError(msg)
    audio_dir = root / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)

    tracks = _plan(config)
    jobs = [(track, config, str(audio_dir)) for track in tracks]
    if workers == 1 or len(tracks) == 1:
        for job in jobs:
            _render_track(job)
    else:
        # Spawned, not forked: the caller may hold threads (torch, pyarrow) that a fork would copy mid-lock.
        with ProcessPoolExecutor(max_workers=min(workers, len(tracks)), mp_context=get_context("spawn")) as pool:
            # Consuming the results re-raises a worker's exception here.
            list(pool.map(_render_track, jobs))

    manifest = pa.table(
        {
            "track_id": [t.track_id for t in tracks],
            "uri": [str(audio_dir / f"{t.track_id}.{t.codec}") for t in tracks],
            "title": [t.title for t in tracks],
        },
        schema=_SCHEMA_MANIFEST,
    )
    labels = pa.table(
        {
            "track_id": [t.track_id for t in tracks],
            "instrument_family": [t.family for t in tracks],
            "program": [t.program for t in tracks],
            "key": [f"{PITCH_CLASSES[t.tonic]} {t.mode}" for t in tracks],
            "tonic": [t.tonic for t in tracks],
            "mode": [t.mode for t in tracks],
            "tempo": [t.tempo for t in tracks],
            "codec": [t.codec for t in tracks],
            "split": [t.split for t in tracks],
            "artist": [f"artist-{t.artist + 1:02d}" for t in tracks],
            "broken": [t.broken for t in tracks],
        },
        schema=_SCHEMA_LABELS,
    )
    manifest_path, labels_path = root / "manifest.parquet", root / "labels.parquet"
    pq.write_table(manifest, manifest_path)
    pq.write_table(labels, labels_path)
    (root / "README.txt").write_text(
        _README.format(
            config=", ".join(f"{k}={v!r}" for k, v in vars(config).items()),
            n_tracks=config.n_tracks,
            duration=config.duration_s,
            rate=config.sample_rate,
        )
    )
    return DemoCatalog(
        root=root,
        manifest_path=manifest_path,
        labels_path=labels_path,
        n_tracks=len(tracks),
        n_broken=sum(t.broken is not None for t in tracks),
    )


def _import_pretty_midi() -> ModuleType:
    try:
        return importlib.import_module("pretty_midi")
    except ImportError as exc:
        msg = f"the demo catalog needs pretty_midi ({exc}); install it with: pip install 'catalog-embed[demo]'"
        raise ConfigError(msg) from exc


def _import_tinysoundfont() -> ModuleType:
    try:
        return importlib.import_module("tinysoundfont")
    except ImportError as exc:
        msg = (
            f"the demo catalog needs tinysoundfont ({exc}); install it with: "
            "pip install --no-deps tinysoundfont==0.3.7 (its PyAudio dependency is for playback only)"
        )
        raise ConfigError(msg) from exc


def _plan(config: DemoCatalogConfig) -> list[_Track]:
    """Every label and choice of the catalog, decided up front from the seed alone."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    n = config.n_tracks
    families = list(FAMILIES)
    # Balanced marginals (each family and each of the 24 keys about equally often), shuffled independently so
    # family and key are not confounded.
    family_of = rng.permutation(np.arange(n) % len(families))
    key_of = rng.permutation(np.arange(n) % 24)
    tempo_of = rng.integers(60, 181, size=n)
    n_artists = min(n, max(3, round(n / _TRACKS_PER_ARTIST)))
    artist_of = rng.permutation(np.arange(n) % n_artists)
    styles = [_artist_style(config.seed, a) for a in range(n_artists)]
    broken_rows = sorted(rng.choice(n, size=config.n_broken, replace=False).tolist())
    broken_of = {row: BROKEN_KINDS[i % len(BROKEN_KINDS)] for i, row in enumerate(broken_rows)}
    split_of = _stratified_splits(family_of, rng)

    tracks = []
    good = 0
    for i in range(n):
        family = families[family_of[i]]
        program, centre = FAMILIES[family][rng.integers(len(FAMILIES[family]))]
        if i in broken_of:
            broken, codec = broken_of[i]
        else:
            broken, codec = None, config.codecs[good % len(config.codecs)]
            good += 1
        title = f"{rng.choice(_TITLE_WORDS[0])} {rng.choice(_TITLE_WORDS[1])}"
        tracks.append(
            _Track(
                index=i,
                track_id=f"demo-{i + 1:04d}",
                title=title,
                family=family,
                program=int(program),
                centre_note=int(centre),
                tonic=int(key_of[i] % 12),
                mode="major" if key_of[i] < 12 else "minor",
                tempo=float(tempo_of[i]),
                codec=codec,
                split=split_of[i],
                artist=int(artist_of[i]),
                style=styles[artist_of[i]],
                broken=broken,
            )
        )
    return tracks


def _artist_style(seed: int, artist: int) -> _ArtistStyle:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, artist]))
    comp_program, comp_pattern = _COMP_STYLES[rng.integers(len(_COMP_STYLES))]
    return _ArtistStyle(
        comp_program=comp_program,
        comp_pattern=comp_pattern,
        drums=bool(rng.random() < 0.5),
        eighth_note_share=float(rng.uniform(0.1, 0.6)),
        comp_pan=int(rng.choice([40, 88])),
    )


def _stratified_splits(family_of: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Systematic sampling within each family: shares hold per family, and even a family of one gets a draw."""
    split_of = [""] * len(family_of)
    for family in range(int(family_of.max()) + 1):
        rows = rng.permutation(np.flatnonzero(family_of == family))
        offset = rng.random()
        for j, row in enumerate(rows):
            position = (j + offset) / len(rows)
            split_of[row] = next(name for name, upper in _SPLITS if position < upper)
    return split_of


def _render_track(job: tuple[_Track, DemoCatalogConfig, str]) -> None:
    """Render, encode and write (or break) one track's file. Runs in a worker process."""
    track, config, audio_dir = job
    path = Path(audio_dir) / f"{track.track_id}.{track.codec}"
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2, track.index]))
    if track.broken == "missing":
        return
    if track.broken == "empty":
        path.write_bytes(b"")
        return
    if track.broken == "not_audio":
        path.write_bytes(_NOT_AUDIO)
        return
    lead, band = _compose(track, config.duration_s, rng)
    audio = _mix(
        _synthesize(lead, config.duration_s, config.sample_rate),
        _synthesize(band, config.duration_s, config.sample_rate),
        config.sample_rate,
    )
    data = _encode(audio, config.sample_rate, CODECS[track.codec])
    if track.broken == "truncated":
        data = data[: int(len(data) * rng.uniform(0.3, 0.7))]
    elif track.broken == "corrupt_header":
        data = rng.bytes(_CORRUPT_HEADER_BYTES) + data[_CORRUPT_HEADER_BYTES:]
    path.write_bytes(data)


def _compose(track: _Track, duration_s: float, rng: np.random.Generator) -> tuple[bytes, bytes]:
    """The track as two Standard MIDI Files: the lead melody, and the band (accompaniment, bass, maybe drums)."""
    pretty_midi = _import_pretty_midi()
    style = track.style
    scale = SCALES[track.mode]
    beat = 60.0 / track.tempo
    n_beats = math.ceil(duration_s / beat)
    # Chords last a bar, or less where that plays the progression at least twice: even a short or slow render
    # states the whole I-IV-V-I, hence its key (I and IV alone fit a neighbouring key as well).
    beats_per_chord = next((b for b in (4, 2) if n_beats >= 2 * len(PROGRESSION) * b), 1)

    def pitch(degree: int, centre: int) -> int:
        """MIDI note of a scale degree (any integer, 0 = the tonic nearest below `centre`)."""
        tonic_note = centre - (centre - track.tonic) % 12
        octave, step = divmod(degree, 7)
        return tonic_note + 12 * octave + scale[step]

    lead = pretty_midi.Instrument(program=track.program)
    comp = pretty_midi.Instrument(program=style.comp_program)
    bass = pretty_midi.Instrument(program=33)
    drums = pretty_midi.Instrument(program=_DRUM_CHANNEL_PROGRAM, is_drum=True)
    # Channel volume (CC 7) and pan (CC 10) at t=0 balance the band and spread the accompaniment.
    for instrument, volume, pan in ((lead, 127, 64), (comp, 84, style.comp_pan), (bass, 76, 64), (drums, 80, 64)):
        instrument.control_changes += [
            pretty_midi.ControlChange(7, volume, 0.0),
            pretty_midi.ControlChange(10, pan, 0.0),
        ]

    degree = 0  # the melody opens on the tonic
    for start_beat in range(0, n_beats, beats_per_chord):
        position = (start_beat // beats_per_chord) % len(PROGRESSION)
        chord_root = PROGRESSION[position]
        chord = (chord_root, chord_root + 2, chord_root + 4)
        t0 = start_beat * beat
        length = beats_per_chord * beat
        # Accompaniment around middle C, quieter than the lead.
        if style.comp_pattern == "block":
            comp.notes += [pretty_midi.Note(56, pitch(d, 60), t0, t0 + length * 0.95) for d in chord]
        elif style.comp_pattern == "pulse":
            for b in range(beats_per_chord):
                tb = t0 + b * beat
                comp.notes += [pretty_midi.Note(52, pitch(d, 60), tb, tb + beat * 0.8) for d in chord]
        else:
            arpeggio = (chord[0], chord[1], chord[2], chord[0] + 7, chord[2], chord[1])
            for k in range(2 * beats_per_chord):
                tk = t0 + k * beat / 2
                comp.notes.append(pretty_midi.Note(54, pitch(arpeggio[k % len(arpeggio)], 60), tk, tk + beat * 0.5))
        # The bass plays the chord root, then its octave: roots, not fifths, so the tonic outweighs the dominant.
        if track.family != "bass":  # a bass lead is the bass line; a second bass would muddy it
            bass.notes.append(pretty_midi.Note(92, pitch(chord_root, 40), t0, t0 + length / 2 * 0.95))
            bass.notes.append(pretty_midi.Note(84, pitch(chord_root + 7, 40), t0 + length / 2, t0 + length * 0.95))
        if position == len(PROGRESSION) - 1:
            # Cadence: each phrase descends third, second, tonic (mi-re-do or its minor) over the closing I chord
            # and rests on the tonic. The third is what tells major from minor.
            octave = 7 * round(degree / 7)
            for step, (start, end) in zip((2, 1, 0), ((0.0, 0.25), (0.25, 0.5), (0.5, 0.95)), strict=True):
                note = pitch(octave + step, track.centre_note)
                lead.notes.append(pretty_midi.Note(112, note, t0 + start * length, t0 + end * length))
            degree = octave
        else:
            # The chord tone nearest the previous note on each chord change, then a random walk on the scale.
            degree = min((d + 7 * k for d in chord for k in (-1, 0, 1)), key=lambda d: abs(d - degree))
            for b in range(beats_per_chord):
                tb = t0 + b * beat
                subdivisions = 2 if rng.random() < style.eighth_note_share else 1
                for s in range(subdivisions):
                    ts = tb + s * beat / subdivisions
                    if b or s:
                        degree = int(np.clip(degree + rng.choice([-2, -1, -1, 1, 1, 2]), -3, 9))
                    velocity = int(rng.integers(100, 121)) if s == 0 else int(rng.integers(88, 105))
                    end = ts + beat / subdivisions * 0.9
                    lead.notes.append(pretty_midi.Note(velocity, pitch(degree, track.centre_note), ts, end))
        if style.drums:
            for b in range(beats_per_chord):
                tb = t0 + b * beat
                global_beat = start_beat + b
                drum = 36 if global_beat % 2 == 0 else 38  # kick on 1 and 3, snare on 2 and 4
                drums.notes.append(pretty_midi.Note(90, drum, tb, tb + 0.1))
                drums.notes += [pretty_midi.Note(60, 42, tb + h * beat / 2, tb + h * beat / 2 + 0.05) for h in (0, 1)]

    band = [comp] + ([bass] if bass.notes else []) + ([drums] if style.drums else [])
    return _midi_file(track.tempo, [lead]), _midi_file(track.tempo, band)


def _midi_file(tempo: float, instruments: list) -> bytes:
    pretty_midi = _import_pretty_midi()
    midi = pretty_midi.PrettyMIDI(initial_tempo=tempo)
    midi.instruments += instruments
    buffer = io.BytesIO()
    midi.write(buffer)
    return buffer.getvalue()


@lru_cache(maxsize=1)
def _soundfont_bytes() -> bytes:
    return (importlib.resources.files("pretty_midi") / "TimGM6mb.sf2").read_bytes()


def _synthesize(midi: bytes, duration_s: float, sample_rate: int) -> np.ndarray:
    """Render a Standard MIDI File to (samples, 2) float32, cut at `duration_s`."""
    tinysoundfont = _import_tinysoundfont()
    # A fresh synthesizer per track: nothing (voices, controllers) carries over from the previous track, so a
    # track sounds the same whichever worker renders it after whichever other track.
    synth = tinysoundfont.Synth(samplerate=sample_rate)
    synth.sfload(_soundfont_bytes())
    sequencer = tinysoundfont.Sequencer(synth)
    # Non-persistent events leave the queue once played; persistent ones are rescanned on every step.
    sequencer.add(tinysoundfont.midi.load_memory(midi, persistent=False))
    n = round(duration_s * sample_rate)
    return np.frombuffer(synth.generate(n), dtype=np.float32).reshape(n, 2)


def _mix(lead: np.ndarray, band: np.ndarray, sample_rate: int) -> np.ndarray:
    """The lead `_LEAD_OVER_BAND_DB` above the band (RMS), peak-normalised, faded out at the cut."""
    # Presets of one SoundFont differ in loudness by 15 dB and more (a harpsichord against a fingered bass), so
    # velocities alone cannot keep the lead on top: its family is the label, so its level is set here.
    band_rms = float(np.sqrt(np.mean(np.square(band, dtype=np.float64))))
    lead_rms = float(np.sqrt(np.mean(np.square(lead, dtype=np.float64))))
    band_gain = lead_rms / band_rms * 10 ** (-_LEAD_OVER_BAND_DB / 20) if band_rms > 0 else 0.0
    audio = lead + np.float32(band_gain) * band
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio *= np.float32(_PEAK / peak)
    fade = min(len(audio), round(_FADE_S * sample_rate))
    audio[len(audio) - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)[:, None]
    return audio


def _encode(audio: np.ndarray, sample_rate: int, spec: _CodecSpec) -> bytes:
    """Encode (samples, 2) float32 audio in memory with PyAV, bit-exactly (no random or version-dependent bytes)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=spec.container) as container:
        container.flags |= av.container.Flags.bitexact.value
        stream = container.add_stream(spec.codec, rate=spec.sample_rate or sample_rate, options=spec.options)
        stream.codec_context.layout = "stereo"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact.value
        if spec.bit_rate:
            stream.codec_context.bit_rate = spec.bit_rate
        frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="flt", layout="stereo")
        frame.sample_rate = sample_rate
        # Without a pts the Vorbis encoder writes wrong granule positions (a 30 s file claims 2 s).
        frame.pts = 0
        # PyAV converts the frame to the encoder's sample format, rate and frame size.
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()

