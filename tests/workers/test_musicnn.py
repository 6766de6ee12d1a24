"""The musicnn port against the original's outputs (`shared/reference/musicnn` beside the checkout), layer by layer.

Reference files were made by musicnn 0.1.0 on TensorFlow. Tolerances are the reference notes': relative ones are
`max |ours - reference| / max |reference|` over the whole array; the taggram (probabilities in [0, 1]) is
compared in absolute terms. The weights come from the pinned wheel through the default weights cache: fetched
and converted on first use, offline afterwards.
"""

from __future__ import annotations

import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog_embed.schemas.errors import EncoderError, FrontEndError
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.encoders.musicnn import MSD_TAGS, MTT_TAGS, Musicnn, MusicnnFrontEnd
from catalog_embed.workers.encoders.weights import cache_dir
from tests.helpers.reference import MUSICNN_REFERENCE

REFERENCE = MUSICNN_REFERENCE
LAYER_TOLERANCE = 2.5e-5
TAGGRAM_TOLERANCE = 1e-5
RAW_AUDIO_TOLERANCE = 1e-4


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 of a 16-bit PCM wav, scaled by 1/32768 like librosa."""
    with wave.open(str(path)) as wav:
        assert wav.getsampwidth() == 2
        frames = wav.readframes(wav.getnframes())
        samples = np.frombuffer(frames, dtype="<i2").reshape(-1, wav.getnchannels())
        return samples.astype(np.float32) / 32768.0, wav.getframerate()


@pytest.fixture(scope="module")
def encoders() -> dict[str, Musicnn]:
    loaded = {}
    for variant in ("MSD", "MTT"):
        encoder = get_encoder(f"musicnn-{variant.lower()}")
        encoder.load("cpu")
        loaded[variant] = encoder
    return loaded


@pytest.fixture(scope="module")
def mono_16k() -> torch.Tensor:
    samples, rate = read_wav(REFERENCE / "chord_16k_mono.wav")
    assert rate == 16_000 and samples.shape[1] == 1
    return torch.from_numpy(samples[:, 0].copy())


def test_registry_metadata() -> None:
    for variant, tags in (("MSD", MSD_TAGS), ("MTT", MTT_TAGS)):
        encoder = get_encoder(f"musicnn-{variant.lower()}")
        assert isinstance(encoder, Musicnn) and encoder.variant == variant
        assert encoder.name == f"musicnn-{variant.lower()}"
        assert str(encoder.licence) == "code ISC, weights ISC"
        assert encoder.default_layer == "penultimate"
        dims = {spec.name: spec.dim for spec in encoder.layers}
        assert dims == {"penultimate": 200, "pool": 1506, "max_pool": 753, "mean_pool": 753, "taggram": 50}
        names = (REFERENCE / f"tags_{variant}.txt").read_text().splitlines()
        assert encoder.layer("taggram").labels == tags == tuple(names)
    with pytest.raises(EncoderError, match="unknown musicnn variant 'XYZ'"):
        Musicnn("XYZ")


def test_weights_are_cached_and_versioned(encoders: dict[str, Musicnn]) -> None:
    for variant, encoder in encoders.items():
        assert encoder.weights_path == cache_dir() / "musicnn" / f"{variant}-f38a4890c648c1dd.safetensors"
        assert encoder.weights_path.is_file()
        assert re.fullmatch(r"[0-9a-f]{16}", encoder.version)
    assert encoders["MSD"].version != encoders["MTT"].version


def test_conversion_is_deterministic(encoders: dict[str, Musicnn], tmp_path, monkeypatch) -> None:
    # Convert again into an empty cache, from the wheel already in the default one, offline.
    monkeypatch.setenv("CATALOG_EMBED_WHEELS", str(cache_dir() / "wheels"))
    monkeypatch.setenv("CATALOG_EMBED_CACHE", str(tmp_path))
    monkeypatch.setenv("CATALOG_EMBED_OFFLINE", "1")
    fresh = Musicnn("MTT")
    fresh.prepare()
    assert fresh.weights_path.parent == tmp_path / "musicnn"
    assert fresh.version == encoders["MTT"].version
    cached = Musicnn("MTT")
    cached.prepare()
    assert cached.version == fresh.version


@pytest.mark.parametrize("source", ["chord_16k_mono", "chord_44k1_stereo"])
@pytest.mark.parametrize("variant", ["MSD", "MTT"])
def test_every_layer_matches_the_original(encoders: dict[str, Musicnn], variant: str, source: str) -> None:
    reference = np.load(REFERENCE / f"{source}__{variant}_musicnn.npz")
    layers = {key.removeprefix("layer_"): reference[key] for key in reference.files if key.startswith("layer_")}
    assert len(layers) == 21
    batch = torch.from_numpy(reference["batch"])
    encoder = encoders[variant]
    with torch.inference_mode():
        ours = encoder._net(batch, keep=frozenset(layers))  # noqa: SLF001 (intermediate layers under test)
    for name, expected in layers.items():
        got = ours[name].numpy()
        assert got.shape == expected.shape, name
        assert relative_error(got, expected) <= LAYER_TOLERANCE, name
    assert np.abs(ours["taggram"].numpy() - reference["taggram"]).max() <= TAGGRAM_TOLERANCE

    # The public path (which runs CPU batches in small pieces) meets the same tolerances.
    public = encoder.embed(batch, ("penultimate", "pool", "max_pool", "mean_pool", "taggram"))
    for name, source_name in (("penultimate", "penultimate"), ("pool", "flat_pool"), ("max_pool", "max_pool"),
                              ("mean_pool", "mean_pool")):  # fmt: skip
        assert public[name].dtype == torch.float32
        assert public[name].shape == (batch.shape[0], encoder.layer(name).dim)
        assert relative_error(public[name].numpy(), layers[source_name]) <= LAYER_TOLERANCE, name
    assert np.abs(public["taggram"].numpy() - reference["taggram"]).max() <= TAGGRAM_TOLERANCE
    pool = public["pool"].numpy()
    np.testing.assert_array_equal(pool[:, 0::2], public["max_pool"].numpy())
    np.testing.assert_array_equal(pool[:, 1::2], public["mean_pool"].numpy())


@pytest.mark.parametrize("variant", ["MSD", "MTT"])
def test_raw_16k_audio_through_the_front_end(encoders: dict[str, Musicnn], mono_16k: torch.Tensor,
                                             variant: str) -> None:  # fmt: skip
    reference = np.load(REFERENCE / f"chord_16k_mono__{variant}_musicnn.npz")
    np.testing.assert_array_equal(mono_16k.numpy(), reference["audio"])
    front_end = encoders[variant].front_end()
    assert relative_error(front_end.mel_power(mono_16k).numpy(), reference["mel_power"]) <= RAW_AUDIO_TOLERANCE
    # One float16 rounding step of the mel power moves its log by at most log10(1 + 2**-10) = 4.2e-4, under 1e-4
    # of this spectrogram's maximum (4.29): the float16 rounding cannot make these comparisons flaky.
    assert relative_error(front_end.spectrogram(mono_16k).numpy(), reference["spectrogram"]) <= RAW_AUDIO_TOLERANCE
    windows = front_end(mono_16k)
    assert windows.shape == reference["batch"].shape
    assert relative_error(windows.numpy(), reference["batch"]) <= RAW_AUDIO_TOLERANCE
    taggram = encoders[variant].embed(windows, ("taggram",))["taggram"].numpy()
    assert np.abs(taggram - reference["taggram"]).max() <= RAW_AUDIO_TOLERANCE
    assert front_end.window_starts(mono_16k.numel()) == pytest.approx([0.0, 2.992, 5.984])


def test_short_audio_yields_exactly_one_window(encoders: dict[str, Musicnn], mono_16k: torch.Tensor) -> None:
    front_end = MusicnnFrontEnd()
    one_second = mono_16k[16_000:32_000]
    windows = front_end(one_second)
    assert windows.shape == (1, 187, 96)
    assert front_end.window_starts(one_second.numel()) == [0.0]
    padded = torch.nn.functional.pad(one_second, (0, front_end.window_samples - one_second.numel()))
    torch.testing.assert_close(windows, front_end(padded), rtol=0, atol=0)
    embedding = encoders["MSD"].embed(windows)["penultimate"]
    assert embedding.shape == (1, 200) and torch.isfinite(embedding).all()


@pytest.mark.parametrize("n_samples", [1, 47_615, 47_616, 95_487, 95_488, 160_000])
def test_window_starts_agree_with_forward(n_samples: int) -> None:
    front_end = MusicnnFrontEnd()
    windows = front_end(torch.zeros(n_samples))
    starts = front_end.window_starts(n_samples)
    assert len(starts) == windows.shape[0] == max(1, (1 + n_samples // 256) // 187)
    assert starts == pytest.approx([i * 187 * 256 / 16_000 for i in range(len(starts))])


def test_front_end_rejects_bad_waveforms() -> None:
    front_end = MusicnnFrontEnd()
    with pytest.raises(FrontEndError, match="non-empty mono"):
        front_end(torch.zeros(0))
    with pytest.raises(FrontEndError, match="non-empty mono"):
        front_end(torch.zeros(2, 48_000))
    assert front_end.sample_rate == 16_000
    assert front_end.window_samples == 47_616
    assert front_end.config_hash() == MusicnnFrontEnd().config_hash()


def test_windows_are_embedded_independently_of_their_batch(encoders: dict[str, Musicnn]) -> None:
    generator = torch.Generator().manual_seed(0)
    windows = torch.rand(3, 187, 96, generator=generator) * 4
    encoder = encoders["MTT"]
    together = encoder.embed(windows, ("penultimate", "taggram"))
    for i in range(windows.shape[0]):
        alone = encoder.embed(windows[i : i + 1], ("penultimate", "taggram"))
        for name, value in alone.items():
            torch.testing.assert_close(value[0], together[name][i], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["MSD", "MTT"])
def test_cuda_matches_the_original(variant: str) -> None:
    reference = np.load(REFERENCE / f"chord_44k1_stereo__{variant}_musicnn.npz")
    encoder = get_encoder(f"musicnn-{variant.lower()}")
    encoder.load("cuda")
    allow_tf32 = torch.backends.cudnn.allow_tf32
    outputs = encoder.embed(torch.from_numpy(reference["batch"]), ("penultimate", "pool", "taggram"))
    for name, source_name in (("penultimate", "layer_penultimate"), ("pool", "layer_flat_pool")):
        assert relative_error(outputs[name].cpu().numpy(), reference[source_name]) <= LAYER_TOLERANCE, name
    assert np.abs(outputs["taggram"].cpu().numpy() - reference["taggram"]).max() <= TAGGRAM_TOLERANCE
    assert torch.backends.cudnn.allow_tf32 == allow_tf32  # the process-wide setting is left as it was


def test_no_windows_give_empty_outputs(encoders: dict[str, Musicnn]) -> None:
    outputs = encoders["MSD"].embed(torch.zeros(0, 187, 96), ("pool", "taggram"))
    assert outputs["pool"].shape == (0, 1506) and outputs["taggram"].shape == (0, 50)


def test_unknown_layer_and_bad_windows_raise(encoders: dict[str, Musicnn]) -> None:
    encoder = encoders["MSD"]
    with pytest.raises(EncoderError, match="no layer 'logits'.*penultimate, pool"):
        encoder.embed(torch.zeros(1, 187, 96), ("penultimate", "logits"))
    with pytest.raises(EncoderError, match=r"expects \(n, 187, 96\) windows"):
        encoder.embed(torch.zeros(1, 96, 187))
    with pytest.raises(EncoderError, match="not loaded"):
        get_encoder("musicnn-msd").embed(torch.zeros(1, 187, 96))
