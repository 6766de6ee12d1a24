"""CLMR's SampleCNN: checkpoint import, windowing, and the track representation against CLMR's original code.

`clmr_reference.npz` holds what CLMR's own code (github.com/Spijkervet/CLMR at 423414d, its 2.0 code) computed,
run once outside this repository (its code is not vendored; CI cannot fetch it) on the inputs that
`tests/helpers/clmr_fixtures.py` regenerates: the seeded random Lightning checkpoint (`random_checkpoint`) and the
8.5 s 44.1 kHz stereo FLAC (`reference_audio`). The run, in CLMR's order:
- `clmr/datasets/dataset.py` `Dataset.preprocess(0, 22050)`: `ffmpeg -i track.flac -ar 22050 track.wav` (FFmpeg
  n9.0.2, imageio-ffmpeg's static build): libswresample at its defaults, 16-bit PCM, both channels kept;
- `Dataset.load`: `torchaudio.load` under CLMR's "soundfile" backend, which torchaudio 2.9 no longer has, so done
  as that backend did: `soundfile.read(dtype="float32", always_2d=True)`, transposed to (channels, samples);
- `clmr/data.py` `ContrastiveDataset.concat_clip(0, 59049)` with `transform=None` (its `torchaudio_augmentations`
  import stubbed: unused without a transform): `torch.split` by 59,049 along time, the last piece dropped, the
  channels' windows stacked as a batch (6 windows here);
- `clmr/models/sample_cnn.py` `SampleCNN(strides=[3] * 9, supervised=False, out_dim=50)` loaded with
  `clmr/utils/checkpoint.py` `load_encoder_checkpoint(ckpt, 50)` (strict), `fc` replaced by an identity as
  simclr 1.0.2's `SimCLR.__init__` does, in eval mode, under `torch.no_grad()`, torch 2.9.1 on the CPU;
- saved: each window's 512-d output (`windows`), their mean (`representation`, as `clmr/evaluation.py` averages a
  track's windows), and the outputs of `sequential[1..9]` averaged over time and windows (`block1`..`block9`).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
from deltalake import DeltaTable

from catalog_embed.schemas.errors import EncoderError, WeightsError
from catalog_embed.schemas.records import WorkItem
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.encoders.clmr import (
    BLOCKS,
    WINDOW_SAMPLES,
    ClmrFrontEnd,
    ClmrSampleCnn,
    release_key,
    state_shapes,
)
from catalog_embed.workers.stages import DecodeStage, EmbedStage, EncoderConfig
from tests.helpers.cli import run_cli
from tests.helpers.clmr_fixtures import random_checkpoint, random_release_state, reference_audio

REFERENCE = dict(np.load(Path(__file__).with_name("clmr_reference.npz")))
TOL = 1e-4


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_EMBED_CACHE", str(tmp_path_factory.getbasetemp() / "clmr-cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clmr")
    (root / "track.flac").write_bytes(reference_audio())
    torch.save(random_checkpoint(), root / "clmr.ckpt")
    return {"audio": root / "track.flac", "ckpt": root / "clmr.ckpt", "root": root}


def embed_track(files: dict[str, Path], model: str, front_end_on: str, layers: tuple[str, ...] = ()) -> dict:
    """The pipeline's decode and embed stages on the reference track: its pooled layers and window starts."""
    config = EncoderConfig(model=model, weights=str(files["ckpt"]), front_end_on=front_end_on, layers=layers)
    track = DecodeStage(config).process(WorkItem("t", str(files["audio"]), "f"))
    result = EmbedStage(config).process([track])[0]
    return {**result.pooled, "starts": track.starts}


# --- against CLMR's original code ---------------------------------------------------------------------------


@pytest.mark.parametrize("front_end_on", ["decoder", "encoder"])
def test_original_rules_reproduce_clmr(files: dict[str, Path], front_end_on: str) -> None:
    """FFmpeg's resampler, each channel windowed, the last piece dropped: CLMR's representation within 1e-4 (the
    rest is CLMR's 16-bit WAV rounding, ~1.5e-5), on the CPU's front end and on the encoder's device's."""
    out = embed_track(files, "clmr-samplecnn-original", front_end_on, ("representation", *BLOCKS))
    assert len(out["starts"]) == len(REFERENCE["windows"]) == 6  # 2 channels x 3 windows
    for layer in ("representation", *BLOCKS):
        np.testing.assert_allclose(out[layer], REFERENCE[layer], rtol=0, atol=TOL, err_msg=layer)


def test_network_reproduces_clmr_per_window(files: dict[str, Path]) -> None:
    """Our SampleCNN on the windows our original-rules front end cuts gives each of CLMR's window outputs."""
    encoder = get_encoder("clmr-samplecnn-original", weights=str(files["ckpt"]))
    encoder.load("cpu")
    config = EncoderConfig(model="clmr-samplecnn-original", weights=str(files["ckpt"]), front_end_on="decoder")
    windows = DecodeStage(config).process(WorkItem("t", str(files["audio"]), "f")).windows
    # CLMR stacks its windows window by window (left, right, left, ...); ours go channel after channel.
    theirs = REFERENCE["windows"].reshape(3, 2, 512).transpose(1, 0, 2).reshape(6, 512)
    np.testing.assert_allclose(encoder.embed(windows)["representation"].numpy(), theirs, rtol=0, atol=TOL)


def test_catalog_rules_differ_from_clmr_materially(files: dict[str, Path]) -> None:
    """Averaged channels and soxr HQ move this (panned, 10.3 kHz-rich) track well past the tolerance: why the
    original rules stay selectable. The windows are the same three per channel."""
    out = embed_track(files, "clmr-samplecnn", "decoder")
    assert out["starts"] == [i * WINDOW_SAMPLES / 22050 for i in range(3)]
    assert np.abs(out["representation"] - REFERENCE["representation"]).max() > 1e-2


# --- front end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "n_samples", "n_windows"),
    [
        ("catalog", 3 * WINDOW_SAMPLES + 100, 3),
        ("original", 3 * WINDOW_SAMPLES + 100, 3),
        ("catalog", 3 * WINDOW_SAMPLES, 3),
        ("original", 3 * WINDOW_SAMPLES, 2),  # CLMR drops its last split piece, whole or not
        ("catalog", 1000, 1),
        ("original", 1000, 1),
    ],
)
def test_windows_tail_and_short_audio(rules: str, n_samples: int, n_windows: int) -> None:
    front_end = ClmrFrontEnd(rules)
    waveform = torch.linspace(-1, 1, n_samples)
    windows = front_end(waveform)
    assert windows.shape == (n_windows, WINDOW_SAMPLES)
    assert len(front_end.window_starts(n_samples)) == n_windows
    kept = min(n_samples, n_windows * WINDOW_SAMPLES)
    assert torch.equal(windows.reshape(-1)[:kept], waveform[:kept])  # raw samples, no normalisation
    assert not windows.reshape(-1)[kept:].any()  # short audio is zero-padded


def test_original_rules_window_each_channel() -> None:
    stereo = torch.stack([torch.full((2 * WINDOW_SAMPLES + 7,), 0.25), torch.full((2 * WINDOW_SAMPLES + 7,), -0.5)])
    windows = ClmrFrontEnd("original")(stereo)
    assert windows.shape == (4, WINDOW_SAMPLES)
    assert windows[:2].eq(0.25).all() and windows[2:].eq(-0.5).all()
    assert ClmrFrontEnd("catalog").config_hash() != ClmrFrontEnd("original").config_hash()
    with pytest.raises(EncoderError, match="choose one of: catalog, original"):
        ClmrFrontEnd("paper")


# --- weights ------------------------------------------------------------------------------------------------


def test_encoder_contract_and_no_weights() -> None:
    encoder = get_encoder("clmr-samplecnn")
    assert isinstance(encoder, ClmrSampleCnn) and encoder.default_layer == "representation"
    assert {s.name: s.dim for s in encoder.layers} == {
        "representation": 512, "block1": 128, "block2": 128, "block3": 256, "block4": 256, "block5": 256,
        "block6": 256, "block7": 256, "block8": 256, "block9": 512,
    }
    assert get_encoder("clmr-samplecnn-original").name == "clmr-samplecnn-original"
    with pytest.raises(WeightsError) as info:
        encoder.prepare()
    for needle in ("not shipped", "Spijkervet/CLMR", "clmr_checkpoint_10000.zip", "--weights"):
        assert needle in str(info.value)


def test_every_form_of_the_encoder_is_one_version(files: dict[str, Path], tmp_path: Path) -> None:
    """The Lightning checkpoint, a bare SampleCNN state dict and a pinned cached conversion are the same weights."""
    lightning = ClmrSampleCnn(weights=str(files["ckpt"]))
    lightning.prepare()
    bare = tmp_path / "bare.pt"
    torch.save({**random_release_state(), "fc.weight": torch.zeros(50, 512), "fc.bias": torch.zeros(50)}, bare)
    plain = ClmrSampleCnn(weights=str(bare))
    plain.prepare()
    assert plain.version == lightning.version and len(lightning.version) == 16
    pin = hashlib.sha256(files["ckpt"].read_bytes()).hexdigest()
    pinned = ClmrSampleCnn(weights=str(tmp_path / "gone.ckpt"), weights_sha256=pin.upper())
    pinned.prepare()  # the cached conversion: the missing file is never read
    assert pinned.version == lightning.version
    with pytest.raises(WeightsError, match=f"expected {'0' * 64}"):
        ClmrSampleCnn(weights=str(files["ckpt"]), weights_sha256="0" * 64).prepare()


def _bad_checkpoint(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    checkpoint = random_checkpoint()
    state = checkpoint["state_dict"]
    if kind == "missing":
        del state["model.encoder.sequential.5.1.running_var"]
    elif kind == "misshapen":
        state["model.encoder.sequential.3.0.weight"] = torch.zeros(256, 128, 5)
    elif kind == "other network":
        checkpoint["state_dict"] = {"model.encoder.layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}
    elif kind == "not a checkpoint":
        path.write_bytes(b"definitely not a checkpoint")
        return path
    elif kind == "release zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("clmr_checkpoint_10000/clmr_checkpoint_10000.ckpt", b"\0" * 64)
        return path
    elif kind == "pickled code":
        checkpoint = {"state_dict": state, "hook": zipfile.ZipInfo("x")}  # needs code to unpickle
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "missing model.encoder.sequential.5.1.running_var"),
        ("misshapen", r"misshapen model.encoder.sequential.3.0.weight \(256, 128, 5\) \(expected \(256, 128, 3\)\)"),
        ("other network", "is not a CLMR SampleCNN checkpoint: missing sequential.0.0.bias"),
        ("not a checkpoint", "is not a PyTorch checkpoint readable without pickled code"),
        ("release zip", "not the zip itself"),
        ("pickled code", "is not a PyTorch checkpoint readable without pickled code"),
    ],
)
def test_wrong_files_are_one_line_errors_before_any_audio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, message: str
) -> None:
    path = _bad_checkpoint(tmp_path, kind)
    with pytest.raises(WeightsError, match=message) as info:
        ClmrSampleCnn(weights=str(path)).prepare()
    assert "\n" not in str(info.value)
    out = tmp_path / "tables"
    code, _, err = run_cli(capsys, "embed", "--catalog", str(tmp_path / "none.csv"), "--out", str(out),
                           "--model", "clmr-samplecnn", "--weights", str(path))  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err
    assert not out.exists()


def test_release_keys_cover_the_network() -> None:
    keys = [release_key(k) for k in state_shapes()]
    assert len(set(keys)) == len(keys) == 11 * 7  # stem, 9 blocks, last: conv w/b + 5 batch-norm entries
    assert release_key("block9.norm.num_batches_tracked") == "sequential.9.1.num_batches_tracked"


# --- command line -------------------------------------------------------------------------------------------


def test_models_lists_clmr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "models", "--json", "clmr-samplecnn", "clmr-samplecnn-original")
    assert code == 0
    catalog, original = json.loads(out)
    assert catalog["name"] == "clmr-samplecnn" and original["name"] == "clmr-samplecnn-original"
    assert catalog["layers"][0] == {"name": "representation", "dim": 512, "default": True}
    assert [layer["name"] for layer in catalog["layers"][1:]] == list(BLOCKS)
    assert catalog["licence"]["code"] == "Apache-2.0" and "unstated" in catalog["licence"]["weights"]
    assert catalog["version"] is None and "--weights" in catalog["needs"]


def test_embed_a_two_track_catalog(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.flac").write_bytes(files["audio"].read_bytes())
    (tmp_path / "b.flac").write_bytes(reference_audio(seed=7))
    manifest = tmp_path / "catalog.csv"
    pacsv.write_csv(pa.table({"track_id": ["a", "b"], "uri": ["a.flac", "b.flac"]}), manifest)
    out = tmp_path / "tables"
    code, _, err = run_cli(capsys, "embed", "--catalog", str(manifest), "--out", str(out), "--model",
                           "clmr-samplecnn", "--weights", str(files["ckpt"]), "--layer", "representation,block5")
    assert code == 0, err
    rows = DeltaTable(str(out / "embeddings")).to_pyarrow_table().sort_by("track_id").to_pylist()
    assert [r["track_id"] for r in rows] == ["a", "b"]
    assert all(r["model"] == "clmr-samplecnn" and r["dim"] == 512 and r["n_windows"] == 3 for r in rows)
    encoder = ClmrSampleCnn(weights=str(files["ckpt"]))
    encoder.prepare()
    assert {r["model_version"] for r in rows} == {encoder.version}
    assert all(len(r["embedding_block5"]) == 256 for r in rows)
    assert not np.allclose(rows[0]["embedding"], rows[1]["embedding"])
