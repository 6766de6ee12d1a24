"""`hear:<module>`: a HEAR 2021 API module as an encoder, held to the module's own functions on real audio.

The module under test is `tests.helpers.hear_module`, a complete HEAR module with a real (tiny) network: the HEAR
modules on PyPI do not install here (see its docstring).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import EncoderError, WeightsError
from catalog_embed.schemas.tables import EMBEDDINGS, RUNS
from catalog_embed.workers.audio import load_audio
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.encoders.weights import sha256_file
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers import hear_module
from tests.helpers.cli import run_cli

QUIET = Console(quiet=True)
MODEL = "hear:tests.helpers.hear_module"
WINDOW_S = 1.0  # 2.5 s tracks: two windows each, the tail dropped


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> None:
    """A fresh cache per test, so that each resolves the module's attributes itself unless it says otherwise."""
    monkeypatch.setenv("CATALOG_EMBED_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Two real tracks, mp3 and flac, 2.5 s at 44.1 kHz (the module runs at 16 kHz: the decoder resamples)."""
    config = DemoCatalogConfig(n_tracks=2, duration_s=2.5, n_broken=0, seed=3, codecs=("mp3", "flac"))
    return render_demo_catalog(tmp_path_factory.mktemp("catalog"), config)


def _reference(uri: str, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The module's own functions on the track's whole windows, decoded at its rate, averaged over the windows."""
    samples = torch.from_numpy(load_audio(uri, hear_module.SAMPLE_RATE).samples)
    size = round(WINDOW_S * hear_module.SAMPLE_RATE)
    windows = samples[: len(samples) // size * size].reshape(-1, size)
    with torch.no_grad():
        scene = torch.cat([hear_module.get_scene_embeddings(w[None], model) for w in windows])
        stamps = torch.cat([hear_module.get_timestamp_embeddings(w[None], model)[0].mean(dim=1) for w in windows])
    return {"scene": scene.mean(dim=0).numpy(), "timestamp_mean": stamps.mean(dim=0).numpy()}


def _embed(catalog, out: Path, **options) -> list[dict]:
    encoder = EncoderConfig(model=MODEL, layers=("scene", "timestamp_mean"), window_s=WINDOW_S, **options)
    config = EmbedConfig(catalog=str(catalog.manifest_path), out=str(out), encoder=encoder, workers=1)
    summary = run_embed(config, QUIET)
    assert summary.stats.n_embedded == 2
    return TableStore(str(out)).read(EMBEDDINGS).to_pylist()


def test_embed_equals_the_modules_own_embeddings_on_the_same_windows(catalog, tmp_path) -> None:
    """Each track's `scene` is the mean of `get_scene_embeddings` over its windows, and `timestamp_mean` that of
    `get_timestamp_embeddings` averaged over time, within 1e-5; windows of both tracks went to the module in one
    batch, the reference ran them one by one."""
    rows = _embed(catalog, tmp_path / "out")
    model = hear_module.load_model()
    assert len(rows) == 2
    for row in rows:
        assert row["model"] == MODEL and row["n_windows"] == 2 and row["layer"] == "scene"
        assert row["dim"] == 48 and len(row["embedding_timestamp_mean"]) == 24
        reference = _reference(row["source_uri"], model)
        np.testing.assert_allclose(row["embedding"], reference["scene"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(row["embedding_timestamp_mean"], reference["timestamp_mean"], atol=1e-5, rtol=0)
    run = TableStore(str(tmp_path / "out")).read(RUNS).to_pylist()[0]
    assert run["licence_code"] == run["licence_weights"] == "unknown"
    assert json.loads(run["config_json"])["encoder"]["window_s"] == WINDOW_S


def test_a_weights_file_goes_to_load_model_and_into_the_version(catalog, tmp_path) -> None:
    """`--weights` reaches `load_model(path)`: the embedding is that model's, the version ends in the file's sha256."""
    state = {name: value * 2 for name, value in hear_module.load_model().state_dict().items()}
    weights = tmp_path / "doubled.safetensors"
    save_file(state, str(weights))
    rows = _embed(catalog, tmp_path / "out", weights=str(weights))
    digest = sha256_file(weights)
    reference = _reference(rows[0]["source_uri"], hear_module.load_model(str(weights)))
    np.testing.assert_allclose(rows[0]["embedding"], reference["scene"], atol=1e-5, rtol=0)
    plain = get_encoder(MODEL)
    plain.prepare()
    assert plain.version.startswith("unpackaged-") and rows[0]["model_version"] == f"{plain.version}-{digest[:16]}"
    with pytest.raises(WeightsError, match="expected 0000"):
        get_encoder(MODEL, weights=str(weights), weights_sha256="0000").prepare()


def test_cli_embeds_with_a_hear_module(catalog, tmp_path, capsys) -> None:
    """The command line takes a hear: name with --window-s."""
    code, _, err = run_cli(
        capsys, "embed", "--catalog", str(catalog.manifest_path), "--out", str(tmp_path / "out"), "--workers", "1",
        "--model", MODEL, "--window-s", str(WINDOW_S),
    )
    assert code == 0, err
    rows = TableStore(str(tmp_path / "out")).read(EMBEDDINGS).to_pylist()
    assert len(rows) == 2 and {row["layer"] for row in rows} == {"scene"}


def test_models_says_it_is_a_hear_module(capsys) -> None:
    """`models hear:<module>` lists both layers, the default starred, and what a HEAR module's embedding is."""
    code, out, _ = run_cli(capsys, "models", MODEL)
    assert code == 0
    assert "*scene (48), timestamp_mean (24)" in out and "HEAR 2021 API module" in out
    code, out, _ = run_cli(capsys, "models", "--json", MODEL)
    (listed,) = json.loads(out)
    assert listed["version"].startswith("unpackaged-") and listed["needs"] is None
    assert "10 s window at 16000 Hz" in listed["description"]


def test_decode_workers_read_the_attributes_from_the_cache(monkeypatch) -> None:
    """Once one process has loaded the model, another learns its rate and widths without calling load_model."""
    get_encoder(MODEL).prepare()

    def refuse(model_file_path: str = "") -> torch.nn.Module:
        raise AssertionError("load_model was called although the cache holds the attributes")

    monkeypatch.setattr(hear_module, "load_model", refuse)
    encoder = get_encoder(MODEL)
    assert encoder.front_end().sample_rate == 16_000 and [s.dim for s in encoder.layers] == [48, 24]


def _site(tmp_path: Path, name: str, source: str, metadata: str | None = None) -> None:
    """Install module `name` into a folder on sys.path as pip lays it out: the module, and a dist-info folder
    whose RECORD lists it when `metadata` is given."""
    (tmp_path / f"{name}.py").write_text(source)
    if metadata is not None:
        info = tmp_path / f"{name}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.2.3\n{metadata}")
        (info / "RECORD").write_text(f"{name}.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for modules a test installs; they are forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_an_installed_module_is_versioned_and_licensed_by_its_distribution(site) -> None:
    """The version is the distribution's name and version, the licence its License-Expression."""
    _site(site, "tinyhear", Path(hear_module.__file__).read_text(), "License-Expression: MIT\n")
    encoder = get_encoder("hear:tinyhear")
    encoder.prepare()
    assert encoder.version == "tinyhear-1.2.3"
    assert (encoder.licence.code, encoder.licence.weights) == ("MIT", "MIT")
    assert "(tinyhear 1.2.3)" in encoder.description


def _one_line_error(name: str, **options) -> str:
    """The error resolving `name` raises before any audio: one line."""
    with pytest.raises(EncoderError) as caught:
        encoder = get_encoder(name, **options)
        encoder.prepare()
        encoder.front_end()
    message = str(caught.value)
    assert "\n" not in message
    return message


NOT_A_MODEL = """
import torch
def load_model(model_file_path=""):
    return torch.nn.Linear(2, 2)
def get_scene_embeddings(audio, model):
    return audio
def get_timestamp_embeddings(audio, model):
    return audio, audio
"""

BROKEN_DEPENDENCY = "import a_dependency_that_is_not_installed\n"


@pytest.mark.parametrize(
    ("name", "source", "options", "message"),
    [
        ("hear:not_installed_anywhere", None, {}, "no module named 'not_installed_anywhere' is installed: pip install"),
        ("hear:json", None, {}, "lacks load_model, get_scene_embeddings, get_timestamp_embeddings; check the name"),
        ("hear:no_attributes", NOT_A_MODEL, {}, "no positive integer sample_rate, scene_embedding_size, timestamp"),
        ("hear:broken_dep", BROKEN_DEPENDENCY, {}, "pip install a_dependency_that_is_not_installed"),
        ("hear:tests/helpers", None, {}, "write hear:<module> with the module's import name"),
        (MODEL, None, {"weights": "missing.safetensors"}, "is not a file"),
        (MODEL, None, {"trust_remote_code": True}, "takes only --weights, --weights-sha256, --window-s"),
    ],
)
def test_bad_modules_are_one_line_naming_the_fix(site, name, source, options, message) -> None:
    """A module that does not import, lacks the API, or whose model lacks the attributes; a malformed name, a
    missing weights file, an option HEAR modules do not take."""
    if source is not None:
        _site(site, name.removeprefix("hear:"), textwrap.dedent(source))
    assert message in _one_line_error(name, **options)


def test_weights_the_module_cannot_load_are_refused(tmp_path) -> None:
    """load_model's own error, on its first line, and the fix."""
    weights = tmp_path / "not-weights.safetensors"
    weights.write_text("not a safetensors file")
    message = _one_line_error(MODEL, weights=str(weights))
    assert "load_model(" in message and "check that --weights is a model file for this module" in message


def test_cli_refuses_a_missing_module_before_reading_audio(catalog, tmp_path, capsys) -> None:
    """`embed --model hear:<missing>`: exit 2, one line, no table written."""
    code, _, err = run_cli(
        capsys, "embed", "--catalog", str(catalog.manifest_path), "--out", str(tmp_path / "out"),
        "--model", "hear:not_installed_anywhere",
    )
    assert code == 2 and err.count("\n") == 1 and "pip install" in err
    assert not (tmp_path / "out" / EMBEDDINGS.name).exists()


def test_window_s_is_refused_for_registered_encoders_naming_who_takes_it() -> None:
    """--window-s means something to hf: and hear: names only."""
    assert "applies to hf: and hear: models only" in _one_line_error("mfcc-stats", window_s=2.0)
