"""SF-NFNet-F0 (MULE): structure, weight import and outputs against the recorded reference of the original.

The released weights (CC BY-NC 4.0) are not available here. The reference was recorded by running the original
Keras code with deterministic stand-in weights; these tests rebuild those weights from their rule, write them in
the release's file layout, import them as a user's file would be, and require the reference outputs.

The reference files (28 MB) live outside the repository, in `shared/reference/mule` beside the checkout (see
`tests/helpers/reference.py`); CI has them, so a missing reference fails rather than skips.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog_embed.schemas.errors import WeightsError
from catalog_embed.workers.encoders import get_encoder
from catalog_embed.workers.encoders.keras_import import CONVERTED_WEIGHTS, h5_variables
from catalog_embed.workers.encoders.sfnfnet import TAPS, MuleFrontEnd, MuleSfnfnetF0, SfNfNetF0, state_shapes
from tests.helpers.reference import MULE_REFERENCE

REFERENCE = MULE_REFERENCE
TOL = {"rtol": 1e-4, "atol": 1e-4}  # the original reproduces itself to ~1e-6; porting mistakes move it >1e-3


@pytest.fixture(scope="module")
def weights_facts() -> dict:
    return json.loads((REFERENCE / "weights.json").read_text())


@pytest.fixture(scope="module")
def architecture() -> dict:
    return json.loads((REFERENCE / "architecture.json").read_text())


def standin_array(role: str, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """The reference's stand-in weight for one array (its README's rule), in Keras layout."""
    seed = int.from_bytes(hashlib.sha256(f"mule_ref_v1:{role}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    if kind == "conv_v":
        fan_in, cout = int(np.prod(shape[:-1])), shape[-1]
        base = rng.standard_normal(shape) / np.sqrt(fan_in)
        scale = np.exp(rng.uniform(-0.5, 0.5, cout))
        offset = rng.normal(0.0, 0.5, cout) / np.sqrt(fan_in)
        value = base * scale + offset
    elif kind == "conv_gain":
        value = rng.uniform(0.5, 1.5, shape)
    elif kind in ("conv_bias", "dense_bias"):
        value = rng.normal(0.0, 0.1, shape)
    elif kind == "dense_kernel":
        limit = np.sqrt(6.0 / (shape[0] + shape[1]))
        value = rng.uniform(-limit, limit, shape)
    elif kind == "skip_gain":
        value = rng.uniform(0.1, 0.5, shape)
    else:
        raise AssertionError(kind)
    return np.asarray(value).astype(np.float32)


@pytest.fixture(scope="module")
def standin(weights_facts: dict) -> dict[str, np.ndarray]:
    """h5 path -> stand-in array, for all 480 arrays of the release."""
    return {
        e["h5_path"]: standin_array(e["role"], e["kind"], tuple(e["shape"])) for e in weights_facts["weights"]
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, standin: dict[str, np.ndarray]) -> dict[str, Path]:
    """The stand-in weights as the release ships them: model.weights.h5, and model.keras wrapping it."""
    import h5py  # the [mule] extra; imported here so the fast tests run without it

    root = tmp_path_factory.mktemp("mule_release")
    h5_path = root / "model.weights.h5"
    # Keras 2.13 v3 layout: only the paths matter to the importer (it reads no attributes).
    with h5py.File(h5_path, "w") as h5:
        for path, array in standin.items():
            h5.create_dataset(path, data=array)
    keras_path = root / "model.keras"
    with zipfile.ZipFile(keras_path, "w", zipfile.ZIP_STORED) as zf:
        # The importer reads only the weights member; these two mirror the release's member list.
        zf.writestr("metadata.json", json.dumps({"keras_version": "2.13.1"}))
        zf.writestr("config.json", json.dumps({"class_name": "Functional", "config": {"name": "sf_nfnet_f0"}}))
        zf.write(h5_path, "model.weights.h5")
    return {"h5": h5_path, "keras": keras_path}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A private weights cache for this module."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("weights_cache")
        mp.setenv("CATALOG_EMBED_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def encoder(release: dict[str, Path], cache: Path) -> MuleSfnfnetF0:
    enc = get_encoder("mule-sfnfnet-f0", weights=str(release["keras"]))
    enc.load("cpu")
    return enc


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """Our NCHW maps in the reference's NHWC layout (vectors unchanged)."""
    return t.permute(0, 2, 3, 1) if t.ndim == 4 else t


# --- structure ---------------------------------------------------------------------------------------------


def test_structure_matches_the_release(architecture: dict) -> None:
    """62,345,742 parameters split as in the release, same kernels, betas and output shapes."""
    shapes = state_shapes()
    sizes = {key: int(np.prod(shape)) for key, shape in shapes.items()}
    assert sum(sizes.values()) == architecture["param_count"] == 62_345_742
    by_top: dict[str, int] = {}
    for key, size in sizes.items():
        top = key.split(".")[0]
        by_top[top] = by_top.get(top, 0) + size
    assert by_top == architecture["param_count_by_top_level_role"]

    convs = [c for s in architecture["stems"] for c in s["convs"]]
    convs += [c for f in architecture["fusions"] for c in f["convs"]]
    for block in architecture["blocks"]:
        convs += block["convs"] + ([block["shortcut_conv"]] if block["shortcut_conv"] else [])
    for conv in convs:
        kh, kw, cin, cout = conv["kernel_shape_HWIO"]
        assert shapes[conv["role"] + ".weight_v"] == (cout, cin, kh, kw), conv["role"]
    assert len(convs) == 120

    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        net = SfNfNetF0().eval()
        out = net(torch.empty(2, 1, 96, 300), TAPS)
    for block in architecture["blocks"]:
        module = net.get_submodule(block["prefix"])
        assert module.beta == pytest.approx(block["beta"], abs=1e-12), block["prefix"]
        assert (module.shortcut_conv is not None) == block["transition"]
        strides = {c["role"].rsplit(".", 1)[1]: (tuple(c["strides"]), c["groups"]) for c in block["convs"]}
        for name, (stride, groups) in strides.items():
            conv = getattr(module, name)
            assert (conv.stride, conv.groups) == (stride, groups), f"{block['prefix']}.{name}"

    reference = np.load(REFERENCE / "reference.npz")
    for tap in TAPS:
        name = f"{tap}_fast" if tap.startswith("fusion") else tap
        assert tuple(_nhwc(out[tap]).shape) == (2, *reference[name].shape[1:]), tap


def test_h5_paths_follow_the_keras_counter_rule(weights_facts: dict) -> None:
    """The importer's derived HDF5 path of every array is the release's, and covers our whole state dict."""
    by_key = {v.key: v.path for v in h5_variables()}
    assert by_key.keys() == state_shapes().keys()
    for entry in weights_facts["weights"]:
        key = entry["role"].replace(".kernel", ".weight") if entry["kind"] == "dense_kernel" else entry["role"]
        assert by_key[key] == entry["h5_path"], entry["role"]


def test_encoder_contract() -> None:
    enc = get_encoder("mule-sfnfnet-f0")
    assert isinstance(enc, MuleSfnfnetF0)
    assert enc.layer(enc.default_layer).dim == 1728
    assert {spec.name: spec.dim for spec in enc.layers} == {
        "embedding": 1728, "slow": 1536, "fast": 192, "slow_stage1": 512, "slow_stage2": 1536,
    }
    assert enc.licence.weights == "CC-BY-NC-4.0"


# --- weights -----------------------------------------------------------------------------------------------


def test_no_weights_says_where_to_get_them() -> None:
    with pytest.raises(WeightsError) as info:
        MuleSfnfnetF0().prepare()
    message = str(info.value)
    for needle in ("not shipped", "CC BY-NC 4.0", "PandoraMedia/music-audio-representations", "--weights"):
        assert needle in message


def test_unreadable_weights_are_weights_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_EMBED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="not found"):
        MuleSfnfnetF0(weights=str(tmp_path / "missing.keras")).prepare()
    junk = tmp_path / "model.keras"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(WeightsError, match="neither a .keras zip nor an HDF5"):
        MuleSfnfnetF0(weights=str(junk)).prepare()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="holds none of"):
        MuleSfnfnetF0(weights=str(empty)).prepare()
    with pytest.raises(WeightsError, match="64 hex digits"):
        MuleSfnfnetF0(weights=str(junk), weights_sha256="../../elsewhere").prepare()


def test_remote_weights_are_downloaded_unless_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec URIs are fetched into the cache's staging area (here memory://, so the junk is found out there)."""
    import fsspec

    monkeypatch.setenv("CATALOG_EMBED_CACHE", str(tmp_path / "cache"))
    uri = f"memory://{tmp_path.name}/model.keras"
    with fsspec.open(uri, "wb") as fh:
        fh.write(b"not a model at all")
    with pytest.raises(WeightsError, match="neither a .keras zip nor an HDF5"):
        MuleSfnfnetF0(weights=uri).prepare()
    monkeypatch.setenv("CATALOG_EMBED_OFFLINE", "1")
    with pytest.raises(WeightsError, match="CATALOG_EMBED_OFFLINE"):
        MuleSfnfnetF0(weights=uri).prepare()
    fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


@pytest.mark.slow
def test_standin_weights_match_the_recorded_checksums(weights_facts: dict, standin: dict[str, np.ndarray]) -> None:
    """Our regeneration of the stand-in weights is the one the reference was recorded with."""
    assert sum(a.size for a in standin.values()) == weights_facts["param_count"]
    for entry in weights_facts["weights"]:
        array = standin[entry["h5_path"]].astype(np.float64)
        assert array.shape == tuple(entry["shape"]), entry["role"]
        assert array.sum() == pytest.approx(entry["sum"], rel=1e-6, abs=1e-6), entry["role"]
        assert np.abs(array).sum() == pytest.approx(entry["abs_sum"], rel=1e-6), entry["role"]
        np.testing.assert_array_equal(array.ravel()[: len(entry["first"])], entry["first"], err_msg=entry["role"])


@pytest.mark.slow
def test_imported_release_reproduces_the_reference(encoder: MuleSfnfnetF0) -> None:
    """Every intermediate and the embedding of the original, within atol = rtol = 1e-4."""
    reference = np.load(REFERENCE / "reference.npz")
    windows = torch.from_numpy(reference["input"]).permute(0, 3, 1, 2)
    with torch.inference_mode():
        out = encoder._net(windows, TAPS)
    for tap in TAPS:
        name = f"{tap}_fast" if tap.startswith("fusion") else tap
        np.testing.assert_allclose(_nhwc(out[tap]).numpy(), reference[name], **TOL, err_msg=tap)

    layers = encoder.embed(windows, tuple(spec.name for spec in encoder.layers))
    embedding = reference["embedding"]
    np.testing.assert_allclose(layers["embedding"].numpy(), embedding, **TOL)
    np.testing.assert_allclose(layers["slow"].numpy(), embedding[:, :1536], **TOL)
    np.testing.assert_allclose(layers["fast"].numpy(), embedding[:, 1536:], **TOL)
    np.testing.assert_allclose(layers["slow_stage1"].numpy(), reference["slow_stage1"].mean(axis=(1, 2)), **TOL)
    np.testing.assert_allclose(layers["slow_stage2"].numpy(), reference["slow_stage2"].mean(axis=(1, 2)), **TOL)


@pytest.mark.slow
def test_every_source_form_gives_one_version(
    encoder: MuleSfnfnetF0, release: dict[str, Path], cache: Path
) -> None:
    """model.keras, its bare HDF5 and the converted directory are the same weights, under one version."""
    from safetensors.numpy import load_file

    h5_sha = hashlib.sha256(release["h5"].read_bytes()).hexdigest()
    assert encoder.version == h5_sha[:16]

    bare = MuleSfnfnetF0(weights=str(release["h5"]))
    bare.prepare()
    assert bare.version == encoder.version
    ours, theirs = load_file(encoder.weights_path), load_file(bare.weights_path)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)

    converted = MuleSfnfnetF0(weights=f"file://{encoder.weights_path.parent}")
    converted.prepare()
    assert converted.version == encoder.version
    assert converted.weights_path == encoder.weights_path

    # A pinned file that is already converted is not read again.
    keras_sha = hashlib.sha256(release["keras"].read_bytes()).hexdigest()
    pinned = MuleSfnfnetF0(weights=str(cache / "nowhere" / "model.keras"), weights_sha256=keras_sha.upper())
    pinned.prepare()
    assert pinned.weights_path == encoder.weights_path


@pytest.mark.slow
def test_wrong_pin_is_refused(release: dict[str, Path], cache: Path) -> None:
    with pytest.raises(WeightsError, match="expected 0{64}"):
        MuleSfnfnetF0(weights=str(release["h5"]), weights_sha256="0" * 64).prepare()


def test_misshapen_conversion_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.numpy import save_file

    monkeypatch.setenv("CATALOG_EMBED_CACHE", str(tmp_path / "cache"))
    save_file({"slow_stem.conv0.weight_v": np.zeros((16, 1, 3, 1), np.float32)}, str(tmp_path / CONVERTED_WEIGHTS))
    (tmp_path / "config.json").write_text(json.dumps({"encoder": "mule-sfnfnet-f0", "weights_sha256": "0" * 64}))
    with pytest.raises(WeightsError, match="does not hold SF-NFNet-F0 weights"):
        MuleSfnfnetF0(weights=str(tmp_path)).prepare()


# --- front end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_reference() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE / "pipeline_reference.npz"))


def test_front_end_matches_the_release(pipeline_reference: dict[str, np.ndarray]) -> None:
    """Log-mel, slice positions and standardised slices of the release's own front end."""
    front = MuleFrontEnd()
    assert front.sample_rate == int(pipeline_reference["sample_rate"])
    # The release's audio is int16 / 2^16 (peak 0.5); ours arrives in [-1, 1] and the front end halves it.
    ours = torch.from_numpy(pipeline_reference["audio"]) * 2.0
    mel = front.log_mel(ours).numpy()
    np.testing.assert_allclose(mel, pipeline_reference["mel"], **TOL)
    slices = front(ours)
    assert slices.shape == (3, 1, 96, 300) and slices.dtype == torch.float32
    np.testing.assert_allclose(slices[:, 0].numpy(), pipeline_reference["slices"][..., 0], **TOL)
    starts = [(c - 150) / 100 for c in pipeline_reference["slice_centers"]]
    assert front.window_starts(len(ours)) == pytest.approx(starts)


def test_short_audio_is_padded_to_one_slice() -> None:
    front = MuleFrontEnd()
    assert front.window_samples == 47_840
    one_second = torch.sin(torch.arange(16_000) * 0.05)
    windows = front(one_second)
    assert windows.shape == (1, 1, 96, 300)
    assert front.window_starts(16_000) == [0.0]
    assert torch.isfinite(windows).all()


@pytest.mark.slow
def test_pipeline_timeline_and_average(encoder: MuleSfnfnetF0, pipeline_reference: dict[str, np.ndarray]) -> None:
    """Front end + network + averaging on a 6.5 s clip, as the release's pipeline computed them."""
    windows = encoder.front_end()(torch.from_numpy(pipeline_reference["audio"]) * 2.0)
    timeline = encoder.embed(windows)["embedding"].numpy()
    np.testing.assert_allclose(timeline.T, pipeline_reference["timeline"], **TOL)
    np.testing.assert_allclose(timeline.mean(axis=0)[:, None], pipeline_reference["average"], **TOL)
