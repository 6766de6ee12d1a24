"""How the command line logs: `--log-level` and `--log-format` (text for people, JSON lines for log collectors).

Everything goes to stderr; stdout carries results (`--json` documents, query rows). With `--log-format json` every
line on stderr is one JSON object (time, level, logger, message and, while a run holds its staging, run_id), so a
collector never meets a line that is not JSON: what a command prints for people through Rich (`console`) and its
one-line errors (`say`) become records too. `--log-level` is the threshold of catalog-embed's own records; other
libraries' (Beam, Ray, deltalake) show from `warning` up, or all of them with `debug`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from rich.console import Console

from catalog_embed.pipelines.output import console as output_console

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
_OWN = "catalog_embed"
_TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Wide enough that Rich never wraps a line it hands to the log.
_UNBOUNDED_WIDTH = 2**31 - 1

_format = "text"
_handler: logging.Handler | None = None
_run_id: str | None = None  # a global, not a context variable: the engines log from threads of their own


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--log-level` and `--log-format` (options of the command line as a whole, before the command)."""
    parser.add_argument("--log-level", choices=LEVELS, default="info",
                        help="the least severe of catalog-embed's messages to show (debug: every library's too)")
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="json: one JSON object per line on stderr (time, level, logger, message, run_id)")


def configure(level: str = "info", log_format: str = "text") -> None:
    """Send log records to stderr in `log_format` from `level` up; replaces what an earlier call set up."""
    global _format, _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _format = log_format
    _handler = _StderrHandler()
    _handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    root.addHandler(_handler)
    threshold = getattr(logging, level.upper())
    logging.getLogger(_OWN).setLevel(threshold)
    root.setLevel(logging.DEBUG if threshold == logging.DEBUG else logging.WARNING)


def console(logger: str) -> Console:
    """The Rich console of a command's messages for people: stderr (quiet above `info`) as text; as JSON, each
    printed line becomes an `info` record of `logger`, markup and colours stripped."""
    if _format != "json":
        return output_console(stderr=True, quiet=not logging.getLogger(logger).isEnabledFor(logging.INFO))
    return Console(file=_LineLogger(logging.getLogger(logger)), width=_UNBOUNDED_WIDTH, soft_wrap=True,
                   highlight=False, color_system=None, force_terminal=False)


def say(line: str) -> None:
    """Print the command's last word (`catalog-embed: error: ...`) on stderr: the line, or as JSON an `error`
    record."""
    if _format == "json":
        logging.getLogger(_OWN).error(line)
    else:
        print(line, file=sys.stderr)


@contextmanager
def bound_run_id(run_id: str) -> Iterator[None]:
    """Tag the records logged meanwhile (from any thread) with `run_id`."""
    global _run_id
    previous, _run_id = _run_id, run_id
    try:
        yield
    finally:
        _run_id = previous


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, run_id where known, and the
    traceback of a logged exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (newlines in the message are escaped)."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if _run_id is not None:
            entry["run_id"] = _run_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record is emitted (a test's capture, a redirected stream),
    never on a stream closed since it was configured."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _LineLogger:
    """A text file whose every complete line is logged as one `info` record (Rich writes a print in pieces)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self._logger.info(line.rstrip())
        return len(text)

    def flush(self) -> None:
        """Nothing to do: lines are logged as they complete."""
