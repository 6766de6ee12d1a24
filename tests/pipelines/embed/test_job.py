"""The embed job end to end on real audio with the real musicnn weights: tables, reruns, failures, config errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import ConfigError, EncoderError, RunAbortedError
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES, RUNS, WINDOWS
from catalog_embed.workers.audio import DecodeConfig, load_audio
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.stages import EncoderConfig

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def first_run(small_catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    config = EmbedConfig(
        catalog=str(small_catalog.manifest_path),
        out=str(out),
        encoder=EncoderConfig(layers=("penultimate", "taggram")),
        write_windows=True,
    )
    return config, run_embed(config, QUIET)


def test_every_good_track_lands_once_and_every_broken_file_fails_once(first_run, small_labels):
    config, summary = first_run
    store = TableStore(config.out)
    good = sorted(label["track_id"] for label in small_labels if label["broken"] is None)
    bad = sorted(label["track_id"] for label in small_labels if label["broken"] is not None)
    embeddings = store.read(EMBEDDINGS).sort_by("track_id")
    assert embeddings["track_id"].to_pylist() == good
    assert set(embeddings["model"].to_pylist()) == {"musicnn-msd"}
    assert set(embeddings["dim"].to_pylist()) == {200}
    vectors = np.array(embeddings["embedding"].to_pylist(), np.float32)
    assert vectors.shape == (len(good), 200) and np.isfinite(vectors).all()
    assert len({v.tobytes() for v in vectors}) == len(good)  # distinct music, distinct embeddings
    taggram = np.array(embeddings["embedding_taggram"].to_pylist())
    assert taggram.shape == (len(good), 50) and ((taggram >= 0) & (taggram <= 1)).all()
    failures = store.read(FAILURES).sort_by("track_id")
    assert failures["track_id"].to_pylist() == bad
    reasons = {r["track_id"]: r for r in failures.to_pylist()}
    by_kind = {label["broken"]: reasons[label["track_id"]] for label in small_labels if label["broken"]}
    assert by_kind["missing"]["error_type"] == "SourceReadError"
    assert by_kind["empty"]["error_type"] == "AudioDecodeError"
    assert by_kind["not_audio"]["stage"] == "decode"
    assert summary.stats.n_embedded == len(good) and summary.stats.n_failed == len(bad)
    windows = store.read(WINDOWS)
    assert windows.num_rows == len(good)
    assert all(len(s) == len(e) >= 1 for s, e in zip(windows["start_s"].to_pylist(), windows["embedding"].to_pylist(), strict=True))


def test_the_runs_row_records_version_licence_config_and_throughput(first_run):
    config, summary = first_run
    row = TableStore(config.out).read(RUNS, filter_=pa.compute.field("run_id") == summary.run_id).to_pylist()[0]
    assert row["status"] == "succeeded"
    encoder = get_encoder("musicnn-msd")
    encoder.prepare()
    assert row["model_version"] == encoder.version
    assert row["licence_code"] == "ISC" and row["licence_weights"] == "ISC"
    assert '"write_windows": true' in row["config_json"]
    assert row["audio_seconds"] == pytest.approx(12 * 4.0, abs=0.5)
    assert row["compute_s_per_audio_hour"] > 0


def test_pipeline_embedding_equals_the_encoder_applied_directly(first_run, small_catalog, small_labels):
    config, _ = first_run
    label = next(la for la in small_labels if la["broken"] is None and la["codec"] == "flac")
    encoder = get_encoder("musicnn-msd")
    encoder.load("cpu")
    audio = load_audio(str(small_catalog.root / "audio" / f"{label['track_id']}.flac"), 16_000)
    windows = encoder.front_end()(torch.from_numpy(audio.samples))
    expected = encoder.embed(windows)["penultimate"].mean(dim=0).numpy()
    row = TableStore(config.out).read(EMBEDDINGS, filter_=pa.compute.field("track_id") == label["track_id"])
    np.testing.assert_allclose(row["embedding"].to_pylist()[0], expected, atol=1e-5)


def test_rerun_embeds_nothing_and_duplicates_nothing(first_run):
    config, _ = first_run
    again = run_embed(config, QUIET)
    assert again.plan.items == ()
    assert again.stats.n_embedded == again.stats.n_failed == 0
    con = connect(config.out)
    assert con.execute("SELECT count(*), count(DISTINCT track_id) FROM embeddings").fetchone() == (12, 12)
    assert con.execute("SELECT count(*) FROM failures").fetchone() == (6,)
    assert con.execute("SELECT n_planned, n_skipped FROM runs WHERE run_id = ?", [again.run_id]).fetchone() == (0, 18)


def test_changed_files_are_reembedded_and_replace_their_rows(small_catalog, tmp_path):
    catalog = tmp_path / "catalog"
    shutil.copytree(small_catalog.root, catalog)
    manifest = pq.read_table(catalog / "manifest.parquet")
    uris = [u.replace(str(small_catalog.root), str(catalog)) for u in manifest["uri"].to_pylist()]
    pq.write_table(manifest.set_column(1, "uri", pa.array(uris)), catalog / "manifest.parquet")
    config = EmbedConfig(catalog=str(catalog / "manifest.parquet"), out=str(tmp_path / "out"))
    first = run_embed(config, QUIET)
    ids = manifest["track_id"].to_pylist()
    wav = next(u for u in uris if u.endswith(".wav"))
    other_wav_id = ids[uris.index(wav)]
    flac = next(u for u in uris if u.endswith(".flac") and os.path.getsize(u) > 10_000)
    shutil.copy(flac, wav.replace(".wav", ".flac"))
    os.replace(wav.replace(".wav", ".flac"), wav.replace(".wav", ".tmp"))
    shutil.copy(wav.replace(".wav", ".tmp"), wav)  # new content under the same name
    second = run_embed(config, QUIET)
    assert [item.track_id for item in second.plan.items] == [other_wav_id]
    assert second.plan.n_changed == 1
    rows = TableStore(config.out).read(EMBEDDINGS).to_pylist()
    assert len(rows) == first.stats.n_embedded
    assert next(r for r in rows if r["track_id"] == other_wav_id)["run_id"] == second.run_id


def test_a_run_broken_as_a_whole_aborts_and_commits_no_rows(tmp_path):
    for i in range(25):
        (tmp_path / f"t{i:02d}.mp3").write_text("<html>not audio</html>")
    config = EmbedConfig(catalog=str(tmp_path), out=str(tmp_path / "out"), shard_size=5)
    with pytest.raises(RunAbortedError, match="--max-failure-ratio"):
        run_embed(config, QUIET)
    con = connect(config.out)
    assert con.execute("SELECT count(*) FROM failures").fetchone() == (0,)
    assert con.execute("SELECT status FROM runs").fetchall() == [("aborted",)]


@pytest.mark.parametrize(
    ("changes", "error", "needle"),
    [
        ({"encoder": EncoderConfig(model="nope")}, EncoderError, "unknown model 'nope'"),
        ({"encoder": EncoderConfig(layers=("nope",))}, EncoderError, "has no layer 'nope'"),
        ({"encoder": EncoderConfig(device="cuda")}, EncoderError, "--device cpu"),
        ({"workers": 0}, ConfigError, "--workers"),
        ({"max_failure_ratio": 2.0}, ConfigError, "--max-failure-ratio"),
        ({"decode": DecodeConfig(max_memory_mb=16)}, ConfigError, "--decode-memory-mb"),
        ({"runner": "spark"}, ConfigError, "--runner must be one of local, beam, dataflow, ray, got 'spark'"),
    ],
)
def test_bad_configuration_fails_before_any_work(small_catalog, tmp_path, changes, error, needle):
    if "cuda" in str(changes) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = EmbedConfig(catalog=str(small_catalog.manifest_path), out=str(tmp_path / "out"), **changes)
    with pytest.raises(error, match=needle):
        run_embed(config, QUIET)
    assert not (tmp_path / "out").exists()


def test_cli_embed_models_and_query(small_catalog, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["embed", "--catalog", str(small_catalog.manifest_path), "--out", out, "--workers", "1"]) == 0
    assert main(["query", "--out", out, "SELECT count(*) AS n FROM embeddings"]) == 0
    assert "12" in capsys.readouterr().out
    assert main(["embed", "--catalog", str(tmp_path / "missing.csv"), "--out", out]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "musicnn-msd" in listing and "musicnn-mtt" in listing
