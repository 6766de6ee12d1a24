"""Importing OpenAI's released Jukebox checkpoints: a folder holding the VQ-VAE's and the top-level prior's files.

`--weights` names a folder (a local path or any fsspec URI) holding Jukebox's two files under their release names:
`vqvae.pth.tar` and `prior_level_2.pth.tar` (for the 5B model, from openaipublic.azureedge.net/jukebox/models/5b/;
Jukebox's own cache, ~/.cache/jukebox/models/5b/, is such a folder). Each is a torch pickle of
`{"model": state_dict, ...}`, read with `torch.load(weights_only=True)`: tensors and plain containers, plus numpy
scalars and dtypes, which rebuild numbers and run no code (Jukebox's `save_checkpoint` stores its hyperparameters
beside the weights, some computed with numpy); any other pickled object is refused. Only the VQ-VAE's top-level
encoder and codebook and the prior's embeddings and transformer are kept, checked name by name and shape by shape
against the configuration, converted once to safetensors and cached, keyed by the files' sha256.

The folder may also hold `jukemir-config.json`, a `JukeboxConfig` in JSON (fields left out keep 5B's values): the
architecture of a smaller Jukebox-shaped model, such as the tiny random ones the tests build. Without it the
folder must hold Jukebox 5B, and every shape is checked against 5B's.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import safetensors
import safetensors.torch
import torch

from catalog_embed.schemas.errors import WeightsError
from catalog_embed.workers.encoders.jukemir.config import JUKEBOX_5B, JukeboxConfig
from catalog_embed.workers.encoders.jukemir.model import JukeboxFeatures
from catalog_embed.workers.encoders.weights import cache_dir, local_copy, sha256_file, state_dict_sha256

CACHE = "jukemir"
VQVAE_FILE = "vqvae.pth.tar"
PRIOR_FILE = "prior_level_2.pth.tar"
CONFIG_FILE = "jukemir-config.json"

# Value-only types a Jukebox checkpoint's hyperparameters may pickle: numpy scalars (under numpy 1's module name
# too) and their dtypes. They rebuild numbers; nothing else outside torch's default allowlist is let through.
_NUMPY_SCALAR = np._core.multiarray.scalar  # noqa: SLF001 (numpy's own pickling entry point)
_SAFE_GLOBALS = [
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(t)) for t in (np.bool_, np.int32, np.int64, np.float32, np.float64)),
]


def release_key(key: str, levels: int) -> tuple[str, str]:
    """The release file (`VQVAE_FILE` or `PRIOR_FILE`) and key holding the entry our `key` names.

    `vqvae.level_blocks.0.model.0.0.weight` -> (vqvae, `encoders.2.level_blocks.0.model.0.0.weight`) for a
    3-level VQ-VAE; `vqvae.codebook` -> `bottleneck.level_blocks.2.k`; `labels.artist_emb.weight` ->
    (prior, `y_emb.artist_emb.emb.weight`); `prior.pos_emb` -> `prior.pos_emb.pos_emb`; `prior.blocks.3.mlp.c_fc.w`
    -> `prior.transformer._attn_mods.3.mlp.c_fc.w`.
    """
    top = levels - 1
    if key == "vqvae.codebook":
        return VQVAE_FILE, f"bottleneck.level_blocks.{top}.k"
    if key.startswith("vqvae."):
        return VQVAE_FILE, f"encoders.{top}.{key.removeprefix('vqvae.')}"
    if key.startswith("labels."):
        name = key.removeprefix("labels.").removesuffix(".weight")
        return PRIOR_FILE, f"y_emb.{name}.emb.weight"
    if key == "prior.pos_emb":
        return PRIOR_FILE, "prior.pos_emb.pos_emb"
    return PRIOR_FILE, key.replace("prior.blocks.", "prior.transformer._attn_mods.")


def expected_shapes(config: JukeboxConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's entries at the released depth, and their shapes, without allocating them."""
    with torch.device("meta"):
        network = JukeboxFeatures(config, config.depth)
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


# Release entries that JukeMIR's extraction does not use: the prior's output projection.
_UNUSED = re.compile(r"prior\.x_out\.weight")
# What the release files hold of the parts we keep: anything else under these prefixes is not Jukebox's.
_KEPT = {VQVAE_FILE: lambda k, top: k.startswith((f"encoders.{top}.", f"bottleneck.level_blocks.{top}.")),
         PRIOR_FILE: lambda k, top: k.startswith(("prior.", "y_emb."))}


def release_state_dict(states: Mapping[str, object], config: JukeboxConfig, source: str) -> dict[str, torch.Tensor]:
    """Our state dict, in the files' dtypes, from the two files' loaded contents (`{"model": state_dict, ...}` each).

    Raises:
        WeightsError: a file holds no state dict, or its entries are missing, unexpected or misshapen.
    """
    models: dict[str, Mapping[str, torch.Tensor]] = {}
    for name, checkpoint in states.items():
        state = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            msg = f"{source}/{name} holds no {{'model': state_dict}}: pass the folder of Jukebox's released files"
            raise WeightsError(msg)
        # Jukebox strips DistributedDataParallel's prefix when it restores; so do we.
        models[name] = {k.removeprefix("module."): v for k, v in state.items()}
    levels = len(config.downs_t)
    expected = expected_shapes(config)
    wanted = {release_key(key, levels): key for key in expected}
    problems: list[str] = []
    for name, state in models.items():
        keys = {theirs for file, theirs in wanted if file == name}
        missing = sorted(keys - state.keys())
        unexpected = sorted(k for k in state.keys() - keys if _KEPT[name](k, levels - 1) and not _UNUSED.fullmatch(k))
        misshapen = [
            f"{k} {tuple(state[k].shape)} (expected {expected[wanted[name, k]]})"
            for k in sorted(keys & state.keys())
            if tuple(state[k].shape) != expected[wanted[name, k]]
        ]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if items:
                problems.append(f"{name}: {label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
    if problems:
        layout = "Jukebox 5B" if config == JUKEBOX_5B else f"the architecture of {CONFIG_FILE}"
        msg = f"{source} does not hold {layout}: {'; '.join(problems)}"
        raise WeightsError(msg)
    # Dtypes kept (the release stores the prior's linear weights in float16, half the cache); loading into the
    # network's float32 parameters widens them exactly, as Jukebox's float32 forward pass does.
    return {ours: models[file][theirs].detach().to("cpu").contiguous() for (file, theirs), ours in wanted.items()}


@dataclass(frozen=True)
class ImportedWeights:
    """A converted folder in the cache: our state dict as safetensors, its configuration and its digest."""

    path: Path
    config: JukeboxConfig
    weights_sha256: str


def import_folder(uri: str) -> ImportedWeights:
    """Convert a folder of Jukebox checkpoints to a cached safetensors file, once per content.

    Raises:
        WeightsError: the folder or a file is missing or unreadable, the configuration file is not one, or the
            checkpoints are not Jukebox's of that configuration.
    """
    root = cache_dir() / CACHE
    root.mkdir(parents=True, exist_ok=True)
    try:
        fs, folder = fsspec.core.url_to_fs(uri)
        paths = {name: f"{folder.rstrip('/')}/{name}" for name in (VQVAE_FILE, PRIOR_FILE)}
        absent = [name for name, path in paths.items() if not fs.isfile(path)]
        if absent:
            msg = (
                f"{uri} lacks {' and '.join(absent)}: pass the folder holding Jukebox 5B's {VQVAE_FILE} and "
                f"{PRIOR_FILE} (openaipublic.azureedge.net/jukebox/models/5b/)"
            )
            raise WeightsError(msg)
        config = folder_config(uri)
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=root) as staging:
            local = {name: local_copy(fs, path, Path(staging)) for name, path in paths.items()}
            digest = hashlib.sha256(json.dumps(config.to_json(), sort_keys=True).encode())
            for name in (VQVAE_FILE, PRIOR_FILE):
                digest.update(sha256_file(local[name]).encode())
            entry = root / f"{digest.hexdigest()}.safetensors"
            if entry.is_file():
                return _cached(entry)
            state = release_state_dict({name: _load(path, f"{uri}/{name}") for name, path in local.items()}, config, uri)
            weights_sha = state_dict_sha256(state)
            converted = Path(staging) / "model.safetensors"
            metadata = {"weights_sha256": weights_sha, "config": json.dumps(config.to_json())}
            safetensors.torch.save_file(state, str(converted), metadata=metadata)
            os.replace(converted, entry)  # atomic: a concurrent identical conversion may win, with the same bytes
    except OSError as exc:
        msg = f"cannot read weights {uri}: {exc}"
        raise WeightsError(msg) from exc
    return ImportedWeights(entry, config, weights_sha)


def folder_config(uri: str) -> JukeboxConfig:
    """The configuration of a weights folder (only its `CONFIG_FILE` is read): Jukebox 5B when it has none.

    Raises:
        WeightsError: the configuration file is unreadable or not a `JukeboxConfig`.
    """
    source = f"{uri.rstrip('/')}/{CONFIG_FILE}"
    try:
        fs, folder = fsspec.core.url_to_fs(uri)
        path = f"{folder.rstrip('/')}/{CONFIG_FILE}"
        if not fs.isfile(path):
            return JUKEBOX_5B
        data = json.loads(fs.cat_file(path))
    except OSError as exc:
        msg = f"cannot read {source}: {exc}"
        raise WeightsError(msg) from exc
    except ValueError as exc:
        msg = f"{source} is not JSON ({exc}): write a JukeboxConfig's fields as a JSON object, or remove it for 5B"
        raise WeightsError(msg) from exc
    return JukeboxConfig.from_json(data, source)


def _load(path: Path, source: str) -> object:
    """`torch.load` with `weights_only=True`, numpy scalars and dtypes allowed (`_SAFE_GLOBALS`), no pickled code."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Unsupported global" in str(exc):
            first = re.search(r"Unsupported global: GLOBAL \S+", str(exc)).group(0)
        msg = f"{source} is not a PyTorch checkpoint readable without pickled code ({first[:160]})"
        raise WeightsError(msg) from exc


def _cached(path: Path) -> ImportedWeights:
    """A cache entry, with the configuration and digest recorded in its metadata."""
    with safetensors.safe_open(str(path), framework="pt") as st:
        metadata = st.metadata() or {}
    if "weights_sha256" not in metadata or "config" not in metadata:
        msg = f"{path} is not a conversion made by catalog-embed: delete it and run again"
        raise WeightsError(msg)
    config = JukeboxConfig.from_json(json.loads(metadata["config"]), str(path))
    return ImportedWeights(path, config, metadata["weights_sha256"])
