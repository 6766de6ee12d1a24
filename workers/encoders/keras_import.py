"""Import the MULE release's Keras weights into `SfNfNetF0`'s state dict, cached as safetensors.

MULE's SF-NFNet-F0 was released as a Keras 2.13 `model.keras`: a zip holding `config.json`, `metadata.json` and
`model.weights.h5`. Keras 2.14 and 2.15 write other HDF5 paths and cannot load a 2.13-written file, so the HDF5
is read here directly with h5py; neither TensorFlow nor Keras is needed.

In that file each weighted layer's variables sit under `_layer_checkpoint_dependencies/<class>[_<n>]/`:
`weight_standardization*/vars/0` the raw HWIO conv kernel, `vars/1` its gain, `layer/vars/0` its bias;
`dense*/vars/0` the (in, out) kernel and `vars/1` the bias; `scalar_multiply*/vars/0` a block's skip gain. `<n>`
is not the layer name of `config.json`: Keras 2.13 walks the model's layers in `model.layers` order, naming each
checkpoint entry after its class with one counter per class, and a layer with weights has two entries (so its
counter moves by two) while a weightless layer of the same class has one. `_LAYER_ORDER` lists, per class, the
released model's layers in that order (`-` for weightless ScalarMultiply layers) and `h5_variables()` derives the
paths from it by that rule, so a bare `model.weights.h5` needs no `config.json`.

Accepted sources (local paths or any fsspec URI): `model.keras`; `model.weights.h5`; a directory holding either;
or a directory converted by this module (`model.safetensors` + `config.json`, as in the cache), which is how a
conversion is shared with workers that should not repeat it.

Conversions are cached under `<cache>/mule-sfnfnet-f0/<sha256 of the source file>/`. The weights are identified
by the sha256 of the `model.weights.h5` bytes, so a `model.keras` and the HDF5 member extracted from it (and
their conversions) give one encoder version.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import safetensors
import safetensors.numpy

from catalog_embed.schemas.errors import WeightsError
from catalog_embed.workers.encoders.weights import cache_dir, local_copy, sha256_file, verify_sha256

ENCODER = "mule-sfnfnet-f0"
KERAS_FILE = "model.keras"
H5_FILE = "model.weights.h5"
CONVERTED_WEIGHTS = "model.safetensors"
CONVERTED_CONFIG = "config.json"

_ROOT = "_layer_checkpoint_dependencies"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


def _roles(text: str) -> tuple[str | None, ...]:
    return tuple(None if token == "-" else token for token in text.split())


# The released model's layers in Keras `model.layers` order, per weighted class (facts read off the release's
# HDF5 paths; the interleaving of slow and fast layers is Keras's topological order of the functional graph).
_LAYER_ORDER: dict[str, tuple[str | None, ...]] = {
    "weight_standardization": _roles("""
    fast_stem.conv0 slow_stem.conv0 fast_stem.conv1 slow_stem.conv1 fast_stem.conv2 slow_stem.conv2
    fast_stem.conv3 fusion0.conv_time slow_stem.conv3 fusion0.conv_proj fast.stage0.block0.conv0
    slow.stage0.block0.conv0 fast.stage0.block0.conv1 slow.stage0.block0.conv1 fast.stage0.block0.conv2
    slow.stage0.block0.conv2 fast.stage0.block0.conv3 slow.stage0.block0.conv3 fast.stage0.block0.shortcut_conv
    slow.stage0.block0.shortcut_conv fusion1.conv_time fusion1.conv_proj fast.stage1.block0.conv0
    slow.stage1.block0.conv0 fast.stage1.block0.conv1 slow.stage1.block0.conv1 fast.stage1.block0.conv2
    slow.stage1.block0.conv2 fast.stage1.block0.conv3 slow.stage1.block0.conv3 fast.stage1.block0.shortcut_conv
    slow.stage1.block0.shortcut_conv fast.stage1.block1.conv0 slow.stage1.block1.conv0 fast.stage1.block1.conv1
    slow.stage1.block1.conv1 fast.stage1.block1.conv2 slow.stage1.block1.conv2 fast.stage1.block1.conv3
    slow.stage1.block1.conv3 fusion2.conv_time fusion2.conv_proj fast.stage2.block0.conv0
    slow.stage2.block0.conv0 fast.stage2.block0.conv1 slow.stage2.block0.conv1 fast.stage2.block0.conv2
    slow.stage2.block0.conv2 fast.stage2.block0.conv3 slow.stage2.block0.conv3 fast.stage2.block0.shortcut_conv
    slow.stage2.block0.shortcut_conv fast.stage2.block1.conv0 slow.stage2.block1.conv0 fast.stage2.block1.conv1
    slow.stage2.block1.conv1 fast.stage2.block1.conv2 slow.stage2.block1.conv2 fast.stage2.block1.conv3
    slow.stage2.block1.conv3 fast.stage2.block2.conv0 slow.stage2.block2.conv0 fast.stage2.block2.conv1
    slow.stage2.block2.conv1 fast.stage2.block2.conv2 slow.stage2.block2.conv2 fast.stage2.block2.conv3
    slow.stage2.block2.conv3 fast.stage2.block3.conv0 slow.stage2.block3.conv0 fast.stage2.block3.conv1
    slow.stage2.block3.conv1 fast.stage2.block3.conv2 slow.stage2.block3.conv2 fast.stage2.block3.conv3
    slow.stage2.block3.conv3 fast.stage2.block4.conv0 slow.stage2.block4.conv0 fast.stage2.block4.conv1
    slow.stage2.block4.conv1 fast.stage2.block4.conv2 slow.stage2.block4.conv2 fast.stage2.block4.conv3
    slow.stage2.block4.conv3 fast.stage2.block5.conv0 slow.stage2.block5.conv0 fast.stage2.block5.conv1
    slow.stage2.block5.conv1 fast.stage2.block5.conv2 slow.stage2.block5.conv2 fast.stage2.block5.conv3
    slow.stage2.block5.conv3 fusion3.conv_time fusion3.conv_proj slow.stage3.block0.conv0
    fast.stage3.block0.conv0 slow.stage3.block0.conv1 fast.stage3.block0.conv1 slow.stage3.block0.conv2
    fast.stage3.block0.conv2 slow.stage3.block0.conv3 fast.stage3.block0.conv3 slow.stage3.block0.shortcut_conv
    fast.stage3.block0.shortcut_conv slow.stage3.block1.conv0 fast.stage3.block1.conv0 slow.stage3.block1.conv1
    fast.stage3.block1.conv1 slow.stage3.block1.conv2 fast.stage3.block1.conv2 slow.stage3.block1.conv3
    fast.stage3.block1.conv3 slow.stage3.block2.conv0 fast.stage3.block2.conv0 slow.stage3.block2.conv1
    fast.stage3.block2.conv1 slow.stage3.block2.conv2 fast.stage3.block2.conv2 slow.stage3.block2.conv3
    fast.stage3.block2.conv3
    """),
    "dense": _roles("""
    fast.stage0.block0.se.fc1 fast.stage0.block0.se.fc2 slow.stage0.block0.se.fc1 slow.stage0.block0.se.fc2
    fast.stage1.block0.se.fc1 fast.stage1.block0.se.fc2 slow.stage1.block0.se.fc1 slow.stage1.block0.se.fc2
    fast.stage1.block1.se.fc1 fast.stage1.block1.se.fc2 slow.stage1.block1.se.fc1 slow.stage1.block1.se.fc2
    fast.stage2.block0.se.fc1 fast.stage2.block0.se.fc2 slow.stage2.block0.se.fc1 slow.stage2.block0.se.fc2
    fast.stage2.block1.se.fc1 fast.stage2.block1.se.fc2 slow.stage2.block1.se.fc1 slow.stage2.block1.se.fc2
    fast.stage2.block2.se.fc1 fast.stage2.block2.se.fc2 slow.stage2.block2.se.fc1 slow.stage2.block2.se.fc2
    fast.stage2.block3.se.fc1 fast.stage2.block3.se.fc2 slow.stage2.block3.se.fc1 slow.stage2.block3.se.fc2
    fast.stage2.block4.se.fc1 fast.stage2.block4.se.fc2 slow.stage2.block4.se.fc1 slow.stage2.block4.se.fc2
    fast.stage2.block5.se.fc1 fast.stage2.block5.se.fc2 slow.stage2.block5.se.fc1 slow.stage2.block5.se.fc2
    slow.stage3.block0.se.fc1 fast.stage3.block0.se.fc1 slow.stage3.block0.se.fc2 fast.stage3.block0.se.fc2
    slow.stage3.block1.se.fc1 fast.stage3.block1.se.fc1 slow.stage3.block1.se.fc2 fast.stage3.block1.se.fc2
    slow.stage3.block2.se.fc1 fast.stage3.block2.se.fc1 slow.stage3.block2.se.fc2 fast.stage3.block2.se.fc2
    """),
    "scalar_multiply": _roles("""
    - - fast.stage0.block0.skip_gain - slow.stage0.block0.skip_gain - - - fast.stage1.block0.skip_gain -
    slow.stage1.block0.skip_gain - - - fast.stage1.block1.skip_gain - slow.stage1.block1.skip_gain - - -
    fast.stage2.block0.skip_gain - slow.stage2.block0.skip_gain - - - fast.stage2.block1.skip_gain -
    slow.stage2.block1.skip_gain - - - fast.stage2.block2.skip_gain - slow.stage2.block2.skip_gain - - -
    fast.stage2.block3.skip_gain - slow.stage2.block3.skip_gain - - - fast.stage2.block4.skip_gain -
    slow.stage2.block4.skip_gain - - - fast.stage2.block5.skip_gain - slow.stage2.block5.skip_gain - - -
    slow.stage3.block0.skip_gain fast.stage3.block0.skip_gain - - - - slow.stage3.block1.skip_gain
    fast.stage3.block1.skip_gain - - - - slow.stage3.block2.skip_gain fast.stage3.block2.skip_gain
    """),
}


@dataclass(frozen=True)
class H5Variable:
    """One array of the release: its key in our state dict, its HDF5 dataset path and its Keras layout.

    Attributes:
        key: state dict key of `SfNfNetF0`.
        path: dataset path inside `model.weights.h5`.
        layout: "conv" (HWIO kernel, becomes OIHW), "dense" ((in, out) kernel, becomes (out, in)) or "plain".
    """

    key: str
    path: str
    layout: str


@dataclass(frozen=True)
class ImportedWeights:
    """A converted state dict and the identity of the weights it came from.

    Attributes:
        safetensors: local path of the converted state dict.
        weights_sha256: sha256 of the release's `model.weights.h5` bytes.
    """

    safetensors: Path
    weights_sha256: str


def h5_variables() -> list[H5Variable]:
    """Every array of the release, with its HDF5 path derived by Keras 2.13's per-class counter rule."""
    variables: list[H5Variable] = []
    for cls, order in _LAYER_ORDER.items():
        count = 0
        for role in order:
            group = f"{_ROOT}/{cls}" + (f"_{count}" if count else "")
            if role is None:
                count += 1
                continue
            count += 2
            if cls == "weight_standardization":
                variables += [
                    H5Variable(f"{role}.weight_v", f"{group}/vars/0", "conv"),
                    H5Variable(f"{role}.gain", f"{group}/vars/1", "plain"),
                    H5Variable(f"{role}.bias", f"{group}/layer/vars/0", "plain"),
                ]
            elif cls == "dense":
                variables += [
                    H5Variable(f"{role}.weight", f"{group}/vars/0", "dense"),
                    H5Variable(f"{role}.bias", f"{group}/vars/1", "plain"),
                ]
            else:
                variables.append(H5Variable(role, f"{group}/vars/0", "plain"))
    return variables


def read_h5(path: str | os.PathLike[str], expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Read the release's HDF5 into float32 arrays in PyTorch layouts, keyed as `SfNfNetF0`'s state dict.

    Raises:
        WeightsError: h5py is missing, or the file lacks an array or holds one of another shape.
    """
    try:
        import h5py  # optional: only this importer needs it (`pip install catalog-embed[mule]`)
    except ImportError as exc:
        msg = "reading the MULE release needs h5py: pip install 'catalog-embed[mule]'"
        raise WeightsError(msg) from exc
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        if _ROOT not in h5:
            msg = (
                f"{path} has no {_ROOT!r} group (top level: {sorted(h5)[:5]}): it is not a model.weights.h5 "
                "written by Keras 2.13, the layout of the MULE release (Keras 2.14+ files use other paths)"
            )
            raise WeightsError(msg)
        for var in h5_variables():
            node = h5.get(var.path)
            if not isinstance(node, h5py.Dataset):
                msg = (
                    f"{path} lacks {var.path} (our {var.key}): not the SF-NFNet-F0 release, or not saved by "
                    "Keras 2.13"
                )
                raise WeightsError(msg)
            array = np.asarray(node, dtype=np.float32)
            if var.layout == "conv":
                array = array.transpose(3, 2, 0, 1)
            elif var.layout == "dense":
                array = array.T
            expected = tuple(expected_shapes[var.key])
            if array.shape != expected:
                msg = f"{path}: {var.path} (our {var.key}) has PyTorch-layout shape {array.shape}, expected {expected}"
                raise WeightsError(msg)
            arrays[var.key] = np.array(array, order="C")  # ascontiguousarray would make 0-d gains 1-d
    return arrays


def import_weights(
    uri: str, expected_shapes: Mapping[str, tuple[int, ...]], weights_sha256: str | None = None
) -> ImportedWeights:
    """Resolve `uri` to a converted, cached state dict (converting on first use).

    Args:
        uri: `model.keras`, `model.weights.h5`, or a directory holding either or a converted
            `model.safetensors` + `config.json`; local or any fsspec URI.
        expected_shapes: state dict shapes of the network the weights are for.
        weights_sha256: sha256 the file must have (of `model.safetensors` for a converted directory). With a
            cached conversion of that file, `uri` is not read at all.

    Raises:
        WeightsError: unreadable or missing source, pin mismatch, or not the expected network.
    """
    pin = weights_sha256.lower() if weights_sha256 else None
    if pin is not None and not re.fullmatch(r"[0-9a-f]{64}", pin):
        msg = f"weights_sha256 must be 64 hex digits, got {weights_sha256!r}"
        raise WeightsError(msg)
    if pin is not None and (cached := _cached(pin)) is not None:
        return cached
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        msg = f"cannot open weights {uri!r}: {exc}"
        raise WeightsError(msg) from exc
    try:
        if fs.isdir(path):
            return _from_directory(fs, path, uri, expected_shapes, pin)
        if not fs.isfile(path):
            msg = f"weights not found: {uri}"
            raise WeightsError(msg)
        return _from_file(fs, path, expected_shapes, pin)
    except OSError as exc:
        msg = f"cannot read weights {uri}: {exc}"
        raise WeightsError(msg) from exc


def _root() -> Path:
    root = cache_dir() / ENCODER
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cached(key: str) -> ImportedWeights | None:
    entry = _root() / key
    if not (entry / CONVERTED_WEIGHTS).is_file():
        return None
    return _entry(entry)


def _entry(directory: Path) -> ImportedWeights:
    config = json.loads((directory / CONVERTED_CONFIG).read_text())
    return ImportedWeights(directory / CONVERTED_WEIGHTS, config["weights_sha256"])


def _from_directory(
    fs: fsspec.AbstractFileSystem, path: str, uri: str, expected: Mapping[str, tuple[int, ...]], pin: str | None
) -> ImportedWeights:
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    if {CONVERTED_WEIGHTS, CONVERTED_CONFIG} <= names:
        return _from_converted(fs, path, expected, pin)
    for name in (KERAS_FILE, H5_FILE):
        if name in names:
            return _from_file(fs, posixpath.join(path, name), expected, pin)
    msg = (
        f"{uri} holds none of {KERAS_FILE}, {H5_FILE} or a converted {CONVERTED_WEIGHTS} + {CONVERTED_CONFIG}: "
        "point --weights at the MULE release's model.keras"
    )
    raise WeightsError(msg)


def _from_file(
    fs: fsspec.AbstractFileSystem, path: str, expected: Mapping[str, tuple[int, ...]], pin: str | None
) -> ImportedWeights:
    with _staging() as staging:
        local = local_copy(fs, path, staging)
        source_sha = verify_sha256(local, pin)
        if (cached := _cached(source_sha)) is not None:
            return cached
        with open(local, "rb") as fh:
            magic = fh.read(8)
        if magic.startswith(_ZIP_MAGIC):
            h5_path = staging / H5_FILE
            _extract_member(local, h5_path)
            weights_sha = sha256_file(h5_path)
        elif magic == _HDF5_MAGIC:
            h5_path, weights_sha = local, source_sha
        else:
            msg = f"{fs.unstrip_protocol(path)} is neither a .keras zip nor an HDF5 .weights.h5 file"
            raise WeightsError(msg)
        arrays = read_h5(h5_path, expected)
        if h5_path != local:
            h5_path.unlink()  # free the disk before writing the conversion
        out = staging / "out"
        out.mkdir()
        safetensors.numpy.save_file(arrays, str(out / CONVERTED_WEIGHTS))
        config = {
            "encoder": ENCODER,
            "weights_sha256": weights_sha,
            "source_sha256": source_sha,
            "source_name": posixpath.basename(path),
        }
        (out / CONVERTED_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return _publish(out, source_sha)


def _extract_member(archive: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(H5_FILE) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError as exc:
        msg = f"{archive} is a zip without {H5_FILE}: not a Keras .keras file"
        raise WeightsError(msg) from exc
    except zipfile.BadZipFile as exc:
        msg = f"{archive} is a corrupt zip: {exc}"
        raise WeightsError(msg) from exc


def _from_converted(
    fs: fsspec.AbstractFileSystem, path: str, expected: Mapping[str, tuple[int, ...]], pin: str | None
) -> ImportedWeights:
    weights_path = posixpath.join(path, CONVERTED_WEIGHTS)
    config_path = posixpath.join(path, CONVERTED_CONFIG)
    with _staging() as staging:
        local = local_copy(fs, weights_path, staging).parent
        local_copy(fs, config_path, staging)
        sha = verify_sha256(local / CONVERTED_WEIGHTS, pin)
        config = json.loads((local / CONVERTED_CONFIG).read_text())
        if config.get("encoder") != ENCODER or "weights_sha256" not in config:
            msg = f"{fs.unstrip_protocol(config_path)} does not describe converted {ENCODER} weights"
            raise WeightsError(msg)
        _check_safetensors(local / CONVERTED_WEIGHTS, expected)
        if local == staging:
            return _publish(staging, sha)  # a downloaded conversion is cached like a local one
        return _entry(local)


def _check_safetensors(path: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
    with safetensors.safe_open(str(path), framework="np") as st:
        shapes = {key: tuple(st.get_slice(key).get_shape()) for key in st.keys()}  # noqa: SIM118 (not a dict)
    expected = {key: tuple(shape) for key, shape in expected.items()}
    if shapes != expected:
        missing = sorted(expected.keys() - shapes.keys())[:3]
        extra = sorted(shapes.keys() - expected.keys())[:3]
        wrong = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k])[:3]
        msg = f"{path} does not hold SF-NFNet-F0 weights: missing {missing}, unexpected {extra}, misshapen {wrong}"
        raise WeightsError(msg)


@contextmanager
def _staging() -> Iterator[Path]:
    """A scratch directory next to the cache entries, so publishing is a rename on one filesystem."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_root()))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(directory: Path, key: str) -> ImportedWeights:
    """Move a finished conversion into the cache atomically; a concurrent identical one may have won."""
    entry = _root() / key
    try:
        directory.rename(entry)
    except OSError:
        if not (entry / CONVERTED_WEIGHTS).is_file():
            raise
    return _entry(entry)
