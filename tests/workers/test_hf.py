"""`hf:` encoders on tiny random checkpoints: torch front ends against the feature extractors, embeddings against
`transformers`' own forward pass, an end-to-end run, and the bad inputs refused before any audio is read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import EncoderError
from catalog_embed.schemas.tables import EMBEDDINGS, RUNS
from catalog_embed.workers.audio import load_audio
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers import hf_checkpoints
from tests.helpers.cli import run_cli

transformers = pytest.importorskip("transformers")

QUIET = Console(quiet=True)
FAMILIES = tuple(hf_checkpoints.BUILDERS)
# wav2vec2 takes any length: the tests give it one-second windows, as long as the other tiny checkpoints'.
OPTIONS = {"wav2vec2": {"window_s": 1.0}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """One tiny checkpoint folder per family."""
    root = tmp_path_factory.mktemp("hf")
    return {family: str(build(root / family)) for family, build in hf_checkpoints.BUILDERS.items()}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Two real tracks, mp3 and flac, 2.5 s at 44.1 kHz."""
    config = DemoCatalogConfig(n_tracks=2, duration_s=2.5, n_broken=0, seed=3, codecs=("mp3", "flac"))
    return render_demo_catalog(tmp_path_factory.mktemp("catalog"), config)


def _track(catalog, rate: int) -> np.ndarray:
    """The catalog's mp3 decoded, downmixed and resampled to `rate` by the pipeline's own decoder."""
    uri = next(row["uri"] for row in pq.read_table(catalog.manifest_path).to_pylist() if row["uri"].endswith(".mp3"))
    return load_audio(uri, rate).samples


def _encoder(checkpoints, family):
    encoder = get_encoder(f"hf:{checkpoints[family]}", **OPTIONS.get(family, {}))
    encoder.prepare()
    return encoder


def _extractor_inputs(folder: str, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """What the checkpoint's own feature extractor makes of `clips`, as model inputs."""
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
    out = extractor(clips, sampling_rate=extractor.sampling_rate, return_tensors="pt")
    return {key: value for key, value in out.items() if key != "attention_mask"}


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_front_end_matches_the_feature_extractor_on_real_audio(checkpoints, catalog, family) -> None:
    """Every window's torch features equal the extractor's for that window within 1e-5."""
    encoder = _encoder(checkpoints, family)
    front_end = encoder.front_end()
    assert front_end.features.kind.startswith("torch:")
    samples = _track(catalog, front_end.sample_rate)
    size = front_end.window_samples
    with torch.inference_mode():
        ours = front_end(torch.from_numpy(samples))
    clips = [samples[i * size : (i + 1) * size] for i in range(len(samples) // size)]
    assert len(clips) == len(ours) == len(front_end.window_starts(len(samples))) >= 2
    reference = next(iter(_extractor_inputs(checkpoints[family], clips).values()))
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference.float(), rtol=0, atol=1e-5), (ours - reference).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_front_end_and_encoder_on_the_gpu_match_the_cpu(checkpoints, catalog, family) -> None:
    """On a GPU the front end runs on the device (`--front-end-on encoder`): its features stay within 1e-5 of the
    extractor's, and the embeddings within 1e-4 of the CPU's."""
    cpu, gpu = _encoder(checkpoints, family), _encoder(checkpoints, family)
    cpu.load("cpu")
    gpu.load("cuda")
    front_end = cpu.front_end()
    samples = torch.from_numpy(_track(catalog, front_end.sample_rate))
    with torch.inference_mode():
        on_cpu = front_end(samples)
        on_gpu = gpu.front_end().to("cuda")(samples.to("cuda"))
    assert torch.allclose(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-5)
    names = tuple(spec.name for spec in cpu.layers)
    ours, theirs = gpu.embed(on_gpu, names), cpu.embed(on_cpu, names)
    for name in names:
        assert torch.allclose(ours[name].cpu(), theirs[name], rtol=0, atol=1e-4), name


def _reference_states(family: str, folder: str, inputs: dict[str, torch.Tensor]):
    """`transformers`' own forward pass: the hidden states and the pooled output (None where there is none)."""
    if family == "clap":
        model = transformers.ClapModel.from_pretrained(folder).eval()
        out = model.get_audio_features(**inputs, output_hidden_states=True)
        return [state.mean(dim=(2, 3)) for state in out.hidden_states], out.pooler_output
    model = transformers.AutoModel.from_pretrained(folder).eval()
    if family == "whisper":
        model = model.get_encoder()
    out = model(**inputs, output_hidden_states=True)
    return [state.mean(dim=1) for state in out.hidden_states], getattr(out, "pooler_output", None)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_window_clip_embeds_as_the_mean_over_time_of_transformers_hidden_states(
    checkpoints, catalog, family
) -> None:
    """For a clip of one window, each layer's track embedding is the mean over time of that hidden state (the
    pooled output for `pooled`) in transformers' forward pass on the extractor's features, within 1e-4."""
    encoder = _encoder(checkpoints, family)
    encoder.load("cpu")
    front_end = encoder.front_end()
    clip = _track(catalog, front_end.sample_rate)[: front_end.window_samples]
    names = tuple(spec.name for spec in encoder.layers)
    with torch.inference_mode():
        ours = encoder.embed(front_end(torch.from_numpy(clip)), names)
        hidden, pooled = _reference_states(family, checkpoints[family], _extractor_inputs(checkpoints[family], [clip]))
    assert len(hidden) == len([name for name in names if name.startswith("hidden_")])
    for i, state in enumerate(hidden):
        assert ours[f"hidden_{i}"].shape == state.shape == (1, encoder.layer(f"hidden_{i}").dim)
        assert torch.allclose(ours[f"hidden_{i}"], state, rtol=0, atol=1e-4), (family, i)
    if pooled is not None:
        assert torch.allclose(ours["pooled"], pooled, rtol=0, atol=1e-4)
    assert ("pooled" in names) == (family in ("ast", "clap"))


def test_embed_writes_rows_for_a_two_track_catalog(checkpoints, catalog, tmp_path) -> None:
    """`embed --model hf:<folder>` commits one row per track, versioned 'local-<weights hash>', and the runs row
    records the hf options."""
    encoder = EncoderConfig(model=f"hf:{checkpoints['wav2vec2']}", layers=("hidden_1", "hidden_2"), window_s=1.0)
    config = EmbedConfig(catalog=str(catalog.manifest_path), out=str(tmp_path), encoder=encoder, workers=1)
    summary = run_embed(config, QUIET)
    rows = TableStore(str(tmp_path)).read(EMBEDDINGS).to_pylist()
    assert summary.stats.n_embedded == 2 and len(rows) == 2
    assert {row["model"] for row in rows} == {f"hf:{checkpoints['wav2vec2']}"}
    assert all(row["model_version"].startswith("local-") and row["n_windows"] == 2 for row in rows)
    assert all(len(row["embedding"]) == len(row["embedding_hidden_2"]) == 32 for row in rows)
    run = TableStore(str(tmp_path)).read(RUNS).to_pylist()[0]
    recorded = json.loads(run["config_json"])["encoder"]
    assert recorded["trust_remote_code"] is False and recorded["window_s"] == 1.0
    assert run["licence_weights"] == "unknown: check the model card"


def test_cli_embeds_with_an_hf_model(checkpoints, catalog, tmp_path, capsys) -> None:
    """The command line takes an hf: name and its options."""
    code, _, err = run_cli(
        capsys, "embed", "--catalog", str(catalog.manifest_path), "--out", str(tmp_path), "--workers", "1",
        "--model", f"hf:{checkpoints['ast']}", "--layer", "pooled,hidden_0",
    )
    assert code == 0, err
    assert len(TableStore(str(tmp_path)).read(EMBEDDINGS)) == 2


def test_models_lists_an_hf_checkpoint(checkpoints, capsys) -> None:
    """`models hf:<folder>` shows its layers (numbered runs folded), version, licence and front end."""
    code, out, _ = run_cli(capsys, "models", f"hf:{checkpoints['clap']}")
    assert code == 0
    assert "hidden_0 (16), hidden_1..2 (32), *pooled (32)" in out and "front end torch:clap_mel" in out
    code, out, _ = run_cli(capsys, "models", "--json", f"hf:{checkpoints['clap']}")
    (listed,) = json.loads(out)
    assert listed["version"].startswith("local-") and listed["needs"] is None
    assert listed["licence"]["weights"] == "unknown: check the model card"


def test_hub_names_resolve_offline_from_the_cache_with_their_commit(checkpoints, tmp_path, monkeypatch) -> None:
    """With HF_HUB_OFFLINE a cached repository id resolves; its version starts with the snapshot's commit, and
    the licence comes from its model card."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf_checkpoints.hub_snapshot(tmp_path / "hub", checkpoints["whisper"], "someone/tiny-whisper", commit)
    card = tmp_path / "hub/models--someone--tiny-whisper/snapshots" / commit / "README.md"
    card.write_text("---\nlicense: apache-2.0\ntags: [audio]\n---\n# tiny\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = _encoder(checkpoints, "whisper")
    for name in ("hf:someone/tiny-whisper", f"hf:someone/tiny-whisper@{commit}"):
        encoder = get_encoder(name)
        encoder.prepare()
        assert encoder.name == "hf:someone/tiny-whisper"
        assert encoder.version == f"{commit[:12]}-{local.version.split('-')[1]}"
        assert encoder.licence.weights == "apache-2.0"


def _one_line_error(name: str, **options) -> str:
    with pytest.raises(EncoderError) as caught:
        encoder = get_encoder(name, **options)
        encoder.prepare()
        encoder.layers  # noqa: B018 (resolving the layers is part of what is checked before any audio)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_name_missing_offline_is_one_line_naming_the_fix(tmp_path, monkeypatch) -> None:
    """Offline and not cached: the fix is named (download it, point HF_HOME at a cache, or go online)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error("hf:someone/not-downloaded")
    assert "hf download someone/not-downloaded" in message and "HF_HOME" in message and "HF_HUB_OFFLINE" in message


def test_a_checkpoint_without_audio_support_is_refused(tmp_path) -> None:
    """A text model has no audio feature extractor."""
    folder = hf_checkpoints.text_only(tmp_path / "bert")
    message = _one_line_error(f"hf:{folder}")
    assert "'bert'" in message and "no audio feature extractor" in message


def test_a_layer_out_of_range_is_refused_naming_the_valid_ones(checkpoints) -> None:
    """`hidden_9` of a two-layer model: the error lists hidden_0 .. hidden_2."""
    encoder = EncoderConfig(model=f"hf:{checkpoints['ast']}", layers=("hidden_9",))
    with pytest.raises(EncoderError, match=r"no layer 'hidden_9'; choose one of: hidden_0, hidden_1, hidden_2, pooled"):
        encoder.resolved_layers(encoder.build())


def test_remote_code_is_refused_unless_trusted(checkpoints, tmp_path) -> None:
    """A checkpoint whose config names its own classes needs --trust-remote-code; it is never assumed."""
    folder = tmp_path / "remote"
    shutil.copytree(checkpoints["wav2vec2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "mert_model", "auto_map": {"AutoConfig": "configuration_mert.MERTConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    assert "--trust-remote-code" in _one_line_error(f"hf:{folder}")


@pytest.mark.parametrize(
    ("family", "options", "message"),
    [
        ("whisper", {"window_s": 5.0}, "fixes its own window; drop --window-s"),
        ("ast", {"weights": "x.safetensors"}, "drop --weights"),
    ],
)
def test_options_that_do_not_apply_are_refused(checkpoints, family, options, message) -> None:
    """Whisper's window is the model's; an hf: checkpoint brings its own weights."""
    assert message in _one_line_error(f"hf:{checkpoints[family]}", **options)


def test_hf_options_are_refused_for_other_encoders() -> None:
    """--trust-remote-code means nothing to a registered encoder."""
    assert "applies to hf: models only" in _one_line_error("mfcc-stats", trust_remote_code=True)

