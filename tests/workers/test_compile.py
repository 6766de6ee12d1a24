"""`--compile`: torch.compile of the built-in networks on the CPU (inductor, with the C++ compiler CI has), in
batches of one fixed shape, against eager within each encoder's tolerance, and its on-disk cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from catalog_embed.pipelines.cli import build_parser
from catalog_embed.pipelines.embed.config import config_from_args
from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.encoders.base import INDUCTOR_CACHE_ENV, inductor_cache_dir
from catalog_embed.workers.encoders.sfnfnet import write_standin_weights
from catalog_embed.workers.stages import EmbedStage, EncoderConfig
from tests.helpers.reference import MUSICNN_REFERENCE

# test_musicnn.py holds the port to 2.5e-5 of the original (relative to the layer's largest value) and the
# taggram to 1e-5; sfnfnet's tests hold it to atol = rtol = 1e-4.
MUSICNN_LAYER_TOLERANCE = 2.5e-5
MUSICNN_TAGGRAM_TOLERANCE = 1e-5
MULE_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(autouse=True)
def _own_inductor_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled code goes to this session's temporary folder (the weights stay in the usual cache), and compiled
    graphs do not outlive a test."""
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path_factory.getbasetemp() / "inductor"))
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_musicnn_matches_eager_in_fixed_shape_batches() -> None:
    """Five reference windows through a network compiled for batches of 4, which on a CPU runs the network on 2
    windows at a time: two full calls and one padded one.

    Inductor compiles C++ for the CPU here: about 40 s cold on 2 idle cores (5 min under a load of 20)."""
    batch = torch.from_numpy(np.load(MUSICNN_REFERENCE / "chord_44k1_stereo__MSD_musicnn.npz")["batch"])
    windows = torch.cat([batch, batch])[:5]
    eager, compiled = get_encoder("musicnn-msd"), get_encoder("musicnn-msd")
    eager.load("cpu")
    compiled.load("cpu")
    compiled.compile(4)
    assert compiled.fixed_batch == 2
    layers = ("penultimate", "pool", "taggram")
    expected, got = eager.embed(windows, layers), compiled.embed(windows, layers)
    for name in layers:
        assert got[name].shape == expected[name].shape == (5, compiled.layer(name).dim), name
    assert relative_error(got["penultimate"], expected["penultimate"]) <= MUSICNN_LAYER_TOLERANCE
    assert relative_error(got["pool"], expected["pool"]) <= MUSICNN_LAYER_TOLERANCE
    assert (got["taggram"] - expected["taggram"]).abs().max() <= MUSICNN_TAGGRAM_TOLERANCE
    assert type(compiled._net).__name__ == "OptimizedModule"  # noqa: SLF001 (the network really is compiled)
    # Compiled code was written where the cache is configured, for the next process to load.
    assert any(path.is_file() for path in inductor_cache_dir().rglob("*")), "nothing in the configured cache"


@pytest.mark.slow
def test_compiled_mule_matches_eager(tmp_path) -> None:
    """SF-NFNet-F0 (stand-in weights) compiled for batches of 2, on three slices: one call padded."""
    weights = write_standin_weights(tmp_path)
    eager = get_encoder("mule-sfnfnet-f0", weights=weights)
    compiled = get_encoder("mule-sfnfnet-f0", weights=weights)
    eager.load("cpu")
    compiled.load("cpu")
    compiled.compile(2)
    slices = torch.randn(3, 1, 96, 300, generator=torch.Generator().manual_seed(0))
    layers = ("embedding", "slow_stage2")
    expected, got = eager.embed(slices, layers), compiled.embed(slices, layers)
    for name in layers:
        torch.testing.assert_close(got[name], expected[name], **MULE_TOLERANCE)


def test_embed_stage_compiles_when_configured(tmp_path) -> None:
    """`EncoderConfig(compile=True)` reaches the encoder: EmbedStage compiles it for its batch size (lazily: the
    first batch would compile, which the tests above cover), and only then."""
    weights = write_standin_weights(tmp_path)
    stage = EmbedStage(EncoderConfig(model="mule-sfnfnet-f0", weights=weights, batch_windows=3, compile=True))
    stage.setup()
    assert stage.model.fixed_batch == 3
    assert type(stage.model._net).__name__ == "OptimizedModule"  # noqa: SLF001
    eager = EmbedStage(EncoderConfig(model="mule-sfnfnet-f0", weights=weights, batch_windows=3))
    eager.setup()
    assert eager.model.fixed_batch is None


def test_the_compile_flag_reaches_the_encoder_config() -> None:
    def config(*flags: str) -> EncoderConfig:
        return config_from_args(build_parser().parse_args(["embed", "--catalog", "c", "--out", "o", *flags])).encoder

    assert config("--compile").compile is True
    assert config("--no-compile").compile is False
    assert config().compile is None
    musicnn, handcrafted = get_encoder("musicnn-msd"), get_encoder("mfcc-stats")
    # By default compiled on a GPU (where it was measured to win), where it applies; eager on the CPU.
    assert EncoderConfig(device="cuda").compiles(musicnn)
    assert not EncoderConfig(device="cuda").compiles(handcrafted)
    assert not EncoderConfig(device="cpu").compiles(musicnn)
    assert EncoderConfig(device="cpu", compile=True).compiles(musicnn)
    assert not EncoderConfig(device="cuda", compile=False).compiles(musicnn)


def test_compile_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(EncoderError, match="'mfcc-stats' has no PyTorch network to compile"):
        EncoderConfig(model="mfcc-stats", compile=True).build()
    with pytest.raises(EncoderError, match="not loaded"):
        get_encoder("musicnn-msd").compile(8)
    encoder = get_encoder("musicnn-msd")
    encoder.load("cpu")
    with pytest.raises(EncoderError, match="at least 1 window"):
        encoder.compile(0)


def test_inductor_cache_follows_the_catalog_embed_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = get_encoder("musicnn-msd")
    encoder.load("cpu")  # weights from the usual cache, before it moves
    monkeypatch.delenv(INDUCTOR_CACHE_ENV)
    monkeypatch.setenv("CATALOG_EMBED_CACHE", str(tmp_path / "ours"))
    assert inductor_cache_dir() == tmp_path / "ours" / "inductor"
    encoder.compile(8)  # compiles lazily: nothing is compiled before the first batch
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "ours" / "inductor")  # where inductor will write
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "theirs"))
    assert inductor_cache_dir() == tmp_path / "theirs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_musicnn_matches_eager_on_cuda(precision: str) -> None:
    """On CUDA (Triton kernels, cuDNN or the lean layout's convolutions), compiled for batches of 8, on 10 windows.

    fp32 is held to the port's tolerance; bf16 to the cosine 0.999 it keeps from fp32 (test_precision.py)."""
    batch = torch.from_numpy(np.load(MUSICNN_REFERENCE / "chord_44k1_stereo__MSD_musicnn.npz")["batch"])
    windows = torch.cat([batch] * 4)[:10]
    eager, compiled = get_encoder("musicnn-msd"), get_encoder("musicnn-msd")
    eager.load("cuda", precision)
    compiled.load("cuda", precision)
    compiled.compile(8)
    expected, got = eager.embed(windows, ("penultimate",)), compiled.embed(windows, ("penultimate",))
    expected, got = expected["penultimate"].cpu(), got["penultimate"].cpu()
    assert got.shape == (10, 200)
    if precision == "fp32":
        assert relative_error(got, expected) <= MUSICNN_LAYER_TOLERANCE
    else:
        assert float(torch.nn.functional.cosine_similarity(got, expected, dim=1).min()) >= 0.999
