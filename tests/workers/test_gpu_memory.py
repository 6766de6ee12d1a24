"""GPU memory: musicnn's lean convolution layout (what CUDA float32 runs) against the original's outputs on the
CPU, batch sizes from an encoder's measured footprint, and the probe itself where there is a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.encoders.base import MemoryFootprint
from catalog_embed.workers.stages import CUDA_MEMORY_SHARE, MAX_CUDA_BATCH_WINDOWS, EncoderConfig, cuda_batch_windows
from tests.helpers.reference import MUSICNN_REFERENCE

LAYER_TOLERANCE = 2.5e-5  # test_musicnn.py's, relative to the layer's largest value
MIB = 2**20
GIB = 2**30


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("source", ["chord_16k_mono", "chord_44k1_stereo"])
def test_musicnn_lean_layout_matches_the_original(source: str) -> None:
    """Every front-end and later layer of the lean layout, on the CPU, within the port's own tolerance."""
    reference = np.load(MUSICNN_REFERENCE / f"{source}__MSD_musicnn.npz")
    layers = {key.removeprefix("layer_"): reference[key] for key in reference.files if key.startswith("layer_")}
    encoder = get_encoder("musicnn-msd")
    encoder.load("cpu")
    net = encoder._net  # noqa: SLF001 (intermediate layers under test)
    assert not net.lean  # the CPU keeps the original layout, which is faster there
    net.lean = True
    with torch.inference_mode():
        ours = net(torch.from_numpy(reference["batch"]), keep=frozenset(layers))
    for name, expected in layers.items():
        assert relative_error(ours[name].numpy(), expected) <= LAYER_TOLERANCE, name


def test_batch_fits_the_measured_footprint_within_the_share() -> None:
    # musicnn fp32 as measured before the lean layout (~110 MB per window) on 140 GiB free: 512 windows, where
    # the old rule of 8 per free GiB gave 512 too but without knowing why; in bf16 (~4.7 MB) the cap.
    assert cuda_batch_windows(140 * GIB, MemoryFootprint(0, 110 * MIB)) == 512
    assert cuda_batch_windows(140 * GIB, MemoryFootprint(0, 5 * MIB)) == MAX_CUDA_BATCH_WINDOWS
    # A 16 GiB card: 8 GiB for the batch, 64 MiB fixed, 20 MiB per window -> 406 fit -> 256.
    assert cuda_batch_windows(16 * GIB, MemoryFootprint(64 * MIB, 20 * MIB)) == 256
    # Exactly at a power of two the batch is taken; one byte less and it halves.
    share = int(CUDA_MEMORY_SHARE * GIB)
    assert cuda_batch_windows(GIB, MemoryFootprint(0, share // 64)) == 64
    assert cuda_batch_windows(GIB, MemoryFootprint(0, share // 64 + 1)) == 32
    # A nearly full GPU still gets a batch of one, rather than none.
    assert cuda_batch_windows(100 * MIB, MemoryFootprint(80 * MIB, 30 * MIB)) == 1


def test_the_probe_needs_cuda() -> None:
    encoder = get_encoder("musicnn-msd")
    encoder.load("cpu")
    with pytest.raises(EncoderError, match="measure_memory needs the encoder loaded on a CUDA device"):
        encoder.measure_memory()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_musicnn_cuda_footprint_is_lean(precision: str) -> None:
    """On CUDA musicnn's footprint per window stays near its largest activations (the timbral convolution's
    204 x 187 x 59 values, 9 MB in float32), not the ~110 MB per window measured before the lean layout. The
    sized batch then runs."""
    encoder = get_encoder("musicnn-msd")
    encoder.load("cuda", precision)
    assert encoder._net.lean == (precision == "fp32")  # noqa: SLF001
    footprint = encoder.measure_memory()
    assert 0 < footprint.window_bytes < 30 * MIB, footprint
    config = EncoderConfig(device="cuda", precision=precision)
    batch = config.windows_per_batch(encoder=encoder)
    assert 1 <= batch <= MAX_CUDA_BATCH_WINDOWS
    outputs = encoder.embed(torch.rand(batch, 187, 96, device="cuda") * 4)
    assert outputs["penultimate"].shape == (batch, 200)

