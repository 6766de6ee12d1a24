"""Catalog manifests: what tracks exist, where their audio is, and how to tell when it changed.

A catalog is either a manifest file (CSV, Parquet or JSONL with `track_id` and `uri`; other columns are carried
along) or a directory / glob of audio files whose track ids are their paths relative to the catalog root. Any
fsspec URI works: a local path, `file://`, `memory://`, `gs://`, `s3://`. Relative `uri`s in a manifest resolve
against the manifest's folder, and local ones come out absolute whatever the working directory. A path that exists
is a directory or a manifest, never a glob, whatever characters its name holds. The whole manifest is validated
before any audio is read.
"""

from __future__ import annotations

import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from catalog_embed.schemas.errors import ManifestError
from catalog_embed.schemas.records import MISSING_FINGERPRINT, REFUSED_FINGERPRINT

AUDIO_EXTENSIONS = (".mp3", ".ogg", ".oga", ".opus", ".flac", ".m4a", ".aac", ".mp4", ".wav", ".aif", ".aiff")
MANIFEST_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".ndjson": "json"}
REQUIRED_COLUMNS = ("track_id", "uri")
_MAX_LISTED = 5


@dataclass(frozen=True)
class UriPolicy:
    """Which URIs a manifest may point at: manifests can come from untrusted sources.

    Each row's URI must start with an allowed prefix: by default the catalog's own root (the manifest's folder,
    or the directory listed), wherever it is stored. A URI with a `..` segment is refused before resolution, so it
    cannot climb out of an allowed prefix. http(s) is refused unless enabled. A refused row becomes a `failures`
    row; the rest of the catalog runs.

    Attributes:
        allow_prefixes: extra allowed prefixes (`/data/audio`, `s3://media-bucket/`, ...).
        allow_http: allow http:// and https:// URIs.
    """

    allow_prefixes: tuple[str, ...] = ()
    allow_http: bool = False

    def prefixes(self, catalog_uri: str) -> tuple[str, ...]:
        """The allowed prefixes for a catalog at `catalog_uri`, normalised to end with '/'.

        A local prefix comes twice when it holds a symlink: as written and resolved, so files reached through a
        symlinked catalog folder (`/data/catalog` -> `/mnt/disk1/catalog`) stay allowed.
        """
        prefixes = [_as_prefix(p) for p in (catalog_root(catalog_uri), *self.allow_prefixes)]
        real = [_as_prefix(os.path.realpath(path)) for path in map(_local_path, prefixes) if path is not None]
        return tuple(dict.fromkeys(prefixes + real))

    def violation(self, raw_uri: str, resolved_uri: str, prefixes: tuple[str, ...]) -> str | None:
        """Why a row's URI is refused, or None when it is allowed.

        A local path must lie under an allowed prefix both as written and once its symlinks are resolved: a
        symlink in the catalog folder cannot point elsewhere.
        """
        if ".." in raw_uri.replace("\\", "/").split("/"):
            return f"URI {raw_uri!r} contains a '..' segment"
        scheme = resolved_uri.split("://", 1)[0] if "://" in resolved_uri else "file"
        if scheme in ("http", "https"):
            if self.allow_http:
                return None
            return f"URI {raw_uri!r} uses {scheme}, which is off: enable it with --allow-http"
        allowed = ", ".join(prefixes)
        if not _under(resolved_uri, prefixes):
            return f"URI {raw_uri!r} is outside the allowed prefixes {allowed}: add one with --allow-prefix"
        path = _local_path(resolved_uri)
        real = os.path.realpath(path) if path is not None else None
        if real is not None and not _under(real, prefixes):
            return (
                f"URI {raw_uri!r} resolves to {real!r}, outside the allowed prefixes {allowed} (a symlink): "
                "add one with --allow-prefix"
            )
        return None


def catalog_root(uri: str) -> str:
    """The folder a catalog lives in: a manifest's folder, a directory itself, a glob's fixed part.

    Local folders are absolute, so that URIs resolved against them do not depend on the working directory.
    """
    suffix = posixpath.splitext(uri.split("?")[0])[1].lower()
    if suffix in MANIFEST_FORMATS:
        root = uri.rsplit("/", 1)[0] if "/" in uri else "."
    else:
        root = _glob_folder(uri) or uri.rstrip("/") or "/"
    return root if "://" in root else posixpath.abspath(root)


def _glob_folder(uri: str) -> str | None:
    """The fixed folder of a glob catalog, or None when `uri` is no glob.

    A path that exists is never a glob, whatever its name holds: `live [2024]/` is a folder, not a pattern.
    """
    starts = [uri.find(ch) for ch in "*?[" if ch in uri]
    if not starts:
        return None
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        return None
    return uri[: min(starts)].rsplit("/", 1)[0]


def _local_path(uri: str) -> str | None:
    """The absolute path of a local URI (a path or `file://`), None for other schemes."""
    if "://" not in uri:
        return posixpath.abspath(uri)
    if uri.startswith("file://"):
        return posixpath.abspath(uri[len("file://") :])
    return None


def _as_prefix(uri: str) -> str:
    return (_local_path(uri) or uri).rstrip("/") + "/"


def _under(uri: str, prefixes: tuple[str, ...]) -> bool:
    return any(_as_prefix(uri).startswith(p) for p in prefixes)


def read_catalog(uri: str, policy: UriPolicy = UriPolicy()) -> pa.Table:
    """Read and validate a catalog.

    Returns:
        `track_id`, resolved `uri`, `refused` (why the policy refuses the row's URI, else null) and any extra
        columns of the manifest.

    Raises:
        ManifestError: unreadable, missing columns, no rows, empty or duplicate track ids (naming the rows).
    """
    suffix = posixpath.splitext(uri.split("?")[0])[1].lower()
    table = _read_manifest(uri, MANIFEST_FORMATS[suffix]) if suffix in MANIFEST_FORMATS else _list_directory(uri)
    table = validate_catalog(table, uri)
    raw = table["uri"].to_pylist()
    base = catalog_root(uri)
    resolved = [_resolve(u, base) for u in raw]
    prefixes = policy.prefixes(uri)
    refused = [policy.violation(r, u, prefixes) for r, u in zip(raw, resolved, strict=True)]
    table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(resolved, pa.string()))
    return table.append_column("refused", pa.array(refused, pa.string()))


def validate_catalog(table: pa.Table, uri: str) -> pa.Table:
    """Check the manifest contract; see `read_catalog`."""
    repeated = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if repeated:
        msg = f"{uri}: column(s) {', '.join(repeated)} appear more than once in the header: rename or drop the copies"
        raise ManifestError(msg)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        msg = f"{uri}: missing column(s) {', '.join(missing)}; a manifest needs `track_id` and `uri` columns"
        raise ManifestError(msg)
    if table.num_rows == 0:
        msg = f"{uri}: the catalog has no rows (no tracks to embed)"
        raise ManifestError(msg)
    for column in REQUIRED_COLUMNS:
        kind = table.schema.field(column).type
        if pa.types.is_nested(kind):
            msg = f"{uri}: column {column} holds {kind} values: it must hold one string (or number) per row"
            raise ManifestError(msg)
        table = table.set_column(table.schema.get_field_index(column), column, pc.cast(table[column], pa.string()))
    ids = table["track_id"].to_pylist()
    uris = table["uri"].to_pylist()
    empty = [i for i, (t, u) in enumerate(zip(ids, uris, strict=True)) if not (t and t.strip()) or not u]
    if empty:
        msg = f"{uri}: empty track_id or uri in row(s) {_rows(empty)} (rows count from 0, header excluded)"
        raise ManifestError(msg)
    seen: dict[str, int] = {}
    duplicates: list[str] = []
    for i, track_id in enumerate(ids):
        if track_id in seen:
            duplicates.append(f"{track_id!r} (rows {seen[track_id]} and {i})")
        else:
            seen[track_id] = i
    if duplicates:
        msg = f"{uri}: duplicate track_id: {', '.join(duplicates[:_MAX_LISTED])}" + (
            f" and {len(duplicates) - _MAX_LISTED} more" if len(duplicates) > _MAX_LISTED else ""
        )
        raise ManifestError(msg)
    return table


def fingerprints(uris: list[str], threads: int = 16) -> list[str]:
    """Source fingerprints (size plus generation, ETag or modification time) for each URI.

    Stats run in a thread pool because on object stores each is a round trip. A file that cannot be stat-ed gets
    `MISSING_FINGERPRINT`, so it is planned, fails at read time, and lands in `failures` with its reason.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(_fingerprint, uris))


def catalog_fingerprints(catalog: pa.Table) -> list[str]:
    """Fingerprints of a catalog's rows; rows the URI policy refused are never touched (`REFUSED_FINGERPRINT`)."""
    allowed = [i for i, reason in enumerate(catalog["refused"].to_pylist()) if reason is None]
    uris = catalog["uri"].to_pylist()
    prints = [REFUSED_FINGERPRINT] * catalog.num_rows
    for i, fingerprint in zip(allowed, fingerprints([uris[i] for i in allowed]), strict=True):
        prints[i] = fingerprint
    return prints


def fingerprint_from_info(info: dict[str, Any]) -> str:
    """Build a fingerprint from an fsspec `info()` dict, whatever the filesystem."""
    size = info.get("size")
    for key in ("generation", "ETag", "etag", "mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if value not in (None, ""):
            return f"size={size};{key.lower()}={str(value).strip(chr(34))}"
    return f"size={size}"


def _fresh(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of `uri`, minus what the filesystem cached about the path.

    fsspec shares one filesystem per process, and s3fs answers `info` and `open` from listings it cached earlier:
    a long-lived process (a scheduler, a notebook, a driver that runs nightly) would fingerprint an object as it
    was when first listed, and fail to read a manifest overwritten since.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(path)
    return fs, path


def _fingerprint(uri: str) -> str:
    try:
        fs, path = _fresh(uri)
        return fingerprint_from_info(fs.info(path))
    except (OSError, ValueError):
        return MISSING_FINGERPRINT


def _read_manifest(uri: str, fmt: str) -> pa.Table:
    try:
        fs, path = _fresh(uri)
        with fs.open(path, "rb") as fh:
            if fmt == "parquet":
                table = pq.read_table(fh)
            elif fmt == "csv":
                # Ids stay strings even when they look like numbers ("007" is not 7).
                table = pacsv.read_csv(
                    fh, convert_options=pacsv.ConvertOptions(column_types={"track_id": pa.string(), "uri": pa.string()})
                )
            else:
                table = pajson.read_json(fh)
    except FileNotFoundError as exc:
        msg = f"manifest not found: {uri}"
        raise ManifestError(msg) from exc
    except (pa.ArrowInvalid, OSError) as exc:
        msg = f"cannot parse manifest {uri} as {fmt}: {exc}"
        raise ManifestError(msg) from exc
    return table


def _resolve(uri: str, base: str) -> str:
    """Relative URIs resolve against the catalog's folder; absolute ones and other schemes stay as they are."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return posixpath.normpath(posixpath.join(base, uri)) if "://" not in base else f"{base}/{uri}"


def _list_directory(uri: str) -> pa.Table:
    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        msg = f"cannot open catalog {uri}: {exc}"
        raise ManifestError(msg) from exc
    folder = _glob_folder(uri)
    if folder is not None:
        paths = fs.glob(root)
        root = fsspec.core.url_to_fs(folder)[1]
    elif fs.isdir(root):
        paths = fs.find(root)
    else:
        msg = f"catalog {uri} is neither a manifest (.csv, .parquet, .jsonl) nor a directory or glob of audio"
        raise ManifestError(msg)
    paths = sorted(p for p in paths if p.lower().endswith(AUDIO_EXTENSIONS))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    uris = [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in paths]
    ids = [posixpath.relpath(p, root) for p in paths]
    return pa.table({"track_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string())})


def _rows(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:_MAX_LISTED])
    return shown + (f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else "")
