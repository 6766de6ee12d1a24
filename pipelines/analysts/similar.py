"""`catalog-embed similar`: the tracks nearest to given tracks, or to a text, by cosine similarity, in one model and
layer.

Small tables are searched exactly (one matrix product over every live vector); above `--exact-below` rows the
ANN index built by `catalog-embed index` answers, and only while it reflects the table's current version (else
the command says it is stale and how to refresh it). `--where` restricts the candidates with a SQL predicate on
the embeddings table's columns; `--recall` also runs exact search and prints how many of the index's answers it
shares. `--text` queries a CLAP table (`hf:` CLAP checkpoint, layer `pooled`) with the text tower of the checkpoint
its rows were embedded with (`workers.encoders.hf.text`), checked to be the rows' version before any vector is read.
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
from catalog_embed.pipelines.analysts.outputs import OutputFile
from catalog_embed.pipelines.analysts.vectors import ModelLayer, add_table_arguments, require_tracks, store_from_args
from catalog_embed.pipelines.output import print_json
from catalog_embed.schemas.errors import ConfigError
from catalog_embed.workers.analysis import exact_neighbours

# Below this many live rows exact search is cheap (a few ms per query): no index needed.
EXACT_BELOW = 100_000
OUTPUT_SUFFIXES = (".csv", ".parquet", ".jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `similar` subcommand."""
    parser = subparsers.add_parser(
        "similar",
        help="nearest tracks by cosine similarity (exact, or through the ANN index)",
        description="Print (and optionally write) the k tracks most similar to each given track, or to each text "
        "(CLAP tables).",
    )
    add_table_arguments(parser)
    parser.add_argument("--model", help="embedding model (required when the table holds several)")
    parser.add_argument("--layer", help="embedding layer (default: the model's only layer)")
    parser.add_argument("--track", action="append", default=[], metavar="ID", help="query track id; repeatable")
    parser.add_argument("--tracks", metavar="FILE",
                        help="query track ids: one per line, or a CSV/Parquet track_id column")
    parser.add_argument(
        "--text", action="append", default=[], metavar="TEXT",
        help="query text, e.g. \"solo piano, slow\"; repeatable; needs a table of an hf: CLAP checkpoint, layer "
        "pooled, whose weights are still at hand (embedded with its text tower); not with --track/--tracks",
    )
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10)")
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
    parser.add_argument("--json", action="store_true", help="print the neighbours as a JSON array of objects")
    parser.set_defaults(handler=_handle)


def query_ids(args: argparse.Namespace) -> list[str]:
    """The query track ids from --track and --tracks, in order, once each."""
    ids = list(args.track)
    if args.tracks:
        path = Path(args.tracks)
        if not path.is_file():
            msg = f"--tracks {args.tracks}: {'a folder' if path.is_dir() else 'no such file'}: name a file of track ids"
            raise ConfigError(msg)
        try:
            if path.suffix in (".csv", ".parquet"):
                table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
                if "track_id" not in table.column_names:
                    msg = f"--tracks {args.tracks} has no track_id column (columns: {', '.join(table.column_names)})"
                    raise ConfigError(msg)
                ids += [str(t) for t in table["track_id"].to_pylist()]
            else:
                ids += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError) as exc:  # ArrowInvalid and UnicodeDecodeError are ValueErrors
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            msg = (
                f"--tracks {args.tracks} cannot be read ({why}): give one track id per line, or a CSV/Parquet file "
                "with a track_id column"
            )
            raise ConfigError(msg) from exc
    if not ids:
        msg = "no query track: pass --track ID (repeatable) or --tracks FILE"
        raise ConfigError(msg)
    return list(dict.fromkeys(ids))


def _handle(args: argparse.Namespace) -> int:
    if args.k < 1:
        msg = f"--k must be at least 1, got {args.k}"
        raise ConfigError(msg)
    if args.text and (args.track or args.tracks):
        msg = "--text searches by text, --track/--tracks by tracks: pass one kind of query"
        raise ConfigError(msg)
    if any(not text.strip() for text in args.text):
        msg = "--text is empty: describe the sound in words, e.g. --text \"solo piano, slow\""
        raise ConfigError(msg)
    store = store_from_args(args)
    output = OutputFile.check("--output", args.output, [store], OUTPUT_SUFFIXES) if args.output else None
    source = ModelLayer(store, args.model, args.layer)
    keys = source.keys()
    if args.text:
        queries = list(dict.fromkeys(args.text))
        text_vectors = _text_vectors(source, queries)
        own = None
    else:
        queries = query_ids(args)
        require_tracks(queries, keys["track_id"], source.model)
        text_vectors = None
        own = np.array(queries, dtype=object)
    allowed = set(source.matching(args.where).to_pylist()) if args.where is not None else None
    if allowed is not None and not allowed - set(() if own is None else queries):
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
        query_vectors = index.vectors_of(queries) if text_vectors is None else text_vectors
        ids, sims = index.search(query_vectors, args.k, own, allowed)
        how = f"index ({meta['library']}, version {meta['table_version']}, {meta['count']} tracks)"
        if args.recall:
            exact = _exact(source, queries, args.k, allowed, text_vectors)
            found = [set(row) for row in ids]
            recall = np.mean([len(f & set(t)) / max(len(t), 1) for f, t in zip(found, exact[0], strict=True)])
            same = sum(f == set(t) for f, t in zip(found, exact[0], strict=True))
            log.print(f"recall@{args.k} against exact search: {recall:.3f} ({same} of {len(queries)} queries have "
                      f"the same top-{args.k})")
    else:
        ids, sims = _exact(source, queries, args.k, allowed, text_vectors)
        how = f"exact search over {keys.num_rows if allowed is None else len(allowed)} tracks"
    rows = pa.table({
        "query_text" if args.text else "query_track_id": [q for q, row in zip(queries, ids, strict=True) for _ in row],
        "rank": [r + 1 for row in ids for r in range(len(row))],
        "track_id": [t for row in ids for t in row],
        "similarity": pa.array([float(s) for row in sims for s in row], pa.float32()),
    })
    if args.json:
        print_json(rows.to_pylist())
    else:
        _print(rows, f"{source.model}/{source.layer}: {how}")
    if output is not None:
        output.write(lambda path: _write(rows, path))
        log.print(f"{rows.num_rows} rows -> {args.output}")
    return 0


def _text_vectors(source: ModelLayer, texts: list[str]) -> np.ndarray:
    """The texts embedded by the text tower of the checkpoint `source`'s rows were embedded with.

    Raises:
        ConfigError: the rows hold several versions of the model (no one text tower fits them all).
        EncoderError: see `ClapTextEncoder`.
    """
    from catalog_embed.workers.encoders.hf.text import ClapTextEncoder  # torch and transformers only for --text

    versions = source.versions()
    if len(versions) != 1:
        msg = (
            f"the {source.model}/{source.layer} rows hold versions {', '.join(versions)}: text search needs one; "
            f"re-embed the catalog with `catalog-embed embed --model {source.model}` first"
        )
        raise ConfigError(msg)
    return ClapTextEncoder(source.model, versions[0], source.layer).embed(texts)


def _exact(source: ModelLayer, queries: list[str], k: int, allowed: set[str] | None,
           text_vectors: np.ndarray | None = None) -> tuple[list, list]:
    """Exact top-k over the live vectors (those in `allowed`, when given): of the query tracks `queries`, each
    excluding itself, or, where `text_vectors` are given, of those vectors of the query texts."""
    vectors = source.read()
    query_vectors = vectors.vectors[vectors.rows_of(queries)] if text_vectors is None else text_vectors
    if allowed is not None:
        vectors = vectors.take(np.flatnonzero([t in allowed for t in vectors.track_ids]))
    own = None
    if text_vectors is None:
        row_of = {t: r for r, t in enumerate(vectors.track_ids)}
        own = np.array([row_of.get(q, -1) for q in queries], dtype=np.int64)
    found, sims = exact_neighbours(query_vectors, vectors.vectors, k, exclude=own)
    return [vectors.track_ids[r].tolist() for r in found], [s.tolist() for s in sims]


def _print(rows: pa.Table, title: str) -> None:
    table = Table(title=title)
    for name in rows.column_names:
        table.add_column(name, justify="right" if name in ("rank", "similarity") else "left")
    for query, rank, track, similarity in zip(*rows.to_pydict().values(), strict=True):
        table.add_row(query, str(rank), track, f"{similarity:.4f}")
    Console().print(table)


def _write(rows: pa.Table, path: Path) -> None:
    """Write the neighbours in the format the name's suffix (one of OUTPUT_SUFFIXES) says."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pq.write_table(rows, path)
    elif suffix == ".csv":
        pacsv.write_csv(rows, path)
    else:
        # Similarities are finite (unusable vectors are never read); allow_nan=False keeps any other value out.
        path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows.to_pylist()))
