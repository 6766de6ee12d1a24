"""The shard core routes every fault to the tracks that cause it: an encoder that raises on some tracks, runs out
of memory, returns NaN, or a front end that fails on the encoder's device. Real encoders (tiny bring-your-own
networks, see tests/byo_encoders.py) on real decoded audio; the runners run the same core (the parity test)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow.parquet as pq
import torch

from catalog_embed.schemas.records import WorkItem
from catalog_embed.workers import failpoints
from catalog_embed.workers.encoders.sfnfnet import write_standin_weights
from catalog_embed.workers.rows import RowContext
from catalog_embed.workers.shard import Decoded, ShardEmbedder, ShardOutput
from catalog_embed.workers.stages import DecodeStage, EmbedStage, EncoderConfig, TrackFeatures
from tests.helpers.byo_encoders import loud_half, loud_nan_encoder, small_memory_encoder

ROWS = RowContext("run", "model", ("embedding",), "v1", "features")
LOGMEL = {
    "type": "logmel", "sample_rate": 16000, "n_fft": 512, "hop_length": 256, "n_mels": 32,
    "window_frames": 64, "hop_frames": 32, "log": "log10_1p_10000",
}  # fmt: skip


def _decoded(config: EncoderConfig, catalog) -> list[Decoded]:
    """The small catalog's tracks decoded for `config` (the broken ones as decode failures), as a runner hands
    them to the core."""
    rows = pq.read_table(catalog.manifest_path).to_pylist()
    stage = DecodeStage(config)
    return [(stage.process(WorkItem(row["track_id"], row["uri"], "fp")), 0.0) for row in rows]


def _process(config: EncoderConfig, decoded: list[Decoded]) -> tuple[ShardOutput, ShardEmbedder]:
    embedder = ShardEmbedder(config, ROWS)
    return embedder.process(("000-000000", decoded)), embedder


def _vectors(output: ShardOutput) -> dict[str, np.ndarray]:
    rows = output.embeddings.to_pylist()
    return {row["track_id"]: np.array(row["embedding"]) for row in rows}


def _failures(output: ShardOutput) -> dict[str, tuple[str, str]]:
    return {row["track_id"]: (row["stage"], row["error_type"]) for row in output.failures.to_pylist()}


def _good(decoded: list[Decoded]) -> list[str]:
    return [result.item.track_id for result, _ in decoded if isinstance(result, TrackFeatures)]


def test_an_encoder_error_costs_only_the_tracks_that_cause_it(small_catalog, tmp_path, monkeypatch):
    """Every track in one encoder call; two of them make it raise. Those two get `encode` failures rows; the others
    land with the embeddings they get when nothing raises."""
    config = EncoderConfig(model=str(loud_nan_encoder(tmp_path, math.inf)), batch_windows=10_000)
    decoded = _decoded(config, small_catalog)
    good = _good(decoded)
    reference, _ = _process(config, decoded)
    victims = [good[2], good[7]]
    monkeypatch.setenv(failpoints.ENV, ";".join(f"encode=raise:{victim}" for victim in victims))

    output, _ = _process(config, decoded)

    vectors, expected = _vectors(output), _vectors(reference)
    assert sorted(vectors) == sorted(set(good) - set(victims))
    for track_id, vector in vectors.items():
        np.testing.assert_allclose(vector, expected[track_id], atol=1e-6)
    failures = _failures(output)
    assert {victim: failures[victim] for victim in victims} == dict.fromkeys(victims, ("encode", "FailpointError"))
    assert len(failures) == len(decoded) - len(good) + len(victims)
    assert (output.stats.n_embedded, output.stats.n_failed) == (len(vectors), len(failures))


def test_out_of_memory_halves_the_batch_before_failing_anyone(small_catalog, tmp_path, monkeypatch):
    """A network that holds at most 5 windows per call, asked for 64: the core halves to 4 windows per call and
    every track lands, as with memory to spare. With no memory at all, every track fails alone at one window."""
    monkeypatch.syspath_prepend(str(tmp_path))
    roomy = EncoderConfig(model=str(small_memory_encoder(tmp_path, 10_000)), batch_windows=64)
    decoded = _decoded(roomy, small_catalog)
    good = _good(decoded)
    reference, _ = _process(roomy, decoded)

    output, embedder = _process(EncoderConfig(model=str(small_memory_encoder(tmp_path, 5)), batch_windows=64),
                                decoded)

    assert embedder._stage.batch_windows == 4
    vectors, expected = _vectors(output), _vectors(reference)
    assert sorted(vectors) == sorted(good)
    for track_id, vector in vectors.items():
        np.testing.assert_allclose(vector, expected[track_id], atol=1e-6)

    output, _ = _process(EncoderConfig(model=str(small_memory_encoder(tmp_path, 0)), batch_windows=64), decoded)
    assert output.embeddings.num_rows == 0
    failures = _failures(output)
    assert {failures[track_id] for track_id in good} == {("encode", "OutOfMemoryError")}


def test_non_finite_embeddings_are_failures_rows_never_table_rows(small_catalog, tmp_path):
    """The network returns NaN on the windows of the louder half of the tracks: those tracks get `encode` failures
    rows (NonFiniteEmbedding), the quieter half land, and every vector written is finite."""
    threshold, loud = loud_half(small_catalog.manifest_path, tmp_path)
    config = EncoderConfig(model=str(loud_nan_encoder(tmp_path, threshold)), batch_windows=10_000)
    decoded = _decoded(config, small_catalog)

    output, _ = _process(config, decoded)

    vectors = _vectors(output)
    assert loud and sorted(vectors) == sorted(set(_good(decoded)) - set(loud))
    assert all(np.isfinite(vector).all() for vector in vectors.values())
    failures = _failures(output)
    assert {track_id: failures[track_id] for track_id in loud} == dict.fromkeys(loud, ("encode", "NonFiniteEmbedding"))


def test_a_front_end_error_on_the_encoders_device_costs_one_track(small_catalog, tmp_path):
    """With the front end on the encoder's device, a waveform it cannot take (two channels) fails its own track
    (stage `frontend`), not the batch it shares with the others."""
    config = EncoderConfig(
        model=str(loud_nan_encoder(tmp_path, math.inf, front_end=LOGMEL)), batch_windows=10_000, front_end_on="encoder"
    )
    decoded = _decoded(config, small_catalog)
    good = _good(decoded)
    victim = next(r for r, _ in decoded if isinstance(r, TrackFeatures) and r.item.track_id == good[3])
    victim.waveform = torch.stack([victim.waveform, victim.waveform])

    output, _ = _process(config, decoded)

    assert sorted(_vectors(output)) == sorted(set(good) - {good[3]})
    assert _failures(output)[good[3]] == ("frontend", "FrontEndError")


def test_a_shard_reports_its_counts_and_stage_times(small_catalog, tmp_path):
    config = EncoderConfig(model=str(loud_nan_encoder(tmp_path, math.inf)))
    decoded = _decoded(config, small_catalog)
    output, embedder = _process(config, decoded)
    good = _good(decoded)
    assert (output.stats.n_embedded, output.stats.n_failed) == (len(good), len(decoded) - len(good))
    assert {"load_model", "decode", "encode"} <= set(output.stats.stage_seconds)
    again = embedder.process(("000-000001", decoded))
    assert "load_model" not in again.stats.stage_seconds  # loaded once, reported once


def test_out_of_memory_recompiles_a_compiled_network_for_the_smaller_batch(tmp_path):
    """A compiled network pads each call to its compiled size: shrinking only the batch would save no memory."""
    weights = write_standin_weights(tmp_path)
    stage = EmbedStage(EncoderConfig(model="mule-sfnfnet-f0", weights=weights, batch_windows=8, compile=True))
    stage.setup()
    assert stage.model.fixed_batch == 8  # compiling is lazy: nothing is compiled before the first call
    assert stage.shrink_batch() and stage.batch_windows == 4 and stage.model.fixed_batch == 4
    for _ in range(2):
        stage.shrink_batch()
    assert stage.batch_windows == 1 and stage.model.fixed_batch == 1 and stage.shrink_batch() is False


def test_a_batch_is_embedded_before_the_next_track_would_spill_out_of_it(small_catalog, tmp_path, monkeypatch):
    """On a GPU every call's last batch is padded to the fixed size: a track spilling into a second batch would pad
    nearly a whole one. So a call holds at most one batch of windows, unless a single track has more; and the
    embeddings are the ones of one big call."""
    config = EncoderConfig(model=str(loud_nan_encoder(tmp_path, math.inf)), batch_windows=10_000)
    decoded = _decoded(config, small_catalog)
    reference, _ = _process(config, decoded)
    counts = sorted(result.n_windows for result, _ in decoded if isinstance(result, TrackFeatures))
    size = counts[-1] + counts[0] + counts[0] // 2  # two tracks fit, and half of a third
    calls: list[list[int]] = []
    process = EmbedStage.process

    def recorded(stage: EmbedStage, tracks: list[TrackFeatures]) -> list:
        calls.append([track.n_windows for track in tracks])
        return process(stage, tracks)

    monkeypatch.setattr(EmbedStage, "process", recorded)
    output, _ = _process(dataclasses.replace(config, batch_windows=size), decoded)

    assert all(sum(call) <= size for call in calls), calls
    assert sum(map(sum, calls)) == sum(counts) and len(calls) < len(counts)  # tracks still share calls
    vectors = _vectors(output)
    for track_id, vector in _vectors(reference).items():
        np.testing.assert_allclose(vectors[track_id], vector, atol=1e-6)
