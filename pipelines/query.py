"""`catalog-embed query`: SQL over the output tables with DuckDB, no server and no extension download.

Each table is registered as a view over its current Delta snapshot (`TableStore.scan`), so rows replaced by later
runs are never seen twice, as they would be by a bare `read_parquet` glob over the folder.
"""

from __future__ import annotations

import argparse

import duckdb
from rich.console import Console
from rich.table import Table

from schemas.store import TableStore
from schemas.tables import TABLES


def connect(out: str, storage_options: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table under `out` (embeddings, windows, failures, runs)."""
    store = TableStore(out, storage_options)
    con = duckdb.connect()
    for name, spec in TABLES.items():
        con.register(name, store.scan(spec))
    return con


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `query` subcommand."""
    parser = subparsers.add_parser(
        "query",
        help="run SQL over the output tables (DuckDB)",
        description="Run one SQL statement over the tables under --out: embeddings, windows, failures, runs.",
    )
    parser.add_argument("--out", required=True, help="output root given to `embed`")
    parser.add_argument("sql", help="e.g. \"SELECT model, count(*) FROM embeddings GROUP BY model\"")
    parser.add_argument("--limit", type=int, default=50, help="rows to print")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    result = connect(args.out).execute(args.sql)
    table = Table(show_lines=False)
    for column in result.description:
        table.add_column(column[0])
    for row in result.fetchmany(args.limit):
        table.add_row(*(_short(v) for v in row))
    Console().print(table)
    return 0


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
