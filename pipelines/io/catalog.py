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

    def violations(self, raw: pa.Array, resolved: pa.Array, prefixes: tuple[str, ...]) -> pa.Array:
        """Why each row's URI is refused (null where it is allowed).

        A local path must lie under an allowed prefix both as written and once its symlinks are resolved: a
        symlink in the catalog folder cannot point elsewhere.

        Args:
            raw: the URIs as the manifest wrote them.
            resolved: the same URIs resolved against the catalog's folder.
            prefixes: the allowed prefixes (`prefixes`).
        """
        dotdot = pc.match_substring_regex(pc.replace_substring(raw, "\\", "/"), r"(^|/)\.\.(/|$)")
        http = pc.or_(pc.starts_with(resolved, "http://"), pc.starts_with(resolved, "https://"))
        written, real = _local_forms(resolved)
        outside = pc.invert(_under_all(written, prefixes))
        escapes = pc.and_(pc.is_valid(real), pc.invert(_under_all(real, prefixes)))
        checked = pc.and_not(pc.or_(outside, escapes), http)
        refused = pc.or_(dotdot, pc.or_(checked, pc.and_(http, pa.scalar(not self.allow_http))))
        rows = pc.indices_nonzero(refused)
        reasons: list[str | None] = [None] * len(raw)
        allowed = ", ".join(prefixes)
        for i, uri, target, is_dotdot, is_http, is_outside in zip(
            rows.to_pylist(),
            raw.take(rows).to_pylist(),
            real.take(rows).to_pylist(),
            dotdot.take(rows).to_pylist(),
            http.take(rows).to_pylist(),
            outside.take(rows).to_pylist(),
            strict=True,
        ):
            if is_dotdot:
                reasons[i] = f"URI {uri!r} contains a '..' segment"
            elif is_http:
                scheme = resolved[i].as_py().split("://", 1)[0]
                reasons[i] = f"URI {uri!r} uses {scheme}, which is off: enable it with --allow-http"
            elif is_outside:
                reasons[i] = f"URI {uri!r} is outside the allowed prefixes {allowed}: add one with --allow-prefix"
            else:
                reasons[i] = (
                    f"URI {uri!r} resolves to {target!r}, outside the allowed prefixes {allowed} (a symlink): "
                    "add one with --allow-prefix"
                )
        return pa.array(reasons, pa.string())


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


def _under_all(paths: pa.Array, prefixes: tuple[str, ...]) -> pa.Array:
    """Which of `paths` (local paths or URIs, no trailing '/'; null: none) lie under one of `prefixes`."""
    slashed = pc.binary_join_element_wise(paths, "/", "")
    under = pa.repeat(False, len(paths))
    for prefix in prefixes:
        under = pc.or_(under, pc.starts_with(slashed, prefix))
    return under.fill_null(False)


def _split_folders(uris: pa.Array) -> tuple[pa.DictionaryArray, pa.Array]:
    """Each URI's folder (up to its last '/', kept; one dictionary entry per distinct folder) and file name."""
    parts = pc.extract_regex(uris, r"(?P<folder>.*/)?(?P<name>[^/]*)$")
    return parts.field("folder").dictionary_encode(), parts.field("name")


def _local_forms(uris: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Each URI as the prefix check reads it (a local one absolute, without a trailing '/'), and each local one
    with its symlinks resolved (null for other schemes).

    Resolved folder by folder, because `realpath` walks every component of a path: each distinct folder is
    resolved once, and one listing of it tells which of its files are themselves symlinks. Only those, and names
    that are not plain file names, are resolved one by one, so a million files in a thousand folders cost a
    thousand resolutions, not a million.
    """
    folders, names = _split_folders(uris)
    absolute: list[str | None] = []
    real: list[str | None] = []
    one_by_one: list[str] = []
    for folder in folders.dictionary.to_pylist():
        path = _local_path(folder) if folder else None
        absolute.append(None if path is None else path.rstrip("/"))
        real.append(None if path is None else os.path.realpath(path).rstrip("/"))
        if path is not None:
            one_by_one += [folder + entry.name for entry in _scandir(path) if entry.is_symlink()]
    local_written = pc.binary_join_element_wise(pa.array(absolute, pa.string()).take(folders.indices), names, "/")
    local_real = pc.binary_join_element_wise(pa.array(real, pa.string()).take(folders.indices), names, "/")
    odd = pc.is_in(names, pa.array(["", ".", ".."]))
    slow = pc.and_(pc.is_valid(local_written), pc.or_(odd, pc.is_in(uris, pa.array(one_by_one, pa.string()))))
    slow_paths = [_local_path(uri) or uri for uri in uris.filter(slow).to_pylist()]
    local_written = pc.replace_with_mask(local_written, slow, pa.array([p.rstrip("/") for p in slow_paths], pa.string()))
    local_real = pc.replace_with_mask(local_real, slow, pa.array([os.path.realpath(p) for p in slow_paths], pa.string()))
    written = pc.coalesce(local_written, pc.replace_substring_regex(uris, "/+$", ""))
    return written, local_real


def _scandir(path: str) -> list[os.DirEntry]:
    """A folder's entries; none when it cannot be listed (its files are then missing, or unreadable, anyway)."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


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
    raw = table["uri"].combine_chunks()
    resolved = _resolve(raw, catalog_root(uri))
    refused = policy.violations(raw, resolved, policy.prefixes(uri))
    table = table.set_column(table.schema.get_field_index("uri"), "uri", resolved)
    return table.append_column("refused", refused)


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
    ids, uris = table["track_id"], table["uri"]
    empty = pc.or_(
        pc.equal(pc.utf8_trim_whitespace(ids), "").fill_null(True), pc.equal(uris, "").fill_null(True)
    )
    if pc.any(empty).as_py():
        rows = pc.indices_nonzero(empty).to_pylist()
        msg = f"{uri}: empty track_id or uri in row(s) {_rows(rows)} (rows count from 0, header excluded)"
        raise ManifestError(msg)
    if pc.count_distinct(ids).as_py() < table.num_rows:
        seen: dict[str, int] = {}
        duplicates: list[str] = []
        for i, track_id in enumerate(ids.to_pylist()):
            if track_id in seen:
                duplicates.append(f"{track_id!r} (rows {seen[track_id]} and {i})")
            else:
                seen[track_id] = i
        msg = f"{uri}: duplicate track_id: {', '.join(duplicates[:_MAX_LISTED])}" + (
            f" and {len(duplicates) - _MAX_LISTED} more" if len(duplicates) > _MAX_LISTED else ""
        )
        raise ManifestError(msg)
    return table


def fingerprints(uris: list[str], threads: int = 16) -> list[str]:
    """Source fingerprints (size plus generation, ETag or modification time) for each URI: what the filesystem's
    `info()` tells, read in bulk.

    A local file is stat-ed directly: building a filesystem object per file cost more than the stat. Objects
    elsewhere are read from one listing per distinct folder, never a HEAD request each: a million objects in a
    thousand prefixes cost about a thousand list requests (a page holds a thousand keys on S3). The listings
    run in a thread pool because on object stores each is a round trip. A file that cannot be stat-ed, or is
    not in its folder's listing, gets `MISSING_FINGERPRINT`, so it is planned, fails at read time, and lands in
    `failures` with its reason.
    """
    prints = [MISSING_FINGERPRINT] * len(uris)
    remote: dict[str, list[tuple[int, str]]] = {}
    for i, uri in enumerate(uris):
        path = _local_path(uri)
        if path is not None:
            prints[i] = _local_fingerprint(path)
        else:
            folder, _, name = uri.rpartition("/")
            remote.setdefault(folder, []).append((i, name))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for rows, listing in zip(remote.values(), pool.map(_listing, remote), strict=True):
            for i, name in rows:
                if name in listing:
                    prints[i] = fingerprint_from_info(listing[name])
    return prints


def catalog_fingerprints(catalog: pa.Table) -> list[str]:
    """Fingerprints of a catalog's rows; rows the URI policy refused are never touched (`REFUSED_FINGERPRINT`)."""
    allowed = pc.indices_nonzero(pc.is_null(catalog["refused"].combine_chunks())).to_pylist()
    prints = [REFUSED_FINGERPRINT] * catalog.num_rows
    for i, fingerprint in zip(allowed, fingerprints(catalog["uri"].take(allowed).to_pylist()), strict=True):
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


def _local_fingerprint(path: str) -> str:
    """What `fingerprint_from_info` makes of fsspec's local `info()`: the size and mtime of the symlink's target."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return MISSING_FINGERPRINT
    return fingerprint_from_info({"size": stat.st_size, "mtime": stat.st_mtime})


def _listing(folder: str) -> dict[str, dict[str, Any]]:
    """File name -> `info()` of the entries directly in `folder` (a URI), from one listing (paged by the
    filesystem); empty when the folder cannot be listed."""
    try:
        fs, path = _fresh(folder)
        entries = fs.ls(path, detail=True)
    except (OSError, ValueError):
        return {}
    # The filesystem keeps what it listed: a million objects' entries held for the process's life, and read
    # back later as if current (see `_fresh`).
    fs.invalidate_cache(path)
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries}


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


def _resolve(uris: pa.Array, base: str) -> pa.Array:
    """Relative URIs resolve against the catalog's folder; absolute ones and other schemes stay as they are.

    Local results are normalised (`normpath`), one by one only where a path needs it (`.` or `..` segments,
    repeated or trailing slashes): joining is enough for the rest.
    """
    relative = pc.invert(pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/")))
    if "://" in base:
        return pc.if_else(relative, pc.binary_join_element_wise(base, uris, "/"), uris)
    joined = pc.binary_join_element_wise(base.rstrip("/"), uris, "/")
    untidy = pc.and_(relative, pc.match_substring_regex(uris, r"(^|/)\.\.?(/|$)|//|/$"))
    tidied = [posixpath.normpath(path) for path in joined.filter(untidy).to_pylist()]
    return pc.if_else(relative, pc.replace_with_mask(joined, untidy, pa.array(tidied, pa.string())), uris)


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
