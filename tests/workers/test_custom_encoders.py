"""Bring-your-own encoders: TorchScript and ONNX end to end through the embed job, factories, safe weights, pins.

The models are tiny networks built here, saved the way users would save theirs (torch.jit.save, torch.onnx.export,
safetensors, torch.save), next to their JSON configs in a temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from rich.console import Console

from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import EncoderError, WeightsError
from catalog_embed.schemas.records import WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, RUNS
from catalog_embed.workers.audio import DeviceResampler, load_audio
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.encoders.custom import FactoryEncoder, LogMelFrontEnd, OnnxEncoder, TorchScriptEncoder
from catalog_embed.workers.encoders.weights import state_dict_sha256
from catalog_embed.workers.stages import DecodeStage, EmbedStage, EncoderConfig

QUIET = Console(quiet=True)
LICENCE = {"code": "MIT", "weights": "CC-BY-4.0"}
LOGMEL = {
    "type": "logmel", "sample_rate": 16000, "n_fft": 512, "hop_length": 256, "n_mels": 32,
    "window_frames": 64, "hop_frames": 32, "log": "log10_1p_10000",
}  # fmt: skip

FACTORY_MODULE = '''
import torch


class Net(torch.nn.Module):
    """Mean and max of each 3 s waveform window, projected."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, dim)

    def forward(self, windows):
        stats = torch.stack([windows.mean(dim=1), windows.abs().amax(dim=1)], dim=1)
        return self.proj(stats)


def build(dim: int = 8) -> torch.nn.Module:
    return Net(dim)


def mfcc():
    from catalog_embed.workers.encoders import get_encoder

    return get_encoder("mfcc-stats")
'''


class ConvNet(torch.nn.Module):
    """(n, 1, mels, frames) -> an embedding and tag logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 16)
        self.logits = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        return {"embedding": embedding, "logits": self.logits(embedding)}


class FrameNet(torch.nn.Module):
    """(n, frames, mels) -> mean over frames of a per-frame projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)).mean(dim=1)


def _write_config(target: Path, **config: object) -> Path:
    target.write_text(json.dumps({"licence": LICENCE, **config}))
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the TorchScript and ONNX models, the factory module and their configs."""
    root = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    torch.jit.script(ConvNet()).save(str(root / "conv.pt"))
    frames = FrameNet()
    safetensors.torch.save_file(frames.state_dict(), str(root / "frames-reference.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice; it needs no onnxscript
        torch.onnx.export(
            frames, (torch.zeros(2, 64, 32),), str(root / "frames.onnx"), dynamo=False,
            input_names=["windows"], output_names=["embedding"], dynamic_axes={"windows": {0: "n"}},
        )  # fmt: skip
    _write_config(
        root / "conv.json", name="tiny-conv", kind="torchscript", path="conv.pt", front_end=LOGMEL,
        layers={"embedding": 16, "logits": 4},
    )  # fmt: skip
    _write_config(
        root / "frames.json", name="tiny-frames", kind="onnx", path="frames.onnx",
        front_end={**LOGMEL, "layout": "n_frames_mels"}, layers={"embedding": 8},
    )  # fmt: skip
    (root / "tiny_factory.py").write_text(FACTORY_MODULE)
    return root


@pytest.fixture
def factory_path(models: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`models` on sys.path, so its factory module imports."""
    monkeypatch.syspath_prepend(str(models))
    return models


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "layers", "dims", "front_end_on"),
    [
        ("conv.json", ("embedding", "logits"), {"embedding": 16, "embedding_logits": 4}, "decoder"),
        ("frames.json", (), {"embedding": 8}, "encoder"),
    ],
)
def test_torchscript_and_onnx_encoders_run_end_to_end(
    models, small_catalog, small_labels, tmp_path, config, layers, dims, front_end_on
) -> None:
    """One embedding per good track with the declared dims; the run records the config's name, version, licence."""
    spec = json.loads((models / config).read_text())
    encoder = EncoderConfig(model=str(models / config), layers=layers, front_end_on=front_end_on)
    summary = run_embed(
        EmbedConfig(catalog=str(small_catalog.manifest_path), out=str(tmp_path), encoder=encoder, workers=1), QUIET
    )
    store = TableStore(str(tmp_path))
    rows = store.read(EMBEDDINGS).sort_by("track_id")
    good = sorted(label["track_id"] for label in small_labels if label["broken"] is None)
    assert summary.stats.n_embedded == len(good) and rows["track_id"].to_pylist() == good
    assert set(rows["model"].to_pylist()) == {spec["name"]}
    assert set(rows["model_version"].to_pylist()) == {_sha(models / spec["path"])[:16]}
    for column, dim in dims.items():
        vectors = np.array(rows[column].to_pylist(), np.float32)
        assert vectors.shape == (len(good), dim) and np.isfinite(vectors).all()
    run = store.read(RUNS).to_pylist()[0]
    assert (run["licence_code"], run["licence_weights"]) == ("MIT", "CC-BY-4.0")
    assert json.loads(run["config_json"])["encoder"]["front_end_on"] == front_end_on


@pytest.mark.parametrize("front_end_on", ["decoder", "encoder"])
def test_batches_split_tracks_and_pool_back_per_track(models, small_catalog, small_labels, front_end_on) -> None:
    """Six windows per 4 s track in batches of four: each track's mean is that of its own windows, wherever the
    front end ran."""
    good = {label["track_id"] for label in small_labels if label["broken"] is None}
    rows = [row for row in pq.read_table(small_catalog.manifest_path).to_pylist() if row["track_id"] in good][:3]
    config = EncoderConfig(model=str(models / "conv.json"), batch_windows=4, front_end_on=front_end_on)
    tracks = [DecodeStage(config)(WorkItem(row["track_id"], row["uri"], "")) for row in rows]
    embedded = EmbedStage(config)(tracks)
    reference = get_encoder(str(models / "conv.json"))
    reference.load("cpu")
    front_end = reference.front_end()
    for track, row in zip(tracks, embedded, strict=True):
        if track.waveform is None:
            waveform = torch.from_numpy(load_audio(row.item.uri, front_end.sample_rate).samples)
        else:  # what the encoder's device makes of what the decoder shipped (float16 at the file's rate)
            waveform = DeviceResampler(front_end.sample_rate)(track.waveform.float(), track.sample_rate)
        windows = front_end(waveform)
        assert row.n_windows == track.n_windows == len(windows) == 6
        expected = reference.embed(windows)["embedding"].mean(dim=0).numpy()
        np.testing.assert_allclose(row.pooled["embedding"], expected, rtol=1e-5, atol=1e-6)


def test_onnx_encoder_matches_the_exported_module(models) -> None:
    reference = FrameNet().eval()
    reference.load_state_dict(safetensors.torch.load_file(str(models / "frames-reference.safetensors")))
    encoder = get_encoder(str(models / "frames.json"))
    assert isinstance(encoder, OnnxEncoder)
    encoder.load("cpu")
    windows = encoder.front_end()(torch.randn(16000 * 5) * 0.1)
    assert tuple(windows.shape[1:]) == (64, 32)
    with torch.inference_mode():
        torch.testing.assert_close(encoder.embed(windows)["embedding"], reference(windows), rtol=1e-5, atol=1e-5)
    with pytest.raises(EncoderError, match="does not run under PyTorch autocast"):
        get_encoder(str(models / "frames.json")).load("cpu", "bf16")


def test_log_mel_front_end_windows_match_their_starts(models) -> None:
    front_end = get_encoder(str(models / "conv.json")).front_end()
    assert isinstance(front_end, LogMelFrontEnd)
    for n_samples in (100, 8000, 16000 * 3 + 17, 16384, 16000 * 7):
        windows = front_end(torch.randn(n_samples))
        starts = front_end.window_starts(n_samples)
        assert windows.shape[1:] == (1, 32, 64) and len(windows) == len(starts) >= 1
        assert starts[:2] == ([0.0, 32 * 256 / 16000] if len(starts) > 1 else [0.0])
    assert front_end.config()["log"] == "log10(10000 x + 1)"


def test_factory_encoder_loads_safetensors_or_weights_only_torch_files(factory_path, tmp_path) -> None:
    """The version is the digest of the loaded weights, whatever file they came in."""
    torch.manual_seed(1)
    state = {"proj.weight": torch.randn(8, 2), "proj.bias": torch.randn(8)}
    safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    waveform = {"type": "waveform", "sample_rate": 16000, "window_s": 1.0}
    versions = []
    for weights in ("w.safetensors", "w.pt"):
        config = _write_config(
            tmp_path / f"{weights}.json", name="stats-net", kind="factory", factory="tiny_factory:build",
            kwargs={"dim": 8}, weights=weights, front_end=waveform, layers={"embedding": 8},
        )  # fmt: skip
        encoder = get_encoder(str(config))
        assert isinstance(encoder, FactoryEncoder)
        encoder.load("cpu")
        windows = encoder.front_end()(torch.linspace(-1, 1, 16000 * 2))
        stats = torch.stack([windows.mean(dim=1), windows.abs().amax(dim=1)], dim=1)
        expected = stats @ state["proj.weight"].T + state["proj.bias"]
        torch.testing.assert_close(encoder.embed(windows)["embedding"], expected)
        versions.append(encoder.version)
    assert versions[0] == versions[1] == state_dict_sha256(state)[:16]


def test_factory_may_return_an_encoder(factory_path, tmp_path) -> None:
    config = _write_config(
        tmp_path / "mfcc.json", name="my-mfcc", kind="factory", factory="tiny_factory:mfcc",
        front_end={"type": "waveform", "sample_rate": 22050, "window_s": 3.0}, layers={"stats": 120},
    )  # fmt: skip
    encoder = get_encoder(str(config))
    encoder.load("cpu")
    mfcc = get_encoder("mfcc-stats")
    mfcc.load("cpu")
    windows = encoder.front_end()(torch.randn(22050 * 6) * 0.1)
    assert encoder.version == mfcc.version and str(encoder.licence) == "code MIT, weights CC-BY-4.0"
    torch.testing.assert_close(encoder.embed(windows)["stats"], mfcc.embed(windows)["stats"])


class _RunsCode:
    """Pickles as a call of os.system, as a booby-trapped checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_never_run(factory_path, tmp_path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"proj.weight": torch.zeros(8, 2), "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    config = _write_config(
        tmp_path / "evil.json", name="evil", kind="factory", factory="tiny_factory:build", weights="evil.pt",
        front_end={"type": "waveform", "sample_rate": 16000, "window_s": 1.0}, layers={"embedding": 8},
    )  # fmt: skip
    with pytest.raises(WeightsError, match=r"refused to load .*evil\.pt.*GLOBAL posix\.system"):
        get_encoder(str(config)).load("cpu")
    # Nor does a TorchScript config run it: torch.save writes a zip too, but not a TorchScript archive.
    script = _write_config(
        tmp_path / "evil-script.json", name="evil-script", kind="torchscript", path="evil.pt", front_end=LOGMEL,
        layers={"embedding": 8},
    )  # fmt: skip
    with pytest.raises(WeightsError, match="not a loadable TorchScript archive"):
        get_encoder(str(script)).load("cpu")
    assert not marker.exists()


def test_sha256_pins_what_is_loaded(models, tmp_path, capsys) -> None:
    config = str(models / "conv.json")
    right = _sha(models / "conv.pt")
    pinned = get_encoder(config, weights_sha256=right.upper())
    pinned.load("cpu")
    assert isinstance(pinned, TorchScriptEncoder) and pinned.version == right[:16]
    with pytest.raises(WeightsError, match=f"expected {'0' * 64}"):
        get_encoder(config, weights_sha256="0" * 64).prepare()
    # A pin in the config works the same; --weights-sha256 replaces it.
    spec = json.loads((models / "conv.json").read_text())
    spec.update(path=str(models / "conv.pt"), sha256="f" * 64)
    pinned_config = _write_config(tmp_path / "pinned.json", **spec)
    with pytest.raises(WeightsError, match=f"expected {'f' * 64}"):
        get_encoder(str(pinned_config)).prepare()
    get_encoder(str(pinned_config), weights_sha256=right).prepare()
    # From the command line, a mismatch stops the run before any work.
    out = tmp_path / "tables"
    code = main(["embed", "--catalog", str(tmp_path / "none.csv"), "--out", str(out), "--model", config,
                 "--weights-sha256", "1" * 64])  # fmt: skip
    assert code == 2 and f"expected {'1' * 64}" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "musicnn-msd"}, "is a registered encoder's"),
        ({"name": "Bad Name"}, "'name' must match"),
        ({"kind": "pickle"}, "'kind' must be one of torchscript, onnx, factory"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"layers": {"embedding": 0}}, "dims are positive integers"),
        ({"licence": {"code": "MIT"}}, "'licence' must be"),
        ({"front_end": {**LOGMEL, "log": "ln"}}, "log must be one of"),
        ({"front_end": {**LOGMEL, "n_fft": 256, "win_length": 512}}, r"win_length \(512\) must not exceed"),
        ({"front_end": {**LOGMEL, "f_max": 9000}}, "f_max <= sample_rate / 2"),
        ({"front_end": {**LOGMEL, "n_mel": 32}}, "unexpected keyword argument 'n_mel'"),
    ],
)
def test_invalid_configs_are_refused_naming_the_key(models, tmp_path, change, message) -> None:
    spec = {**json.loads((models / "conv.json").read_text()), **change}
    with pytest.raises(EncoderError, match=message):
        get_encoder(str(_write_config(tmp_path / "bad.json", **spec)))


def test_models_command_lists_a_config_with_its_licence(models, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "240")
    assert main(["models", str(models / "conv.json")]) == 0
    listed = capsys.readouterr().out
    assert "tiny-conv" in listed and "MIT / CC-BY-4.0" in listed and _sha(models / "conv.pt")[:16] in listed
