"""On Beam and on Ray a decoder that crashes its process or hangs costs one `failures` row, as on the local runner;
the bundle, the task and the run go on: both decode in the supervised child process each Beam worker or Ray decode
task keeps (`catalog_embed.workers.isolation`). The crash and the hang are injected where a decoder would fail
(`catalog_embed.workers.failpoints`), inside those processes."""

from __future__ import annotations

import shutil
import wave

import av
import numpy as np
import pytest
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES
from catalog_embed.workers import failpoints
from catalog_embed.workers.audio import DecodeConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("runner", ["beam", "ray"])
@pytest.mark.parametrize(("action", "error_type"), [("segfault", "DecoderCrashed"), ("hang", "DecodeTimeout")])
def test_a_decoder_crash_or_hang_is_one_failure_row(runner, action, error_type, small_catalog, small_labels,
                                                     tmp_path, monkeypatch):
    good = sorted(label["track_id"] for label in small_labels if label["broken"] is None)
    victim = good[1]
    monkeypatch.setenv(failpoints.ENV, f"decode={action}:{victim}")
    config = EmbedConfig(catalog=str(small_catalog.manifest_path), out=str(tmp_path), runner=runner, workers=1,
                         shard_size=8, decode_timeout_s=10)
    summary = run_embed(config, Console(quiet=True))

    store = TableStore(config.out)
    assert sorted(store.read(EMBEDDINGS, ["track_id"])["track_id"].to_pylist()) == [t for t in good if t != victim]
    failures = {row["track_id"]: row for row in store.read(FAILURES).to_pylist()}
    assert (failures[victim]["stage"], failures[victim]["error_type"]) == ("decode", error_type)
    assert len(failures) == len(small_labels) - len(good) + 1
    assert (summary.status, summary.stats.n_failed) == ("succeeded", len(failures))


def _decompression_bomb(path, minutes: int = 25, rate: int = 48_000) -> None:
    """A FLAC of silence: 200 KB on disk, under --max-file-mb and --max-duration, 290 MB once decoded."""
    with av.open(str(path), mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate)
        stream.codec_context.layout = "mono"
        block = np.zeros((1, rate * 10), dtype=np.int16)
        for i in range(minutes * 6):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, i * block.shape[1]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _big_wav(path, seconds: float = 8.0, rate: int = 48_000) -> None:
    """Noise as 16-bit stereo WAV: 1.5 MB on disk."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        noise = np.random.default_rng(0).integers(-8000, 8000, size=(int(seconds * rate), 2), dtype=np.int16)
        out.writeframes(noise.tobytes())


@pytest.mark.parametrize("runner", ["local", "beam", "ray"])
def test_huge_files_fail_their_tracks_under_the_size_and_memory_caps(runner, small_catalog, small_labels, tmp_path):
    """A file over --max-file-mb is refused unread; a decompression bomb runs its decoder out of --decode-memory-mb.
    Each costs one `failures` row that says which option to raise; the good track lands."""
    good = next(label["track_id"] for label in small_labels if label["broken"] is None)
    source = next(p for p in (small_catalog.root / "audio").iterdir() if p.stem == good)
    (tmp_path / "audio").mkdir()
    shutil.copy(source, tmp_path / "audio" / source.name)
    _decompression_bomb(tmp_path / "audio" / "bomb.flac")
    _big_wav(tmp_path / "audio" / "big.wav")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"track_id,uri\n{good},audio/{source.name}\nbomb,audio/bomb.flac\nbig,audio/big.wav\n")
    config = EmbedConfig(catalog=str(manifest), out=str(tmp_path / "out"), runner=runner, workers=1,
                         decode=DecodeConfig(max_memory_mb=64, max_file_mb=1.0))
    summary = run_embed(config, Console(quiet=True))

    store = TableStore(config.out)
    assert store.read(EMBEDDINGS, ["track_id"])["track_id"].to_pylist() == [good]
    failures = {f["track_id"]: f for f in store.read(FAILURES, ["track_id", "stage", "error_type", "message"]).to_pylist()}
    assert sorted(failures) == ["big", "bomb"]
    assert (failures["bomb"]["error_type"], failures["big"]["error_type"]) == ("DecodeOutOfMemory", "SourceReadError")
    assert "--decode-memory-mb" in failures["bomb"]["message"] and "--max-file-mb" in failures["big"]["message"]
    assert (summary.status, summary.stats.n_failed) == ("succeeded", 2)
