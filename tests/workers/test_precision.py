"""Mixed precision and the GPU path, checked on the CPU: bf16 stays close to fp32, fp16 is refused there, the
front end computed on the encoder's device gives the embeddings it gives in the decode workers, and batches are
sized to the device."""

from __future__ import annotations

import dataclasses
import wave

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from catalog_embed.schemas.errors import EncoderError
from catalog_embed.schemas.records import WorkItem
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.encoders.sfnfnet import write_standin_weights
from catalog_embed.workers.stages import CPU_BATCH_WINDOWS, DecodeStage, EmbedStage, EncoderConfig, TrackFeatures
from tests.helpers.reference import MUSICNN_REFERENCE

MIN_COSINE = 0.999
SIGNALS = ("chord_16k_mono", "chord_44k1_stereo")


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def loaded(name: str, precision: str, **options: str):
    encoder = get_encoder(name, **options)
    encoder.load("cpu", precision)
    return encoder


def test_musicnn_bf16_stays_within_cosine_0999_of_fp32() -> None:
    """On the reference patches (the `batch` arrays the original musicnn was fed), every layer we write."""
    fp32, bf16 = loaded("musicnn-msd", "fp32"), loaded("musicnn-msd", "bf16")
    layers = ("penultimate", "pool", "taggram")
    for signal in SIGNALS:
        patches = torch.from_numpy(np.load(MUSICNN_REFERENCE / f"{signal}__MSD_musicnn.npz")["batch"])
        reference, reduced = fp32.embed(patches, layers), bf16.embed(patches, layers)
        for layer in layers:
            assert reduced[layer].dtype == torch.float32
            assert min_cosine(reference[layer], reduced[layer]) >= MIN_COSINE, (signal, layer)


@pytest.fixture(scope="module")
def standin_mule(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SF-NFNet-F0 with seeded random weights (skip gains non-zero, so every block contributes), as a converted
    weights directory. The released weights are not available here; the precision of the arithmetic is what is
    under test."""
    return write_standin_weights(tmp_path_factory.mktemp("mule_standin"))


@pytest.mark.slow
def test_mule_bf16_stays_within_cosine_0999_of_fp32(standin_mule: str) -> None:
    with wave.open(str(MUSICNN_REFERENCE / "chord_16k_mono.wav")) as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768.0
    fp32 = loaded("mule-sfnfnet-f0", "fp32", weights=standin_mule)
    bf16 = loaded("mule-sfnfnet-f0", "bf16", weights=standin_mule)
    slices = fp32.front_end()(torch.from_numpy(samples[: 16000 * 3]))  # one slice keeps this test short
    layers = ("embedding", "slow_stage2")
    reference, reduced = fp32.embed(slices, layers), bf16.embed(slices, layers)
    for layer in layers:
        assert min_cosine(reference[layer], reduced[layer]) >= MIN_COSINE, layer


def test_fp16_is_refused_on_the_cpu() -> None:
    with pytest.raises(EncoderError, match="fp16 needs a GPU: on the CPU use --precision bf16"):
        EncoderConfig(precision="fp16").build()
    with pytest.raises(EncoderError, match="fp16 needs a GPU"):
        get_encoder("mfcc-stats").load("cpu", "fp16")
    with pytest.raises(EncoderError, match="unknown precision 'fp8'"):
        EncoderConfig(precision="fp8").build()
    # On a GPU fp16 is a valid choice; the config is checked without needing one here.
    assert EncoderConfig(device="cuda", precision="fp16").build().name == "musicnn-msd"


@pytest.fixture(scope="module")
def decoded_items(small_catalog, small_labels) -> list[WorkItem]:
    good = {label["track_id"] for label in small_labels if label["broken"] is None}
    rows = [row for row in pq.read_table(small_catalog.manifest_path).to_pylist() if row["track_id"] in good]
    return [WorkItem(track_id=row["track_id"], uri=row["uri"], fingerprint="") for row in rows[:3]]


# Waveforms shipped to the encoder's device in float16 and resampled there, against float32 resampled by soxr next to
# the decoder: measured at most 4e-7 cosine distance per window (musicnn, 40 demo tracks), the float16 rounding.
PLACEMENT_MIN_COSINE = 1 - 1e-5


@pytest.mark.parametrize("model", ["musicnn-msd", "mfcc-stats"])
def test_front_end_on_the_encoder_gives_the_decode_workers_embeddings(model: str, decoded_items) -> None:
    """The GPU path (native-rate float16 waveforms to the encoder, resampled and made into spectrograms there) forced
    on the CPU: the same windows, durations and, within float16's rounding, the same embeddings."""
    results = {}
    for placement in ("decoder", "encoder"):
        # Batches of two windows span tracks (tests/workers/test_custom_encoders.py splits tracks across batches).
        config = EncoderConfig(model=model, front_end_on=placement, batch_windows=2)
        decode = DecodeStage(config)
        tracks = [decode(item) for item in decoded_items]
        assert all(isinstance(t, TrackFeatures) for t in tracks)
        if placement == "encoder":
            assert all(t.windows is None and t.waveform.dtype == torch.float16 for t in tracks)
            # The files' own rates, not resampled by the decoder (rendered at 44.1 kHz; Opus decodes at 48 kHz).
            assert {t.sample_rate for t in tracks} == {44_100, 48_000}
        results[placement] = (tracks, EmbedStage(config, keep_timeline=True)(tracks))
    (on_decoder, worker_rows), (on_encoder, device_rows) = results["decoder"], results["encoder"]
    for decoded, shipped, worker, device in zip(on_decoder, on_encoder, worker_rows, device_rows, strict=True):
        assert decoded.n_windows == shipped.n_windows == worker.n_windows == device.n_windows == len(decoded.windows)
        assert decoded.starts == shipped.starts and decoded.duration_s == shipped.duration_s
        assert worker.pooled.keys() == device.pooled.keys()
        for layer, vector in worker.pooled.items():
            assert min_cosine(torch.from_numpy(device.pooled[layer])[None], torch.from_numpy(vector)[None]) > (
                PLACEMENT_MIN_COSINE
            ), layer
        assert min_cosine(torch.from_numpy(device.timeline), torch.from_numpy(worker.timeline)) > PLACEMENT_MIN_COSINE


def test_a_rate_the_device_cannot_take_is_resampled_by_the_decoder(tmp_path) -> None:
    """44,099 Hz shares no factor with 16 kHz but 1: soxr's filter as taps would take gigabytes on the device."""
    path = tmp_path / "odd-rate.wav"
    t = np.arange(44_099 * 4) / 44_099
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(44_099)
        wav.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    item = WorkItem("odd", str(path), "")
    config = EncoderConfig(model="musicnn-msd", front_end_on="encoder", batch_windows=2)
    shipped = DecodeStage(config)(item)
    assert shipped.sample_rate == 16_000 and shipped.waveform.dtype == torch.float16
    on_decoder = DecodeStage(EncoderConfig(model="musicnn-msd", batch_windows=2))(item)
    assert shipped.starts == on_decoder.starts and shipped.duration_s == on_decoder.duration_s
    [row] = EmbedStage(config)([shipped])
    [expected] = EmbedStage(dataclasses.replace(config, front_end_on="decoder"))([on_decoder])
    vectors = [torch.from_numpy(r.pooled["penultimate"])[None] for r in (row, expected)]
    assert min_cosine(*vectors) > PLACEMENT_MIN_COSINE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_path_gives_the_cpu_paths_embeddings(decoded_items) -> None:
    """On a GPU by default: float16 waveforms pinned, resampled and made into spectrograms on the device, the
    network in batches of one fixed shape under cuDNN's autotuner; against the CPU's decode-side front end."""
    cpu_config = EncoderConfig(model="musicnn-msd", batch_windows=4)
    gpu_config = EncoderConfig(model="musicnn-msd", device="cuda", batch_windows=4, compile=False)
    on_cpu = EmbedStage(cpu_config, keep_timeline=True)([DecodeStage(cpu_config)(item) for item in decoded_items])
    shipped = [DecodeStage(gpu_config)(item).pinned() for item in decoded_items]
    assert all(track.waveform.is_pinned() and track.waveform.dtype == torch.float16 for track in shipped)
    stage = EmbedStage(gpu_config, keep_timeline=True)
    on_gpu = stage(shipped)
    assert stage.model.fixed_batch == 4 and torch.backends.cudnn.benchmark
    for cpu_row, gpu_row in zip(on_cpu, on_gpu, strict=True):
        assert cpu_row.n_windows == gpu_row.n_windows
        assert min_cosine(torch.from_numpy(gpu_row.timeline), torch.from_numpy(cpu_row.timeline)) > PLACEMENT_MIN_COSINE


def test_front_end_placement_and_batch_size_follow_the_device() -> None:
    assert not EncoderConfig(device="cpu").front_end_on_encoder
    assert EncoderConfig(device="cuda:0").front_end_on_encoder
    assert not EncoderConfig(device="cuda", front_end_on="decoder").front_end_on_encoder
    assert EncoderConfig(device="cpu").windows_per_batch() == CPU_BATCH_WINDOWS
    assert EncoderConfig(device="cpu", batch_windows=7).sized().batch_windows == 7
    assert EncoderConfig(device="cuda").windows_per_batch(device_is_here=False) == 256
