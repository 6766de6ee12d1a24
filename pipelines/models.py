"""`catalog-embed models`: the encoders this install can run, with their outputs, versions and licences.

Bring-your-own encoders are listed by naming their configs: `catalog-embed models my-encoder.json`.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from schemas.errors import EncoderError
from workers.encoders import encoder_names, get_encoder


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `models` subcommand."""
    parser = subparsers.add_parser(
        "models",
        help="list the encoders, their layers, versions and licences",
        description="List every registered encoder. Resolving a version fetches and converts weights on first use.",
    )
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="registered names or bring-your-own encoder configs (*.json) to list instead of every registered one",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    table = Table(title="encoders")
    for column in ("model", "layers (dim)", "version", "licence", "description"):
        table.add_column(column)
    for name in args.models or encoder_names():
        encoder = get_encoder(name)
        layers = ", ".join(
            f"{'*' if spec.name == encoder.default_layer else ''}{spec.name} ({spec.dim})" for spec in encoder.layers
        )
        try:
            encoder.prepare()
            version = encoder.version
        except EncoderError as exc:
            version = f"needs weights: {exc}"
        table.add_row(encoder.name, layers, version, str(encoder.licence), encoder.description)
    Console().print(table)
    Console().print("* default layer. Pick others with --layer a,b")
    return 0
