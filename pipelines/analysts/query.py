"""`catalog-embed query`: SQL over the output tables with DuckDB, no server and no extension download.

Each table is registered as a view over its current Delta snapshot (`TableStore.scan`), so rows replaced by later
runs are never seen twice, as they would be by a bare `read_parquet` glob over the folder.

The SQL may come from elsewhere (a dashboard, a script, a service), so by default it sees those views and nothing
else: DuckDB's external access (files, URLs, ATTACH, INSTALL/LOAD) is off, extensions are neither installed nor
loaded on demand, Python objects are not scanned, and the configuration is locked so the statement cannot turn any
of it back on. `--allow-files` gives the statement DuckDB's local file access (read and write), e.g. to join a
labels file; extensions still never download.

Commands that take a SQL fragment (`similar --where`) run it through `filter_rows`: one boolean expression over
the columns of the rows it filters, parsed first (no `;`, no second statement, no subquery or table function,
nothing outside the WHERE clause), then run in the same sandbox.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import duckdb
import pyarrow as pa
from rich.table import Table

from catalog_embed.pipelines.io.storage import add_storage_option_argument, storage_options_from_args
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.pipelines.output import console, print_json
from catalog_embed.schemas.errors import QueryError, first_line
from catalog_embed.schemas.tables import TABLES
from catalog_embed.workers.transient import storage_unavailable, unavailable_error

# Settings applied after the views are registered; the last one locks them all for the statement's lifetime.
_NO_DOWNLOADS = (
    ("autoinstall_known_extensions", False),
    ("autoload_known_extensions", False),
    ("allow_community_extensions", False),
)
_SANDBOX = (("enable_external_access", False), ("python_enable_replacements", False))
_LOCK = (("lock_configuration", True),)
# On a terminal, long values (embeddings) are shortened to this many characters; piped output keeps them whole.
_TERMINAL_CELL_CHARS = 60


def connect(
    out: str, storage_options: dict[str, str] | None = None, allow_files: bool = False
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table under `out` (embeddings, windows, failures, runs).

    Args:
        out: the output root given to `embed`.
        storage_options: deltalake storage options for `out`.
        allow_files: let SQL read and write local files; otherwise it reaches only the views.
    """
    store = TableStore(out, storage_options)
    con = duckdb.connect()
    for name, spec in TABLES.items():
        con.register(name, store.scan(spec))
    lock_down(con, allow_files)
    return con


def lock_down(con: duckdb.DuckDBPyConnection, allow_files: bool = False) -> None:
    """Apply the sandbox (see the module docstring) to a connection, once its tables are registered: afterwards it
    reaches those tables only (local files too with `allow_files`), and its settings cannot be changed."""
    settings = _NO_DOWNLOADS + (() if allow_files else _SANDBOX) + _LOCK
    for key, value in settings:
        con.execute(f"SET {key} = {str(value).lower()}")


def filter_rows(rows: pa.Table, name: str, predicate: str, option: str) -> pa.Table:
    """The rows of `rows` (seen by the SQL as the table `name`) for which the SQL expression `predicate` holds.

    Args:
        rows: the rows to filter.
        name: the table name `predicate` may use to qualify columns.
        predicate: one boolean SQL expression over the columns of `rows`.
        option: the option that gave it, for messages.

    Raises:
        QueryError: `predicate` is not one expression over the columns (see `check_predicate`), or it fails.
    """
    check_predicate(predicate, name, option)
    con = duckdb.connect()
    con.register(name, rows)
    lock_down(con)
    columns = ", ".join(rows.column_names)
    try:
        return con.sql(f"SELECT * FROM {name} WHERE {predicate}").to_arrow_table()
    except duckdb.PermissionException as exc:
        msg = f"{option} {predicate!r} reaches outside the table ({first_line(exc)}): use its columns only ({columns})"
        raise QueryError(msg) from exc
    except duckdb.Error as exc:
        msg = f"{option} {predicate!r} failed: {first_line(exc)} (columns: {columns}): fix the expression"
        raise QueryError(msg) from exc


def check_predicate(predicate: str, name: str, option: str) -> None:
    """Refuse a SQL fragment that is anything but one expression in the WHERE clause of `SELECT * FROM name`.

    DuckDB parses the query the fragment makes (it executes nothing); the parse must equal that of the plain query
    everywhere but the WHERE clause (so `1=1) UNION (SELECT ...`, `... ORDER BY`, a second statement after `;` are
    refused, and so is a `;` anywhere outside a string), and the expression may hold no subquery or table function,
    which could read beyond the rows.

    Raises:
        QueryError: naming what the fragment may contain.
    """
    rule = (
        f"{option} must be one boolean SQL expression over the table's columns, e.g. \"duration_s > 60\" (no ';', "
        "subquery or table function)"
    )
    if not predicate.strip():
        msg = f"{option} is empty: {rule}"
        raise QueryError(msg)
    tokens = duckdb.tokenize(predicate)
    semicolon = any(kind == duckdb.token_type.operator and predicate[at] == ";" for at, kind in tokens)
    parsed, plain = (_parse(f"SELECT * FROM {name} WHERE {where}") for where in (predicate, "TRUE"))
    if semicolon or parsed is None or len(parsed) != 1:
        msg = f"{option} {predicate!r} is not one expression: {rule}"
        raise QueryError(msg)
    where = parsed[0]["node"].pop("where_clause", None)
    plain[0]["node"].pop("where_clause", None)
    if parsed != plain or _reaches_beyond(where):
        msg = f"{option} {predicate!r} is not allowed: {rule}"
        raise QueryError(msg)


def _parse(sql: str) -> list[dict[str, Any]] | None:
    """DuckDB's parse of `sql` as JSON statements, without where in the text each node sits; None where it is not
    one or more SELECT statements."""
    (serialized,) = duckdb.connect().execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    parsed = json.loads(serialized)
    return None if parsed.get("error") else _without_locations(parsed["statements"])


def _without_locations(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_locations(v) for k, v in node.items() if not k.startswith("query_location")}
    if isinstance(node, list):
        return [_without_locations(v) for v in node]
    return node


def _reaches_beyond(node: Any) -> bool:
    """Whether an expression's parse holds a subquery or a table function (anything with a FROM of its own)."""
    if isinstance(node, dict):
        if node.get("class") == "SUBQUERY" or "from_table" in node or node.get("type") == "TABLE_FUNCTION":
            return True
        return any(_reaches_beyond(v) for v in node.values())
    if isinstance(node, list):
        return any(_reaches_beyond(v) for v in node)
    return False


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], duckdb.DuckDBPyConnection | None]:
    """Execute `sql`; returns the column names (none for a statement without a result) and the open result.

    Raises:
        QueryError: the statement is empty, malformed, or reaches beyond what the connection allows.
        StorageUnavailableError: the tables' store kept failing while the scan read them.
    """
    if not sql.strip().strip(";").strip():
        msg = 'the SQL statement is empty: pass one, e.g. "SELECT model, count(*) FROM embeddings GROUP BY model"'
        raise QueryError(msg)
    try:
        result = con.execute(sql)
    except duckdb.PermissionException as exc:
        msg = (
            f"{first_line(exc)}: `query` reads only the tables under --out by default; pass --allow-files to let "
            "the SQL read local files"
        )
        raise QueryError(msg) from exc
    except duckdb.Error as exc:
        if storage_unavailable(exc):
            raise unavailable_error("running the query", exc) from exc
        msg = f"the SQL failed: {first_line(exc)} (tables: {', '.join(TABLES)}): fix the statement"
        raise QueryError(msg) from exc
    if result.description is None:
        return [], None
    return [column[0] for column in result.description], result




def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `query` subcommand."""
    parser = subparsers.add_parser(
        "query",
        help="run SQL over the output tables (DuckDB)",
        description="Run SQL over the tables under --out: embeddings, windows, failures, runs. The SQL sees only "
        "those tables unless --allow-files is given; nothing is ever downloaded.",
    )
    parser.add_argument("--out", required=True, help="output root given to `embed`")
    parser.add_argument("sql", help="e.g. \"SELECT model, count(*) FROM embeddings GROUP BY model\"")
    parser.add_argument("--limit", type=int, default=50, help="rows to print; 0 prints every row")
    parser.add_argument(
        "--allow-files",
        action="store_true",
        help="let the SQL read and write local files (e.g. join 'labels.parquet'); only for SQL you trust",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON array of objects")
    add_storage_option_argument(parser)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    if args.limit < 0:
        msg = f"--limit must be 0 (every row) or more, got {args.limit}"
        raise QueryError(msg)
    columns, result = run_query(
        connect(args.out, storage_options_from_args(args), allow_files=args.allow_files), args.sql
    )
    rows = [] if result is None else result.fetchall() if args.limit == 0 else result.fetchmany(args.limit)
    if args.json:
        print_json([dict(zip(columns, row, strict=True)) for row in rows])
        return 0
    out = console(markup=False)
    table = Table(show_lines=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(v, out.is_terminal) for v in row))
    out.print(table)
    return 0


def _cell(value: Any, terminal: bool) -> str:
    text = str(value)
    if terminal and len(text) > _TERMINAL_CELL_CHARS:
        return text[: _TERMINAL_CELL_CHARS - 3] + "..."
    return text
