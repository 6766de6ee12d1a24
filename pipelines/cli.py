"""The `catalog-embed` command line: parses arguments into config dataclasses and hands them to a job.

Each subcommand lives in its own module under `pipelines/` and exposes `register(subparsers)`, which adds its
parser and sets `handler` to a function taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from schemas.errors import CatalogEmbedError

# Modules providing subcommands, in the order `--help` lists them.
_COMMAND_MODULES = (
    "pipelines.embed",
    "pipelines.query",
    "pipelines.vacuum",
    "pipelines.models",
    "pipelines.demo",
    "pipelines.probe",
    "pipelines.similar",
    "pipelines.index",
    "pipelines.catalog_map",
    "pipelines.compare",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="catalog-embed",
        description="Turn a music catalog into embeddings: decode, log-mel, frozen encoder, Delta tables.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CatalogEmbedError as exc:
        print(f"catalog-embed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
