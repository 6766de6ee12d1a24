"""`catalog-embed similar`: the tracks nearest to given tracks by cosine similarity, in one model and layer.

Small tables are searched exactly (one matrix product over every live vector); above `--exact-below` rows the
ANN index built by `catalog-embed index` answers, and only while it reflects the table's current version (else
the command says it is stale and how to refresh it). `--where` restricts the candidates with a SQL predicate on
the embeddings table's columns; `--recall` also runs exact search and prints how many of the index's answers it
shares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from catalog_embed.pipelines.analysts.index import AnnIndex, check_fits, index_folder, staleness
from catalog_embed.pipelines.analysts.vectors import ModelLayer, add_table_arguments, require_tracks, store_from_args
from catalog_embed.schemas.errors import ConfigError
from catalog_embed.workers.analysis import exact_neighbours

# Below this many live rows exact search is cheap (a few ms per query): no index needed.
EXACT_BELOW = 100_000


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `similar` subcommand."""
    parser = subparsers.add_parser(
        "similar",
        help="nearest tracks by cosine similarity (exact, or through the ANN index)",
        description="Print (and optionally write) the k tracks most similar to each given track.",
    )
    add_table_arguments(parser)
    parser.add_argument("--model", help="embedding model (required when the table holds several)")
    parser.add_argument("--layer", help="embedding layer (default: the model's only layer)")
    parser.add_argument("--track", action="append", default=[], metavar="ID", help="query track id; repeatable")
    parser.add_argument("--tracks", metavar="FILE",
                        help="query track ids: one per line, or a CSV/Parquet track_id column")
    parser.add_argument("--k", type=int, default=10, help="neighbours per track (default: 10)")
    parser.add_argument("--where", metavar="SQL",
                        help="only candidates matching this SQL predicate, e.g. \"duration_s > 60\"")
    parser.add_argument(
        "--search", choices=("auto", "exact", "index"), default="auto",
        help="auto: exact below --exact-below live rows, else the index (default: auto)",
    )
    parser.add_argument("--exact-below", type=int, default=EXACT_BELOW, help="table size where auto uses the index")
    parser.add_argument("--index", metavar="PATH", help="index folder (default: <out>/_indexes/<model>/<layer>)")
    parser.add_argument("--recall", action="store_true", help="with the index: also search exactly, print recall@k")
    parser.add_argument("--output", metavar="FILE", help="also write the neighbours (.csv, .parquet or .jsonl)")
    parser.set_defaults(handler=_handle)


def query_ids(args: argparse.Namespace) -> list[str]:
    """The query track ids from --track and --tracks, in order, once each."""
    ids = list(args.track)
    if args.tracks:
        path = Path(args.tracks)
        if not path.exists():
            msg = f"--tracks {args.tracks}: no such file"
            raise ConfigError(msg)
        if path.suffix in (".csv", ".parquet"):
            table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
            if "track_id" not in table.column_names:
                msg = f"--tracks {args.tracks} has no track_id column (columns: {', '.join(table.column_names)})"
                raise ConfigError(msg)
            ids += [str(t) for t in table["track_id"].to_pylist()]
        else:
            ids += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        msg = "no query track: pass --track ID (repeatable) or --tracks FILE"
        raise ConfigError(msg)
    return list(dict.fromkeys(ids))


def _handle(args: argparse.Namespace) -> int:
    if args.k < 1:
        msg = f"--k must be at least 1, got {args.k}"
        raise ConfigError(msg)
    store = store_from_args(args)
    source = ModelLayer(store, args.model, args.layer)
    queries = query_ids(args)
    keys = source.keys()
    require_tracks(queries, keys["track_id"], source.model)
    allowed = set(source.matching(args.where).to_pylist()) if args.where else None
    if allowed is not None and not allowed - set(queries):
        msg = f"--where {args.where!r} leaves no candidate track: loosen it"
        raise ConfigError(msg)
    use_index = args.search == "index" or (args.search == "auto" and keys.num_rows > args.exact_below)
    log = Console(stderr=True)
    exact = None
    if use_index:
        folder = store.fs._strip_protocol(args.index) if args.index else index_folder(store, source.model, source.layer)
        meta = AnnIndex.load_meta(store, folder)
        if meta is None:
            msg = (
                f"no index at {folder}: build it with `catalog-embed index --out {store.root} --model "
                f"{source.model} --layer {source.layer}` (or pass --search exact)"
            )
            raise ConfigError(msg)
        check_fits(meta, source, source.dim(), folder)
        stale = staleness(meta, source)
        if stale:
            raise ConfigError(stale)
        index = AnnIndex.load(store, folder, meta)
        ids, sims = index.search(index.vectors_of(queries), args.k, np.array(queries, dtype=object), allowed)
        how = f"index ({meta['library']}, version {meta['table_version']}, {meta['count']} tracks)"
        if args.recall:
            exact = _exact(source, queries, args.k, allowed)
            found = [set(row) for row in ids]
            recall = np.mean([len(f & set(t)) / max(len(t), 1) for f, t in zip(found, exact[0], strict=True)])
            same = sum(f == set(t) for f, t in zip(found, exact[0], strict=True))
            log.print(f"recall@{args.k} against exact search: {recall:.3f} ({same} of {len(queries)} queries have "
                      f"the same top-{args.k})")
    else:
        ids, sims = _exact(source, queries, args.k, allowed)
        how = f"exact search over {keys.num_rows if allowed is None else len(allowed)} tracks"
    rows = pa.table({
        "query_track_id": [q for q, row in zip(queries, ids, strict=True) for _ in row],
        "rank": [r + 1 for row in ids for r in range(len(row))],
        "track_id": [t for row in ids for t in row],
        "similarity": pa.array([float(s) for row in sims for s in row], pa.float32()),
    })
    _print(rows, f"{source.model}/{source.layer}: {how}")
    if args.output:
        _write(rows, args.output)
        log.print(f"{rows.num_rows} rows -> {args.output}")
    return 0


def _exact(source: ModelLayer, queries: list[str], k: int, allowed: set[str] | None) -> tuple[list, list]:
    """Exact top-k over the live vectors (those in `allowed`, when given), each query excluding itself."""
    vectors = source.read()
    query_vectors = vectors.vectors[np.searchsorted(vectors.track_ids, np.array(queries, dtype=object))]
    if allowed is not None:
        vectors = vectors.take(np.flatnonzero([t in allowed for t in vectors.track_ids]))
    row_of = {t: r for r, t in enumerate(vectors.track_ids)}
    own = np.array([row_of.get(q, -1) for q in queries], dtype=np.int64)
    found, sims = exact_neighbours(query_vectors, vectors.vectors, k, exclude=own)
    return [vectors.track_ids[r].tolist() for r in found], [s.tolist() for s in sims]


def _print(rows: pa.Table, title: str) -> None:
    table = Table(title=title)
    for name in rows.column_names:
        table.add_column(name, justify="right" if name in ("rank", "similarity") else "left")
    for row in rows.to_pylist():
        table.add_row(row["query_track_id"], str(row["rank"]), row["track_id"], f"{row['similarity']:.4f}")
    Console().print(table)


def _write(rows: pa.Table, path: str) -> None:
    suffix = Path(path).suffix
    if suffix == ".parquet":
        pq.write_table(rows, path)
    elif suffix == ".csv":
        pacsv.write_csv(rows, path)
    elif suffix == ".jsonl":
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows.to_pylist()))
    else:
        msg = f"--output {path}: use a .csv, .parquet or .jsonl file name"
        raise ConfigError(msg)
