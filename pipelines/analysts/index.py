"""`catalog-embed index`: an approximate nearest-neighbour index of one model and layer, kept beside the tables.

The index is a usearch HNSW graph (cosine), chosen by measurement (bench/ann_bench.py, README "Analysts"): it
adds and removes vectors by key without retraining, which lets a nightly refresh touch only what changed. It lives
under the output root, next to the tables it indexes:

    <out>/_indexes/<model>/<layer>/index.json              what it was built from (read first)
    <out>/_indexes/<model>/<layer>/graph-<n>.usearch       the graph
    <out>/_indexes/<model>/<layer>/keys-<n>.parquet        key -> (track_id, embedded_at)

`index.json` records the Delta version of the embeddings table the index reflects, the model's data files at that
version, the model, layer, dim and the recall measured when it was built. It is written last and names the graph
and keys files it goes with, so a reader never pairs a new graph with old keys. A refresh reads only the files
added to the model's partition since then, adds new and re-embedded tracks and removes deleted ones. Rows whose
vectors hold NaN or infinite values are left out and recorded (`skipped`), so a refresh does not look for them.

The names `index.json` gives are checked to be the plain `graph-*`/`keys-*` names this module writes, so reading
and the refresh's clean-up stay inside the index's own folder whatever the file says; an index whose files do not
load is reported as damaged, never as up to date.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import posixpath
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from catalog_embed.pipelines.analysts.outputs import local_root
from catalog_embed.pipelines.analysts.vectors import (
    ModelLayer,
    Vectors,
    add_table_arguments,
    non_finite_error,
    store_from_args,
)
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import AnnIndexError, ConfigError, OutputError, TableError
from catalog_embed.workers.analysis import exact_neighbours, recall_at_k

if TYPE_CHECKING:
    from usearch.index import Index

INDEXES = "_indexes"
META = "index.json"
# Tracks whose exact neighbours are compared with the index's when it is built.
RECALL_SAMPLE = 1000
# The only names index.json may give its graph and keys (those `save` writes): plain names in the index's folder.
_FILE_NAMES = {"graph": re.compile(r"graph-\d+-\d+\.usearch"), "keys": re.compile(r"keys-\d+-\d+\.parquet")}
# What index.json must hold, and of which type, for the index to be used.
_META_FIELDS = {"model": str, "layer": str, "dim": int, "table_version": int, "files": list, "count": int,
                "next_key": int, "config": dict, "graph": str, "keys": str, "recall_at_10": (int, float)}
_CONFIG_FIELDS = ("expansion_search", "threads")


@dataclass(frozen=True)
class IndexConfig:
    """HNSW parameters (see bench/ann_bench.py for what they cost and buy).

    Attributes:
        connectivity: graph edges per node (usearch M).
        expansion_add: candidate list while inserting (efConstruction).
        expansion_search: candidate list while searching (efSearch); raised to k where k is larger.
        threads: threads used to build (0: all cores).
    """

    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 64
    threads: int = 0


def index_folder(store: TableStore, model: str, layer: str) -> str:
    """The fsspec path of an index's folder under the output root."""
    return posixpath.join(store.root_path, INDEXES, model, layer)


def model_files(source: ModelLayer) -> list[str]:
    """The data files of the model's partition in the snapshot `source` reads: what the index must reflect."""
    return sorted(f.path for f in source.dataset.get_fragments())


class AnnIndex:
    """A loaded index: the graph, its keys and its metadata."""

    def __init__(self, graph: Index, keys: pa.Table, meta: dict[str, Any]) -> None:
        self.graph = graph
        self.meta = meta
        self._set_keys(keys)

    def _set_keys(self, keys: pa.Table) -> None:
        self.keys = keys
        self._track_of = np.asarray(keys["track_id"].to_pylist(), dtype=object)
        self._row_of_key = {int(k): row for row, k in enumerate(keys["key"].to_pylist())}
        self._key_of_track = dict(zip(keys["track_id"].to_pylist(), keys["key"].to_pylist(), strict=True))

    def vectors_of(self, track_ids: list[str]) -> np.ndarray:
        """The indexed vectors of `track_ids` (live tracks of the snapshot the index reflects), without reading the
        table.

        Raises:
            ConfigError: some were left out of the index for NaN or infinite values.
        """
        missing = [t for t in track_ids if t not in self._key_of_track]
        if missing:
            raise non_finite_error(missing, self.meta["model"], self.meta["layer"])
        keys = np.array([self._key_of_track[t] for t in track_ids], dtype=np.uint64)
        return np.atleast_2d(np.asarray(self.graph.get(keys), dtype=np.float32))

    @classmethod
    def build(cls, vectors: Vectors, files: list[str], config: IndexConfig) -> AnnIndex:
        """Index every vector of `vectors` (the snapshot whose data files are `files`)."""
        from usearch.index import Index  # the [analysts] extra; imported when an index is used, not by every command

        started = time.perf_counter()
        graph = Index(ndim=vectors.dim, metric="cos", dtype="f32", connectivity=config.connectivity,
                      expansion_add=config.expansion_add, expansion_search=config.expansion_search)
        keys = np.arange(len(vectors.track_ids), dtype=np.uint64)
        if len(keys):
            with _signals_kept():
                graph.add(keys, vectors.vectors, threads=config.threads)
        meta = {
            "library": f"usearch {package_version('usearch')}",
            "metric": "cos",
            "model": vectors.model,
            "layer": vectors.layer,
            "dim": vectors.dim,
            "table_version": vectors.table_version,
            "files": files,
            "count": len(keys),
            "next_key": len(keys),
            "config": asdict(config),
            "built_at": datetime.now(UTC).isoformat(),
            "build_seconds": time.perf_counter() - started,
            "refreshes": [],
            "skipped": vectors.skipped,
        }
        index = cls(graph, _keys_table(keys, vectors), meta)
        index.meta["recall_at_10"] = index.measure_recall(vectors)
        return index

    def measure_recall(self, vectors: Vectors, k: int = 10, sample: int = RECALL_SAMPLE) -> float:
        """recall@k of the index against exact search, for a seeded sample of the tracks of `vectors`."""
        if len(vectors.track_ids) < 2:
            return float("nan")
        rows = np.sort(np.random.default_rng(0).permutation(len(vectors.track_ids))[:sample])
        truth, _ = exact_neighbours(vectors.vectors[rows], vectors.vectors, k, exclude=rows)
        found, _ = self.search(vectors.vectors[rows], truth.shape[1], exclude=vectors.track_ids[rows])
        return recall_at_k(np.searchsorted(vectors.track_ids, found) if found.size else found, truth)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
               allowed: set[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k track ids and cosine similarities per query, best first.

        `exclude` gives each query's own track id (left out of its answer); `allowed` restricts answers to those
        track ids, by asking the graph for more candidates until k allowed ones are found.
        """
        total = len(self.graph)
        count = min(total, k + 1 if allowed is None else 10 * k)
        while True:
            self.graph.expansion_search = max(self.meta["config"]["expansion_search"], count)
            with _signals_kept():
                matches = self.graph.search(queries, count, threads=1)
            keys = np.atleast_2d(matches.keys)
            sims = 1.0 - np.atleast_2d(matches.distances)
            ids, scores, short = [], [], False
            for q in range(len(queries)):
                row_ids, row_s = [], []
                for key, sim in zip(keys[q], sims[q], strict=True):
                    # A batch pads queries that found fewer than `count` with key 0 and a NaN distance.
                    row = self._row_of_key.get(int(key)) if np.isfinite(sim) else None
                    if row is None:
                        continue
                    track = self._track_of[row]
                    if (exclude is not None and track == exclude[q]) or (allowed is not None and track not in allowed):
                        continue
                    row_ids.append(track)
                    row_s.append(sim)
                    if len(row_ids) == k:
                        break
                short |= len(row_ids) < k
                ids.append(row_ids)
                scores.append(row_s)
            if not short or count >= total:
                return _ragged(ids, object), _ragged(scores, np.float32)
            count = min(total, count * 4)

    def refresh(self, source: ModelLayer) -> dict[str, int]:
        """Bring the index to the snapshot `source` reads: add new and re-embedded tracks, drop deleted ones.

        Only data files added to the model's partition since the recorded version are read for vectors; which
        tracks changed is found by comparing (track_id, embedded_at) with the recorded keys. Rows left out for NaN
        or infinite values stay out, unread, until they are re-embedded.
        """
        started = time.perf_counter()
        now = source.keys()
        old = self.keys
        known = pc.is_in(now["track_id"], value_set=old["track_id"])
        joined = now.join(old, "track_id", join_type="inner", right_suffix="_old")
        replaced = joined.filter(pc.not_equal(joined["embedded_at"], joined["embedded_at_old"]))
        gone_mask = pc.invert(pc.is_in(old["track_id"], value_set=now["track_id"]))
        drop = pc.is_in(old["track_id"], value_set=pa.concat_arrays(
            [pc.filter(old["track_id"], gone_mask).combine_chunks().cast(pa.string()),
             replaced["track_id"].combine_chunks().cast(pa.string())]))
        skipped = self.meta.get("skipped", {})
        still_skipped = {t: e for t, e in zip(now["track_id"].to_pylist(), now["embedded_at"].to_pylist(), strict=True)
                         if skipped.get(t) == e}
        wanted = pa.concat_arrays([pc.filter(now["track_id"], pc.invert(known)).combine_chunks(),
                                   replaced["track_id"].combine_chunks()])
        wanted = pc.filter(wanted, pc.invert(pc.is_in(wanted, value_set=pa.array(list(still_skipped), pa.string()))))
        files = model_files(source)
        fresh = set(files) - set(self.meta["files"])
        fragments = [f for f in source.dataset.get_fragments() if f.path in fresh]
        added = source.read(wanted, pads.FileSystemDataset(
            fragments, source.dataset.schema, source.dataset.format, source.dataset.filesystem))
        if len(added.track_ids) + len(added.skipped) != len(wanted):
            msg = (
                f"index refresh found {len(added.track_ids) + len(added.skipped)} of {len(wanted)} changed tracks in "
                f"the files added since version {self.meta['table_version']}: rebuild it with `catalog-embed index "
                "--rebuild`"
            )
            raise TableError(msg)
        dropped = pc.filter(old["key"], drop).to_numpy()
        if len(dropped):
            self.graph.remove(dropped.astype(np.uint64))
        start = self.meta["next_key"]
        new_keys = np.arange(start, start + len(added.track_ids), dtype=np.uint64)
        if len(new_keys):
            with _signals_kept():
                self.graph.add(new_keys, added.vectors, threads=self.meta["config"]["threads"])
        self._set_keys(pa.concat_tables([pc.filter(old, pc.invert(drop)), _keys_table(new_keys, added)]))
        re_added = int(pc.sum(pc.is_in(pa.array(added.track_ids.tolist(), pa.string()),
                                       value_set=replaced["track_id"].combine_chunks())).as_py() or 0)
        counts = {"added": len(added.track_ids) - re_added, "replaced": re_added,
                  "removed": int(pc.sum(gone_mask).as_py() or 0)}
        if added.skipped:
            counts["skipped"] = len(added.skipped)
        self.meta.update(table_version=source.version, files=files, count=self.keys.num_rows,
                         next_key=int(start + len(new_keys)), skipped=still_skipped | added.skipped)
        self.meta["refreshes"].append({**counts, "table_version": source.version,
                                       "seconds": time.perf_counter() - started,
                                       "at": datetime.now(UTC).isoformat()})
        return counts

    # -- storage ---------------------------------------------------------------------------------------------

    def save(self, store: TableStore) -> str:
        """Write graph and keys under new names, then index.json (last, renamed into place), then drop the previous
        files.

        Raises:
            OutputError: the folder cannot be written; whatever this call wrote is removed, the index left as it was.
        """
        folder = index_folder(store, self.meta["model"], self.meta["layer"])
        previous = [self.meta.get("graph"), self.meta.get("keys")]
        stamp = f"{self.meta['table_version']}-{int(time.time() * 1000)}"
        names = {"graph": f"graph-{stamp}.usearch", "keys": f"keys-{stamp}.parquet"}
        meta_aside = posixpath.join(folder, f"{META}.tmp-{stamp}")
        written = [posixpath.join(folder, n) for n in names.values()] + [meta_aside]
        try:
            store.fs.makedirs(folder, exist_ok=True)
            with store.fs.open(written[0], "wb") as fh:
                fh.write(bytes(self.graph.save()))
            with store.fs.open(written[1], "wb") as fh:
                pq.write_table(self.keys, fh)
            # Renamed into place: a crash leaves the previous index.json whole, and a link standing in its place is
            # replaced, not written through.
            with store.fs.open(meta_aside, "w") as fh:
                json.dump(self.meta | names, fh, indent=1)
            store.fs.mv(meta_aside, posixpath.join(folder, META))
        except OSError as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    store.fs.rm(path)
            raise _cannot_write(folder, exc.strerror or str(exc)) from exc
        self.meta.update(names)
        for name in previous:
            # Names checked by `load_meta`: inside the folder. A leftover file is harmless (index.json no longer
            # names it), so one that cannot be removed does not fail the command.
            if name:
                with contextlib.suppress(OSError):
                    store.fs.rm(posixpath.join(folder, name))
        return folder

    @classmethod
    def load_meta(cls, store: TableStore, folder: str) -> dict[str, Any] | None:
        """An index's metadata, or None where there is no index.

        Raises:
            AnnIndexError: index.json is unreadable, lacks a field, or names a file outside its folder.
        """
        path = posixpath.join(folder, META)
        if not store.fs.exists(path):
            return None
        try:
            with store.fs.open(path, "r") as fh:
                meta = json.load(fh)
        except (OSError, ValueError) as exc:
            raise _damaged(folder, f"{META} is unreadable ({exc})") from exc
        if not isinstance(meta, dict):
            raise _damaged(folder, f"{META} is not a JSON object")
        wrong = [name for name, kind in _META_FIELDS.items() if not isinstance(meta.get(name), kind)]
        wrong += [f"config.{name}" for name in _CONFIG_FIELDS
                  if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get(name), int)]
        if wrong:
            raise _damaged(folder, f"{META} lacks or mistypes {', '.join(wrong)}")
        for name, pattern in _FILE_NAMES.items():
            if pattern.fullmatch(meta[name]) is None:
                msg = (
                    f"{path} names {name} file {meta[name]!r}, not a {name}-*.{pattern.pattern.rsplit('.', 1)[1]} "
                    f"file of its own folder: refused (nothing read or deleted); rebuild it with `catalog-embed "
                    f"index --rebuild`"
                )
                raise AnnIndexError(msg)
        return meta

    @classmethod
    def load(cls, store: TableStore, folder: str, meta: dict[str, Any]) -> AnnIndex:
        """The graph and keys `meta` (from `load_meta`) names.

        Raises:
            AnnIndexError: they are missing, unreadable, or do not hold what index.json says.
        """
        from usearch.index import Index

        try:
            with store.fs.open(posixpath.join(folder, meta["graph"]), "rb") as fh:
                graph = Index.restore(fh.read())
            with store.fs.open(posixpath.join(folder, meta["keys"]), "rb") as fh:
                keys = pq.read_table(io.BytesIO(fh.read()))
        except (OSError, ValueError, RuntimeError) as exc:  # usearch: ValueError or RuntimeError on damaged bytes
            raise _damaged(folder, f"its graph or keys do not load ({exc})") from exc
        if graph is None or len(graph) != meta["count"] or keys.num_rows != meta["count"] \
                or not {"key", "track_id", "embedded_at"} <= set(keys.column_names):
            raise _damaged(folder, f"its graph or keys do not hold the {meta['count']} tracks {META} records")
        graph.expansion_search = meta["config"]["expansion_search"]
        return cls(graph, keys, meta)


def check_writable(store: TableStore, folder: str) -> None:
    """Refuse, before any work, an index folder of local tables this user cannot write (object stores answer only
    when written to: `save` reports them).

    Raises:
        OutputError: naming the folder.
    """
    if local_root(store) is None:
        return
    existing = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _cannot_write(folder, f"this user cannot write in {existing}")


def _cannot_write(folder: str, why: str) -> OutputError:
    msg = f"cannot write the index at {folder}: {why}: run `catalog-embed index` as a user who can write there"
    return OutputError(msg)


def _damaged(folder: str, why: str) -> AnnIndexError:
    msg = f"the index at {folder} is damaged: {why}; rebuild it with `catalog-embed index --rebuild`"
    return AnnIndexError(msg)


@contextmanager
def _signals_kept() -> Iterator[None]:
    """Let Ctrl-C and SIGTERM stop a long usearch call the way the CLI's handlers mean them to.

    usearch checks for signals while it adds and searches, and turns whatever the Python handler raised into
    RuntimeError("Operation has been terminated"): the CLI would report a crash (exit 1) instead of an interruption
    (130, or 143 for SIGTERM). The exception the handler raises is kept here and raised in place of usearch's.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[BaseException] = []
    previous = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    previous = {n: h for n, h in previous.items() if callable(h)}

    def relay(signum: int, frame: Any) -> None:
        try:
            previous[signum](signum, frame)
        except BaseException as exc:
            raised.append(exc)
            raise

    for signum in previous:
        signal.signal(signum, relay)
    try:
        yield
    except RuntimeError:
        if raised:
            raise raised[0] from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_fits(meta: dict[str, Any], source: ModelLayer, dim: int, where: str) -> None:
    """Raise a ConfigError when the index at `where` was built for another model, layer or dimension."""
    built = (meta["model"], meta["layer"], meta["dim"])
    if built != (source.model, source.layer, dim):
        msg = (
            f"the index at {where} was built for {built[0]}/{built[1]} ({built[2]}-d), not {source.model}/"
            f"{source.layer} ({dim}-d): rebuild it with `catalog-embed index --out ... --model {source.model} "
            f"--layer {source.layer} --rebuild`"
        )
        raise ConfigError(msg)


def staleness(meta: dict[str, Any], source: ModelLayer) -> str | None:
    """Why the index does not reflect the snapshot `source` reads, or None when it does.

    Commits that touched only other models leave the model's files, and so the index, as they were.
    """
    if meta["table_version"] == source.version or meta["files"] == model_files(source):
        return None
    return (
        f"the index of {source.model}/{source.layer} reflects embeddings version {meta['table_version']}, the table "
        f"is at {source.version} with changes to this model: refresh it with `catalog-embed index --out "
        f"{source.store.root} --model {source.model} --layer {source.layer}`"
    )


def _keys_table(keys: np.ndarray, vectors: Vectors) -> pa.Table:
    return pa.table({"key": pa.array(keys, pa.uint64()),
                     "track_id": pa.array(vectors.track_ids.tolist(), pa.string()),
                     "embedded_at": pa.array(vectors.embedded_at, pa.int64())})


def _ragged(rows: list[list], dtype: type) -> np.ndarray:
    """A (q, k) array from equal-length rows (answers are k long unless the candidates run out)."""
    width = min((len(r) for r in rows), default=0)
    return np.array([r[:width] for r in rows], dtype=dtype).reshape(len(rows), width)


# -- the command ---------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `index` subcommand."""
    parser = subparsers.add_parser(
        "index",
        help="build or refresh the ANN index of one model and layer",
        description="Build an approximate nearest-neighbour index (usearch HNSW, cosine) beside the tables, or "
        "refresh an existing one to the table's current version: new and re-embedded tracks are added and "
        "deleted ones removed, reading only the files written since the index was built.",
    )
    add_table_arguments(parser)
    parser.add_argument("--model", help="embedding model (required when the table holds several)")
    parser.add_argument("--layer", help="embedding layer (default: the model's only layer)")
    parser.add_argument("--rebuild", action="store_true", help="build anew even where an index exists")
    parser.add_argument("--connectivity", type=int, default=IndexConfig.connectivity, help="HNSW edges per node")
    parser.add_argument("--expansion-add", type=int, default=IndexConfig.expansion_add,
                        help="HNSW candidates while inserting (efConstruction)")
    parser.add_argument("--expansion-search", type=int, default=IndexConfig.expansion_search,
                        help="HNSW candidates while searching (efSearch)")
    parser.add_argument("--threads", type=int, default=IndexConfig.threads, help="build threads (0: all cores)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    # The [analysts] extra, imported first: a missing one is reported before any vector is read, and the build
    # that follows the "indexing" line starts at once.
    import usearch.index  # noqa: F401

    config = IndexConfig(args.connectivity, args.expansion_add, args.expansion_search, args.threads)
    if min(config.connectivity, config.expansion_add, config.expansion_search) < 2:
        msg = "--connectivity, --expansion-add and --expansion-search must be at least 2"
        raise ConfigError(msg)
    if config.threads < 0:
        msg = f"--threads must be 0 (all cores) or more, got {config.threads}"
        raise ConfigError(msg)
    store = store_from_args(args)
    source = ModelLayer(store, args.model, args.layer)
    folder = index_folder(store, source.model, source.layer)
    meta = None if args.rebuild else AnnIndex.load_meta(store, folder)
    index = None
    if meta is not None:
        check_fits(meta, source, source.dim(), folder)
        # Loaded even when up to date: an index whose files are damaged must not be reported as usable.
        index = AnnIndex.load(store, folder, meta)
        if staleness(meta, source) is None:
            print(f"index of {source.model}/{source.layer} is up to date (version {source.version}, "
                  f"{meta['count']} tracks, recall@10 {meta['recall_at_10']:.3f} when built): {folder}",
                  file=sys.stderr)
            return 0
    check_writable(store, folder)
    if index is not None:
        counts = index.refresh(source)
        what = f"refreshed to version {source.version}: " + ", ".join(f"{n} {v}" for n, v in counts.items())
    else:
        vectors = source.read()
        print(f"indexing {len(vectors.track_ids)} tracks of {source.model}/{source.layer}", file=sys.stderr)
        index = AnnIndex.build(vectors, model_files(source), config)
        what = (f"built at version {source.version}: {index.meta['count']} tracks in "
                f"{index.meta['build_seconds']:.1f}s, recall@10 {index.meta['recall_at_10']:.3f} against exact "
                f"search on {min(RECALL_SAMPLE, index.meta['count'])} tracks")
    folder = index.save(store)
    print(f"index of {source.model}/{source.layer} {what} -> {folder}", file=sys.stderr)
    return 0
