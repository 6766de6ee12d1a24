"""Where an `hf:` checkpoint lives, what it is, and what identifies it: resolution, family, version, licence.

A name `hf:<repo-id or local path>[@revision]` resolves to a local folder: a local path as it is (revision
'local'), a hub repository through the Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`), downloaded on first use and
read from the cache after that; with `HF_HUB_OFFLINE=1` nothing is downloaded and a checkpoint missing from the
cache is an error naming how to fill it. Everything here runs before any audio is read.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from catalog_embed.schemas.errors import EncoderError, first_line
from catalog_embed.workers.encoders import HF_PREFIX as PREFIX

UNKNOWN_LICENCE = "unknown: check the model card"

# What a snapshot download fetches: configs, weights in the formats PyTorch loads, remote code (only ever run with
# --trust-remote-code), extractor and tokenizer files (the text tower of CLAP: vocab.json, merges.txt) and the model
# card. TF, Flax and ONNX exports are skipped.
_ALLOW = ["*.json", "*.safetensors", "*.bin", "*.py", "*.txt", "README.md"]
_IGNORE = ["*tf_model*", "*flax_model*", "*.onnx", "*.msgpack", "*.h5"]
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HEX = re.compile(r"[0-9a-f]{1,40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CheckpointRef:
    """An `hf:` name taken apart.

    Attributes:
        source: the repository id or local path, as given.
        revision: the branch, tag or commit asked for; None for the default branch (and always for a local path).
        local: whether `source` is a folder on this machine.
    """

    source: str
    revision: str | None
    local: bool

    @property
    def name(self) -> str:
        """The model's name in the tables: the checkpoint without its revision (the revision is in the version)."""
        return f"{PREFIX}{self.source}"

    @classmethod
    def parse(cls, name: str) -> CheckpointRef:
        """Split `hf:<repo-id or local path>[@revision]`.

        Raises:
            EncoderError: nothing after `hf:`, or an empty revision.
        """
        body = name.removeprefix(PREFIX)
        if not body:
            msg = f"model {name!r} names no checkpoint: use hf:<repo-id>[@revision] or hf:<local folder>"
            raise EncoderError(msg)
        if Path(body).is_dir():
            return cls(source=body, revision=None, local=True)
        source, at, revision = body.rpartition("@")
        if not at:
            source, revision = body, None
        elif not revision or not source:
            msg = f"model {name!r}: write hf:<repo-id>@<revision> with both parts, or hf:<repo-id>"
            raise EncoderError(msg)
        local = source.startswith((".", "/", "~")) or Path(source).is_dir()
        if local and not Path(source).expanduser().is_dir():
            msg = f"model {name!r}: {source} is not a folder; give a checkpoint folder or a hub repository id"
            raise EncoderError(msg)
        if local and revision is not None:
            msg = f"model {name!r}: a local checkpoint folder has no revision; drop @{revision}"
            raise EncoderError(msg)
        return cls(source=source, revision=revision, local=local)


def hub_offline() -> bool:
    """Whether the Hugging Face hub may not be contacted (`HF_HUB_OFFLINE`, or transformers' older variable)."""
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache() -> Path:
    """The hub cache folder as huggingface_hub resolves it, read when called (tests and users may set it late)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def resolve_folder(ref: CheckpointRef) -> tuple[Path, str]:
    """The local folder holding the checkpoint, and its revision: the commit hash for a hub snapshot, else 'local'.

    Raises:
        EncoderError: a hub checkpoint that is neither cached nor downloadable (offline, unknown, unreachable).
    """
    if ref.local:
        return Path(ref.source).expanduser().resolve(), "local"
    from huggingface_hub import snapshot_download  # the hub client only when a hub name is used

    offline = hub_offline()
    try:
        folder = Path(snapshot_download(
            ref.source, revision=ref.revision, cache_dir=hub_cache(), local_files_only=offline,
            allow_patterns=_ALLOW, ignore_patterns=_IGNORE,
        ))
    except Exception as exc:  # the hub client raises many types (HTTP, validation, cache misses): all mean "not here"
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else f"it could not be fetched ({first_line(exc, with_type=True)})"
        revision = f" --revision {ref.revision}" if ref.revision else ""
        msg = (
            f"hf:{ref.source}: {why} ({hub_cache()}): download it once with `hf download {ref.source}{revision}`, "
            "set HF_HOME to a cache that holds it, or unset HF_HUB_OFFLINE"
        )
        raise EncoderError(msg) from exc
    commit = folder.name if _COMMIT.fullmatch(folder.name) else "local"
    return folder, commit


def cached_commit(source: str, prefix: str) -> str | None:
    """The commit of the one snapshot of hub repository `source` in the hub cache whose commit starts with `prefix`
    (a version's revision part), or None where the cache holds none or several."""
    snapshots = hub_cache() / f"models--{source.replace('/', '--')}" / "snapshots"
    if not _HEX.fullmatch(prefix) or not snapshots.is_dir():
        return None
    found = [path.name for path in snapshots.iterdir() if _COMMIT.fullmatch(path.name) and path.name.startswith(prefix)]
    return found[0] if len(found) == 1 else None



def weight_files(folder: Path) -> list[Path]:
    """The weight files `transformers` loads from `folder`: its safetensors files, else its PyTorch pickles."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


def weights_digest(folder: Path) -> str:
    """Hex sha256 over the names and sha256s of the checkpoint's weight files.

    A hub snapshot links each large file to a blob named by its sha256 (git LFS), which is read instead of
    hashing gigabytes again; other files are hashed.
    """
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(f"{path.name}:{_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    if path.is_symlink() and _SHA256.fullmatch(Path(os.readlink(path)).name):
        return Path(os.readlink(path)).name
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def card_licence(folder: Path) -> str:
    """The licence the model card (README.md's YAML front matter, `license:`) states, else `UNKNOWN_LICENCE`."""
    card = folder / "README.md"
    if not card.is_file():
        return UNKNOWN_LICENCE
    text = card.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---", text, flags=re.DOTALL)
    if match is None:
        return UNKNOWN_LICENCE
    try:
        meta: Any = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return UNKNOWN_LICENCE
    if not isinstance(meta, dict) or not meta.get("license"):
        return UNKNOWN_LICENCE
    licence = meta["license"]
    licence = ", ".join(map(str, licence)) if isinstance(licence, list) else str(licence)
    # "other" means the card names its own terms (license_name / license_link): show them.
    if licence == "other" and meta.get("license_name"):
        licence = f"other: {meta['license_name']}"
    return licence
