"""How commands print: Rich on a terminal, whole lines when the output goes to a pipe or a file, JSON for scripts.

Rich lays text out for a terminal 80 columns wide when it cannot ask one, so piped output came out cut
(`mule-sfnfnet…`) or broken across lines. Every command prints through `console()` instead of `Console()`.
"""

from __future__ import annotations

import datetime
import decimal
import json
import sys
import uuid
from typing import Any

from rich.console import Console

# Wide enough for any value a command prints (an embedding as text), so nothing is cut or wrapped off a terminal.
_UNBOUNDED_WIDTH = 2**31 - 1


def console(stderr: bool = False, quiet: bool = False, markup: bool = True) -> Console:
    """A Rich console on stdout (or stderr) that never cuts or wraps what it prints when not on a terminal.

    Args:
        stderr: print to stderr (logs and progress) instead of stdout (results).
        quiet: print nothing.
        markup: read `[bold]`-style markup in printed strings. Pass False when printing data (track ids, URIs):
            Rich would take `[live]` in `a [live] take.mp3` for markup and drop it.
    """
    terminal = Console(stderr=stderr, quiet=quiet, markup=markup)
    if terminal.is_terminal:
        return terminal
    return Console(
        stderr=stderr, quiet=quiet, markup=markup, width=_UNBOUNDED_WIDTH, soft_wrap=True, highlight=False
    )


def print_json(value: Any) -> None:
    """Print `value` to stdout as one JSON document: dates and times in ISO 8601, decimals and UUIDs as text."""
    json.dump(value, sys.stdout, default=_jsonable, ensure_ascii=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    msg = f"{type(value).__name__} is not JSON serialisable"
    raise TypeError(msg)
