"""The one table store every runner writes through: Delta tables under an output root, staged part files, and
commit steps that each run once.

Layout under the root (any fsspec/deltalake URI: local, s3://, gs://):

    embeddings/  windows/  failures/  runs/       Delta tables (see catalog_embed.schemas.tables)
    _staging/<run_id>/<table>/part-<shard>.parquet  part files written by workers, invisible to readers

Workers write part files with deterministic names, so a retried shard overwrites itself instead of duplicating.
The store is generic: it writes and reads staged parts, merges rows by a table's key (upserts, deletions and
`deleted` marks in one commit), and runs a commit step tagged with a Delta application transaction unless that
transaction is already in the table. What a
run commits, in which order, and what decides whether a staged run may be committed at all is the embed job's
(`catalog_embed.pipelines.embed.lifecycle`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import posixpath
import random
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, ParamSpec, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from catalog_embed.schemas.errors import ConfigError, TableError, first_line
from catalog_embed.schemas.tables import SCHEMA_VERSION, TABLES, TableSpec
from catalog_embed.workers import failpoints
from catalog_embed.workers.transient import configure_s3fs, storage_unavailable, unavailable_error

configure_s3fs()

SCHEMA_VERSION_KEY = "catalog_embed.schema_version"
STAGING = "_staging"
# What an output root may hold besides the tables: a root with anything else is not ours to write into.
ROOT_ENTRIES = (*TABLES, STAGING, "_indexes")
# `_atomic` writes a local file as `<name>.tmp-<32 hex digits>` beside it, then renames it.
TEMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{32}")
# Run ids name folders and Delta transactions: a safe character set, no separators, no leading dot.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A commit that loses a race with another writer is retried on the new version with exponential backoff.
_COMMIT_ATTEMPTS = 6
_COMMIT_BACKOFF_S = 0.2
# Removals of a staging folder that another remover empties at the same time, before the last one raises.
_DROP_ATTEMPTS = 5
# The names deltalake (object_store) accepts for an S3 endpoint; s3fs calls it `endpoint_url`.
_S3_ENDPOINT_KEYS = ("aws_endpoint_url", "aws_endpoint", "endpoint_url", "endpoint")
# Retries of a table read through Arrow's S3 client when `max_retries` is not given (deltalake's default is 10).
S3_READ_RETRIES = 10
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


P = ParamSpec("P")
R = TypeVar("R")


def _store_io(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make a store method end with `StorageUnavailableError` (exit 75, resumable) when the store keeps failing
    past its clients' retries (botocore's under s3fs, object_store's under deltalake), instead of a traceback or
    an error that blames the table or the track."""

    def wrap(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                if storage_unavailable(exc):
                    raise unavailable_error(f"{what} under {args[0].root}", exc) from exc
                raise

        return run

    return wrap


def app_id(run_id: str) -> str:
    """The Delta application-transaction id a run's commits carry."""
    return f"catalog-embed:{run_id}"


def run_id_problem(run_id: str) -> str | None:
    """Why `run_id` cannot name a run (it becomes a folder under `_staging/`), or None when it can."""
    if _RUN_ID.fullmatch(run_id) is None:
        return (
            f"run id {run_id!r} is not allowed: use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (no '/', no '..')"
        )
    return None


class TableStore:
    """Tables, staging and commits under one output root.

    Args:
        root: the output URI (a local path or any URI deltalake and fsspec both understand).
        storage_options: passed to deltalake (e.g. an S3 endpoint); credentials come from the environment.
    """

    def __init__(self, root: str, storage_options: dict[str, str] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or None
        # No listings cache: workers in other processes (Ray, Beam, a second run) add parts after this process
        # listed a folder, and a commit that trusted a cached listing would silently leave their rows out.
        self.fs, self.root_path = fsspec.core.url_to_fs(
            self.root, use_listings_cache=False, **_fsspec_options(self.root, self.storage_options)
        )

    def uri(self, spec: TableSpec) -> str:
        """The URI of one table."""
        return f"{self.root}/{spec.name}"

    def table(self, spec: TableSpec) -> DeltaTable:
        """Open a table.

        Raises:
            TableError: it does not exist, its log is damaged (naming the file and the fix), or it cannot be read.
        """
        table = self._open(spec)
        if table is None:
            msg = f"no {spec.name} table at {self.uri(spec)}: run `catalog-embed embed` with --out {self.root} first"
            raise TableError(msg)
        return table

    def _open(self, spec: TableSpec) -> DeltaTable | None:
        """The table, or None when there is none (its folder holds no Delta log and no data files).

        deltalake's errors about a damaged log name no file (or a Rust debug dump of one), so the log is examined
        here to name the file and what to do about it; nothing is ever written to fix it.
        """
        path = posixpath.join(self.root_path, spec.name)
        try:
            return DeltaTable(self.uri(spec), storage_options=self.storage_options)
        except TableNotFoundError:
            # A folder of data files whose log is gone is a table that lost its history, not a place to create one.
            problem = _data_without_log(self.fs, path)
        except (DeltaError, OSError) as exc:
            if storage_unavailable(exc):
                raise unavailable_error(f"opening {self.uri(spec)}", exc) from exc
            problem = _log_problem(self.fs, path)
            if problem is None:
                msg = f"cannot open {self.uri(spec)}: {first_line(exc)}; check --out and its credentials"
                raise TableError(msg) from exc
        if problem is None:
            return None
        msg = f"the {spec.name} table at {self.uri(spec)} is damaged: {problem}"
        raise TableError(msg)

    def check_root(self) -> None:
        """Refuse an output root that is not a table set of ours: a file, a Delta table itself, a folder inside one,
        or a folder holding anything but our tables.

        Raises:
            TableError: naming what is there and what --out should be instead.
        """
        path = self.root_path.rstrip("/")
        try:
            if self.fs.isfile(path):
                msg = f"--out {self.root} is a file: give a folder (new or written by catalog-embed)"
                raise TableError(msg)
            parent = path
            while parent not in ("", "/", "."):
                if self.fs.exists(posixpath.join(parent, "_delta_log")):
                    if parent == path:
                        msg = (
                            f"--out {self.root} is a Delta table itself: give the folder that holds the tables "
                            f"(embeddings/, failures/, ...), e.g. {posixpath.dirname(self.root)}"
                        )
                    else:
                        msg = (
                            f"--out {self.root} is inside the Delta table {parent}: give a folder outside it "
                            f"(the folder holding the tables, e.g. {posixpath.dirname(parent)})"
                        )
                    raise TableError(msg)
                parent = posixpath.dirname(parent)
                if "://" not in self.root and parent == posixpath.dirname(parent):
                    break
            entries = self.fs.ls(path, detail=False) if self.fs.isdir(path) else []
        except (OSError, ValueError) as exc:
            if storage_unavailable(exc):
                raise unavailable_error(f"checking --out {self.root}", exc) from exc
            msg = f"cannot read --out {self.root}: {exc}; check the path and its credentials"
            raise TableError(msg) from exc
        foreign = sorted(posixpath.basename(e.rstrip("/")) for e in entries)
        foreign = [name for name in foreign if name not in ROOT_ENTRIES]
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            msg = (
                f"--out {self.root} holds files that are not catalog-embed tables ({shown}): give a new or empty folder, "
                "or one that catalog-embed wrote"
            )
            raise TableError(msg)

    def ensure_tables(self, create: bool = True) -> None:
        """Check the output root and existing schemas; create missing tables (so readers always find them).

        Args:
            create: create missing tables; False only checks (for commands that must not write, like `plan`).

        Raises:
            TableError: --out is not a table set of ours (see `check_root`), cannot be written, an existing table is
                damaged (see `check_intact`), lacks a column we write or has an incompatible schema version.
        """
        self.check_root()
        for spec in TABLES.values():
            table = self._open(spec)
            if table is None:
                if create:
                    self._create(spec)
                continue
            # A run merges into every file of a table: refuse a damaged one before any work, rather than mid-commit.
            self.check_intact(spec, table)
            version = (table.schema().fields[0].metadata or {}).get(SCHEMA_VERSION_KEY)
            if version != str(SCHEMA_VERSION):
                msg = (
                    f"{self.uri(spec)} has schema version {version}, this release writes {SCHEMA_VERSION}: "
                    "write to a new --out"
                )
                raise TableError(msg)
            self.check_columns(spec, table)

    def check_intact(self, spec: TableSpec, table: DeltaTable | None = None) -> None:
        """Raise TableError when a table's log is damaged or a data file of its current snapshot is missing or not
        the size its log recorded (truncated, overwritten), naming the file and the fix; nothing is repaired."""
        # Opening the snapshot's dataset checks every file it references.
        arrow_dataset(table or self.table(spec), self.storage_options)

    def check_columns(self, spec: TableSpec, table: DeltaTable | None = None) -> None:
        """Raise TableError when a table lacks a column of `spec`: it was not written by catalog-embed."""
        have = set(pa.schema((table or self.table(spec)).schema()).names)
        lacking = [name for name in spec.schema.names if name not in have]
        if lacking:
            msg = f"{self.uri(spec)} lacks column(s) {', '.join(lacking)}: it was not written by catalog-embed"
            raise TableError(msg)

    def _create(self, spec: TableSpec) -> None:
        try:
            DeltaTable.create(
                self.uri(spec),
                _versioned(spec.schema),
                mode="ignore",
                partition_by=list(spec.partition_by) or None,
                name=spec.name,
                storage_options=self.storage_options,
            )
        except (DeltaError, OSError) as exc:
            if storage_unavailable(exc):
                raise unavailable_error(f"creating {self.uri(spec)}", exc) from exc
            msg = f"cannot create the {spec.name} table under --out {self.root}: {exc}; check that it is writable"
            raise TableError(msg) from exc

    # -- staging ---------------------------------------------------------------------------------------------

    def staging_dir(self, run_id: str, spec: TableSpec | None = None) -> str:
        """Folder (fsspec path) of a run's staged parts, optionally of one table.

        Raises:
            TableError: `run_id` is not a valid run id, so it could name a folder outside `_staging/`.
        """
        problem = run_id_problem(run_id)
        if problem is not None:
            raise TableError(problem)
        base = posixpath.join(self.root_path, STAGING, run_id)
        return posixpath.join(base, spec.name) if spec else base

    @contextmanager
    def _atomic(self, path: str, mode: str) -> Iterator[IO[Any]]:
        """Open `path` for writing so that readers never see it half-written: on local disks the file is written
        aside and renamed (a killed worker leaves no partial file under the final name); object stores make a
        single put atomic themselves. A write that fails (a full disk) removes its temporary file."""
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        target = f"{path}.tmp-{uuid.uuid4().hex}" if self._local() else path
        try:
            with self.fs.open(target, mode) as fh:
                yield fh
            if self._local():
                self.fs.mv(target, path)
        except BaseException:
            if self._local() and self.fs.exists(target):
                self.fs.rm(target)
            raise

    def _local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    @_store_io("writing a staged part")
    def write_part(self, run_id: str, spec: TableSpec, part: str, rows: pa.Table) -> str:
        """Write one part file with a deterministic name; rewriting the same part replaces it."""
        path = posixpath.join(self.staging_dir(run_id, spec), f"part-{part}.parquet")
        with self._atomic(path, "wb") as fh:
            pq.write_table(rows, fh)
        return path

    @_store_io("listing staged parts")
    def staged_parts(self, run_id: str, spec: TableSpec) -> list[str]:
        """Complete part files staged for one table of a run, sorted."""
        folder = self.staging_dir(run_id, spec)
        if not self.fs.exists(folder):
            return []
        return sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".parquet"))

    @_store_io("reading staged parts")
    def read_staged(self, run_id: str, spec: TableSpec) -> pa.Table:
        """Every staged row of one table of a run (empty when none), one per key.

        A key staged twice (a retried Beam bundle, a resumed run) keeps its row from the last part in name order.
        """
        parts = self.staged_parts(run_id, spec)
        if not parts:
            return spec.schema.empty_table()
        table = pads.dataset(parts, format="parquet", filesystem=self.fs).to_table()
        order = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
        last = order.group_by(list(spec.key)).aggregate([("_row", "max")])["_row_max"]
        return table.take(pc.take(last, pc.sort_indices(last))) if len(last) < table.num_rows else table

    @_store_io("writing a run's staging file")
    def write_staged_json(self, run_id: str, name: str, payload: dict[str, Any]) -> None:
        """Write a small JSON file (the run's meta, its lease) into a run's staging folder, atomically."""
        with self._atomic(posixpath.join(self.staging_dir(run_id), name), "w") as fh:
            json.dump(payload, fh, sort_keys=True)

    @_store_io("reading a run's staging file")
    def read_staged_json(self, run_id: str, name: str) -> dict[str, Any] | None:
        """A JSON file of a run's staging folder, or None when it is missing or unreadable."""
        try:
            with self.fs.open(posixpath.join(self.staging_dir(run_id), name), "r") as fh:
                payload = json.load(fh)
        except (FileNotFoundError, ValueError):
            return None
        return payload if isinstance(payload, dict) else None

    @_store_io("claiming a run's staging")
    def create_staged_json(self, run_id: str, name: str, payload: dict[str, Any]) -> bool:
        """Write a small JSON file into a run's staging folder only if no file has that name yet; returns whether
        this call created it. Of several processes creating one name at the same instant exactly one wins: a local
        disk links the written file to its name (link fails when the name exists, as O_EXCL does); object stores
        put it conditionally (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`, through fsspec's mode "xb")."""
        path = posixpath.join(self.staging_dir(run_id), name)
        data = json.dumps(payload, sort_keys=True).encode()
        try:
            if self._local():
                # Written whole under a name of its own first, so that its name never shows a partial file.
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                temp = f"{path}.tmp-{uuid.uuid4().hex}"
                try:
                    with self.fs.open(temp, "wb") as fh:
                        fh.write(data)
                    os.link(temp, path)
                finally:
                    if self.fs.exists(temp):
                        self.fs.rm(temp)
            else:
                with self.fs.open(path, "xb") as fh:
                    fh.write(data)
        except FileExistsError:
            return False
        return True

    @_store_io("listing a run's staging")
    def staged_entries(self, run_id: str) -> list[str]:
        """Names in a run's staging folder (files and table folders), sorted; empty when it does not exist."""
        folder = self.staging_dir(run_id)
        if not self.fs.exists(folder):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False))

    @_store_io("listing _staging")
    def staged_runs(self) -> list[str]:
        """Names of the folders under `_staging/`, sorted: runs' staging, and anything else someone put there
        (callers touch only folders that hold a run's `run.json`)."""
        root = posixpath.join(self.root_path, STAGING)
        if not self.fs.exists(root):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(root, detail=False))

    @_store_io("reading a run's staging")
    def last_staged(self, run_id: str) -> float:
        """Unix time of the newest file in a run's staging folder (0 when empty)."""
        files = self.fs.find(self.staging_dir(run_id))
        return max((self.fs.modified(p).timestamp() for p in files), default=0.0)

    @_store_io("removing a run's staging")
    def drop_staging(self, run_id: str) -> None:
        """Remove a run's staged parts (after its commit, or by `vacuum`).

        Another process or thread may remove the same folder at the same time (the lease's heartbeat removes what
        its last write recreated while the commit removes the staging): a file gone under the removal is what both
        want, and the removal goes on until the folder is gone.
        """
        folder = self.staging_dir(run_id)
        for _ in range(_DROP_ATTEMPTS):
            try:
                if self.fs.exists(folder):
                    self.fs.rm(folder, recursive=True)
                return
            except FileNotFoundError:
                continue

    # -- commit steps ---------------------------------------------------------------------------------------

    def committed(self, spec: TableSpec, txn_id: str) -> int | None:
        """The version of the application transaction `txn_id` committed to a table, or None (also when the table
        does not exist yet).

        Raises:
            TableError: the table is damaged or unreadable (never taken for "not committed").
        """
        if not self.exists(spec):
            return None
        return self.table(spec).transaction_version(txn_id)

    @_store_io("committing")
    def commit_step(
        self,
        spec: TableSpec,
        txn_id: str,
        step: Callable[[DeltaTable, CommitProperties], object],
        version: int = 1,
        any_version: bool = False,
        tag: dict[str, str] | None = None,
    ) -> None:
        """Run one commit step tagged with the application transaction (`txn_id`, `version`), unless the table
        already holds that transaction at `version` (or at any version with `any_version`); retry lost races.

        Args:
            spec: the table the step commits to.
            txn_id: the step's application-transaction id.
            step: writes the step's one Delta commit with the commit properties it is given.
            version: identifies the step's content (see `content_version`): a step with other content under the
                same id is committed, never skipped as done.
            any_version: the step happens once per id, whatever it holds.
            tag: custom commit metadata.
        """

        def attempt() -> None:
            table = self.table(spec)
            done = table.transaction_version(txn_id)
            if done is not None and (any_version or done == version):
                return
            failpoints.hit(f"commit.{spec.name}", txn_id)
            step(table, CommitProperties(app_transactions=[Transaction(txn_id, version)], custom_metadata=tag))

        _retried(attempt)

    def append(self, table: DeltaTable, rows: pa.Table, txn: CommitProperties | None) -> None:
        """Append `rows` to `table` in one commit (a commit step's write; see `commit_step`)."""
        write_deltalake(table, rows, mode="append", commit_properties=txn, storage_options=self.storage_options)

    # -- maintenance ------------------------------------------------------------------------------------------

    def compact(self, spec: TableSpec, target_bytes: int) -> dict[str, Any]:
        """Bin-pack a table's files smaller than `target_bytes` into files of about that size, in one commit that
        rewrites rows without changing them; returns deltalake's metrics. A commit that loses a race with a run's
        merge (both removed a file) is retried on the new version, so neither side loses or duplicates a row.
        """
        metrics: dict[str, Any] = {}
        _retried(lambda: metrics.update(self.table(spec).optimize.compact(target_size=target_bytes)))
        return metrics

    def checkpoint(self, spec: TableSpec) -> None:
        """Write a checkpoint of a table's current version, then drop the log entries older than the table's log
        retention (30 days by default): readers replay only the commits after the checkpoint."""
        table = self.table(spec)
        table.create_checkpoint()
        table.cleanup_metadata()

    # -- single-table writes (probe predictions) -------------------------------------------------------------

    @_store_io("committing")
    def upsert(self, spec: TableSpec, rows: pa.Table) -> None:
        """Merge `rows` into a table by its key, creating the table first; a commit that loses a race is retried."""
        if not self.exists(spec):
            self._create(spec)
        _retried(lambda: merge_rows(self.table(spec), spec, rows, None))

    @_store_io("committing")
    def overwrite(self, spec: TableSpec, rows: pa.Table) -> None:
        """Replace a table's rows with `rows`, creating it when absent; a commit that loses a race is retried."""
        _retried(
            lambda: write_deltalake(
                self.uri(spec), rows.cast(spec.schema), mode="overwrite",
                partition_by=list(spec.partition_by) or None, storage_options=self.storage_options,
            )
        )

    @_store_io("committing")
    def delete(self, spec: TableSpec, predicate: str) -> None:
        """Delete a table's rows matching the SQL `predicate`; a commit that loses a race is retried."""
        _retried(lambda: self.table(spec).delete(predicate))

    # -- reads -----------------------------------------------------------------------------------------------

    @_store_io("reading a table")
    def scan(self, spec: TableSpec, partition: dict[str, str] | None = None) -> pads.Dataset:
        """A table's current snapshot as an Arrow dataset, for readers that push filters into the scan (DuckDB).

        Its strings are typed `string_view`: merges (DataFusion) write strings as views and appends write plain
        strings, and pyarrow compares a pushed-down literal with one kind only; declared as views, plain-string
        files are cast on read and every filter works. `partition` prunes files by partition value.
        """
        table = self.table(spec)
        schema = pa.schema(table.schema())
        views = pa.schema([f.with_type(pa.string_view()) if f.type == pa.string() else f for f in schema])
        pruning = [(key, "=", value) for key, value in (partition or {}).items()] or None
        return arrow_dataset(table, self.storage_options, file_pruning_predicate=pruning, schema=views)

    @_store_io("reading a table")
    def read(
        self,
        spec: TableSpec,
        columns: list[str] | None = None,
        filter_: pc.Expression | None = None,
        partition: dict[str, str] | None = None,
    ) -> pa.Table:
        """Read (part of) a table as Arrow, strings as plain `string`.

        `filter_` applies after the scan, to plain strings, so callers write ordinary literals (see `scan`). Without
        a filter only `columns` are read (the embeddings' vectors stay on disk when a caller needs their keys).
        """
        table = self.scan(spec, partition).to_table(columns=columns if filter_ is None else None)
        plain = [f.with_type(pa.string()) if f.type == pa.string_view() else f for f in table.schema]
        table = table.cast(pa.schema(plain))
        if filter_ is not None:
            table = table.filter(filter_)
        return table.select(columns) if columns is not None else table

    def exists(self, spec: TableSpec) -> bool:
        """Whether the table has been created.

        Raises:
            TableError: it is damaged (see `table`): a table that lost its log is not one to create afresh.
        """
        return self._open(spec) is not None


def table_at(uri: str, spec: TableSpec, storage_options: dict[str, str] | None = None) -> tuple[TableStore, TableSpec]:
    """A store and spec for the one table at `uri`, whatever its folder is called: its parent is the root.

    Commands that take a table rather than an output root (`probe --labels`, `tag --out`) read and write it
    through the store all the same, with its storage options, schema checks and commit retries.
    """
    root, _, name = uri.rstrip("/").rpartition("/")
    return TableStore(root or ".", storage_options), dataclasses.replace(spec, name=name)


def _retried(commit: Callable[[], object]) -> None:
    """Run `commit`; one that loses a race with another writer, or whose request the store dropped, is retried with
    exponential backoff and jitter.

    object_store does not retry the Delta log's conditional put once its request may have been sent (a reset, a cut
    response): the write may have landed. Trying again is safe here: a commit step first looks for its application
    transaction (so one that landed is skipped), and the single-table writes (upsert, overwrite, delete) are
    idempotent.
    """
    for attempt in range(_COMMIT_ATTEMPTS):
        try:
            commit()
            return
        except Exception as exc:
            if not (isinstance(exc, CommitFailedError) or storage_unavailable(exc)) or attempt == _COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(_COMMIT_BACKOFF_S * 2**attempt * random.uniform(0.5, 1.5))


def _fsspec_options(root: str, storage_options: dict[str, str] | None) -> dict[str, str]:
    """fsspec arguments that reach the store deltalake reaches with `storage_options`.

    Parts are staged through fsspec and committed through deltalake, so both must talk to the same endpoint: an S3
    endpoint given only as a storage option (MinIO, a local emulator) would otherwise send the parts to AWS.
    """
    if not storage_options or not root.startswith(("s3://", "s3a://")):
        return {}
    endpoint = next((v for k, v in storage_options.items() if k.lower() in _S3_ENDPOINT_KEYS), None)
    return {"endpoint_url": endpoint} if endpoint else {}


def _versioned(schema: pa.Schema) -> pa.Schema:
    """Tag the first column with the schema version: Delta keeps no free-form table properties (delta-rs
    rejects unknown configuration keys), but it does keep column metadata."""
    first = schema.field(0).with_metadata({SCHEMA_VERSION_KEY: str(SCHEMA_VERSION)})
    return schema.set(0, first)


def _key_predicate(spec: TableSpec) -> str:
    return " AND ".join(f"t.{k} = s.{k}" for k in spec.key)


def content_version(*tables: pa.Table) -> int:
    """A commit step's version derived from what it writes (a 63-bit digest of the tables' Arrow IPC bytes):
    equal for equal content, so a repeated step is skipped and a step with other content is not."""
    digest = hashlib.sha256()
    for table in tables:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        digest.update(sink.getvalue())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def merge_rows(
    table: DeltaTable,
    spec: TableSpec,
    rows: pa.Table,
    txn: CommitProperties | None,
    delete: pa.Table | None = None,
    mark_deleted: pa.Table | None = None,
) -> None:
    """In one commit, upsert `rows` by the table's key, delete the rows whose key is in `delete` and mark `deleted`
    the rows whose key is in `mark_deleted` (nothing when all are empty); new columns of `rows` are added first.

    One commit rather than one per kind of change: a merge rewrites every file holding a key it touches (deltalake
    writes no deletion vectors), so a second commit for the same night would rewrite those files again.
    Columns are added with `alter` rather than the merge's schema evolution, which rewrites the table metadata
    and drops the schema-version tag.

    Args:
        table: the table.
        spec: its spec (key and schema).
        rows: rows to insert or replace.
        txn: the commit's properties.
        delete: keys (the key columns) whose rows are deleted; a key also in `rows` is upserted.
        mark_deleted: keys whose rows get `deleted = true` (the table must have that column); a key also in `rows`
            is upserted, one also in `delete` deleted.
    """
    source = _changes(spec, rows, [("delete", delete), ("mark", mark_deleted)])
    if source.num_rows == 0:
        return
    have = set(pa.schema(table.schema()).names)
    new = [field for field in rows.schema if field.name not in have]
    if new:
        table.alter.add_columns(DeltaSchema.from_arrow(pa.schema([f.with_nullable(True) for f in new])).fields)
    columns = {name: f"s.{name}" for name in rows.schema.names}
    (
        table.merge(source, predicate=_key_predicate(spec), source_alias="s", target_alias="t", commit_properties=txn)
        .when_matched_delete(predicate="s._change = 'delete'")
        .when_matched_update(updates={"deleted": "true"}, predicate="s._change = 'mark'")
        .when_matched_update(updates=columns, predicate="s._change = 'upsert'")
        .when_not_matched_insert(updates=columns, predicate="s._change = 'upsert'")
        .execute()
    )


def _changes(spec: TableSpec, rows: pa.Table, keyed: list[tuple[str, pa.Table | None]]) -> pa.Table:
    """One merge source: `rows` (change `upsert`), then for each (change, keys) of `keyed` the keys not named
    before, every other column null; a `_change` column tells them apart (a source row per key at most)."""
    schema = pa.schema([f.with_nullable(True) for f in rows.schema] + [pa.field("_change", pa.string())])
    parts = [rows.append_column("_change", pa.repeat("upsert", rows.num_rows)).cast(schema)]
    named = rows.select(list(spec.key))
    for change, keys in keyed:
        if keys is None or keys.num_rows == 0:
            continue
        keys = keys.select(list(spec.key)).group_by(list(spec.key)).aggregate([])
        keys = keys.filter(pc.invert(_keys_in(keys, named, spec))) if named.num_rows else keys
        part = {f.name: keys[f.name] if f.name in spec.key else pa.nulls(keys.num_rows, f.type) for f in rows.schema}
        parts.append(pa.table(part | {"_change": pa.repeat(change, keys.num_rows)}).cast(schema))
        named = pa.concat_tables([named, keys.cast(named.schema)])
    return pa.concat_tables(parts)


def _keys_in(keys: pa.Table, rows: pa.Table, spec: TableSpec) -> pa.Array:
    """Which rows of `keys` have their key among `rows`' keys."""
    joined = keys.select(list(spec.key)).append_column("_i", pa.array(range(keys.num_rows), pa.int64()))
    hits = joined.join(rows.select(list(spec.key)), list(spec.key), join_type="inner")["_i"]
    return pc.is_in(joined["_i"], hits)


def arrow_dataset(table: DeltaTable, storage_options: dict[str, str] | None = None, **options: Any) -> pads.Dataset:
    """`table.to_pyarrow_dataset(**options)`, read through Arrow's own filesystem for local and S3 tables.

    deltalake's default filesystem is a Python object that Arrow's I/O threads call into. A thread still inside it
    when the interpreter finalizes is stopped mid-call, which aborts the process ("terminate called without an
    active exception", exit 134) or hangs it, after the command has done its work; and every read takes the GIL.
    Arrow's local and S3 filesystems run no Python. Other stores (gs://, az://) keep deltalake's filesystem.

    Args:
        table: the snapshot to read.
        storage_options: the table's `--storage-option`s, for Arrow's S3 client (`arrow_s3`).
        options: `to_pyarrow_dataset`'s.
    """
    parsed = urllib.parse.urlparse(table.table_uri)
    folder = urllib.parse.unquote(parsed.path).rstrip("/")
    if parsed.scheme == "file":
        options.setdefault("filesystem", pa_fs.SubTreeFileSystem(folder, pa_fs.LocalFileSystem()))
    elif parsed.scheme in ("s3", "s3a"):
        options.setdefault("filesystem", pa_fs.SubTreeFileSystem(parsed.netloc + folder, arrow_s3(storage_options)))
    dataset = table.to_pyarrow_dataset(**options)
    _require_files(table, dataset, folder if parsed.scheme == "file" else table.table_uri.rstrip("/"))
    return dataset


def arrow_s3(storage_options: dict[str, str] | None) -> pa_fs.S3FileSystem:
    """Arrow's S3 client, configured as deltalake's is by the same storage options (keys in any case): the
    endpoint (`AWS_ENDPOINT_URL`, else the environment's), `AWS_REGION`, `timeout` and `connect_timeout` (durations
    such as "2s"), `max_retries` (AWS's standard retries, with backoff and jitter; `S3_READ_RETRIES` when unset),
    and `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` when given; else the credentials come from
    the environment's default chain."""
    options = {key.lower().removeprefix("aws_"): value for key, value in (storage_options or {}).items()}
    keys = [key.removeprefix("aws_") for key in _S3_ENDPOINT_KEYS]
    endpoint = next((options[k] for k in keys if k in options), os.environ.get("AWS_ENDPOINT_URL"))
    client: dict[str, Any] = {}
    if "access_key_id" in options and "secret_access_key" in options:
        client.update(access_key=options["access_key_id"], secret_key=options["secret_access_key"],
                      session_token=options.get("session_token") or options.get("token"))  # fmt: skip
    if endpoint:
        url = urllib.parse.urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        client.update(endpoint_override=url.netloc, scheme=url.scheme)
    if region := options.get("region"):
        client["region"] = region
    for ours, arrows in (("timeout", "request_timeout"), ("connect_timeout", "connect_timeout")):
        if ours in options:
            client[arrows] = _seconds(options[ours], ours)
    retries = int(options.get("max_retries", S3_READ_RETRIES))
    return pa_fs.S3FileSystem(retry_strategy=pa_fs.AwsStandardS3RetryStrategy(max_attempts=retries + 1), **client)


def _seconds(duration: str, key: str) -> float:
    """A storage option's duration ("2s", "500ms", "1m", "1h" or plain seconds) in seconds."""
    match = _DURATION.fullmatch(duration.strip())
    if match is None:
        msg = f"--storage-option {key}={duration}: not a duration (write it as 30s, 500ms, 2m or 1h)"
        raise ConfigError(msg)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def _require_files(table: DeltaTable, dataset: pads.FileSystemDataset, uri: str) -> None:
    """Raise TableError naming the first file `dataset` would read that is missing or not the size the table's log
    recorded: before any row is read, rather than mid-scan inside DuckDB or mid-merge. One listing of the table's
    folder, not a request per file."""
    actions = pa.table(table.get_add_actions(flatten=False)).select(["path", "size_bytes"])
    recorded = dict(zip(actions["path"].to_pylist(), actions["size_bytes"].to_pylist(), strict=True))
    everything = pa_fs.FileSelector("", recursive=True, allow_not_found=True)
    listed = {info.path: info.size for info in dataset.filesystem.get_file_info(everything)}
    for path in dataset.files:
        size, expected = listed.get(path), recorded.get(path, listed.get(path))
        if size is not None and size == expected:
            continue
        repair = f"deltalake's `DeltaTable({uri!r}).repair()` (catalog-embed never repairs a table)"
        if size is None:
            problem = f"is missing: restore it from a backup, or drop its rows from the table with {repair}"
        else:
            problem = (
                f"is {size} bytes, not the {expected} its log recorded (truncated or overwritten): restore it from a "
                f"backup, or move it away and drop its rows from the table with {repair}"
            )
        msg = f"the {posixpath.basename(uri)} table at {uri} is damaged: its data file {path} {problem}"
        raise TableError(msg)


_COMMIT_FILE = re.compile(r"(\d{20})\.json")
_CHECKPOINT_FILE = re.compile(r"(\d{20})\.checkpoint(\.\d+\.\d+)?\.parquet")


def _log_problem(fs: fsspec.AbstractFileSystem, table_path: str) -> str | None:
    """What is wrong with a table's `_delta_log` that deltalake cannot read, naming the file and what to do about
    it; None when nothing found here explains the failure (then it is not the log's content)."""
    log = posixpath.join(table_path, "_delta_log")
    try:
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(log, detail=False)}
    except OSError:
        return None
    commits = sorted(int(m.group(1)) for n in names if (m := _COMMIT_FILE.fullmatch(n)))
    checkpoints = sorted(int(m.group(1)) for n in names if (m := _CHECKPOINT_FILE.fullmatch(n)))
    restore = "restore it from a backup (catalog-embed never repairs a table)"
    if "_last_checkpoint" in names:
        try:
            hinted = int(json.loads(fs.cat_file(posixpath.join(log, "_last_checkpoint")))["version"])
        except (ValueError, KeyError, TypeError):
            hinted = None  # Delta ignores a hint it cannot parse and lists the log instead
        if hinted is not None and hinted not in checkpoints:
            return (
                f"_delta_log/_last_checkpoint points at checkpoint {hinted}, which is not in _delta_log/: restore "
                "the checkpoint from a backup, or delete _last_checkpoint (Delta then finds its checkpoints by "
                "listing the log)"
            )
    # Delta reads the commits after its latest checkpoint (all of them when there is none): each must be there.
    after = range(checkpoints[-1] + 1 if checkpoints else 0, max(commits + checkpoints, default=-1) + 1)
    for version in after:
        name = f"{version:020d}.json"
        if version not in commits:
            return f"_delta_log/{name} is missing: {restore}"
        try:
            lines = fs.cat_file(posixpath.join(log, name)).decode().splitlines()
            if not all(isinstance(json.loads(line), dict) for line in lines if line.strip()) or not lines:
                raise ValueError(name)
        except (ValueError, UnicodeDecodeError):
            return f"_delta_log/{name} is not a Delta commit (lines of JSON actions): {restore}"
    return None


def _data_without_log(fs: fsspec.AbstractFileSystem, table_path: str) -> str | None:
    """The problem with a table folder that holds files but no Delta log (its log was deleted), else None."""
    try:
        # Files only: s3fs's find answers an empty prefix with the prefix itself, as a directory, once another
        # process has created the table since it listed (two runs creating the tables at the same instant).
        found = fs.find(table_path, detail=True)
        files = [p for p, info in found.items() if info["type"] == "file" and "/_delta_log/" not in p]
    except OSError:
        return None
    if not files:
        return None
    return (
        f"{len(files)} file(s) such as {posixpath.relpath(files[0], table_path)} but no _delta_log/ entries: restore "
        "_delta_log/ from a backup, or move the folder away to start the table afresh "
        "(catalog-embed never repairs a table)"
    )



