"""`catalog-embed models`: the encoders this install can run, with their outputs, versions and licences.

Bring-your-own encoders are listed by naming their configs: `catalog-embed models my-encoder.json`.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from catalog_embed.pipelines.output import console, print_json
from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders import encoder_names, get_encoder


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
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array: name, layers (name, dim, default), version (null when weights are missing), "
        "needs (why), licence, description",
    )
    parser.set_defaults(handler=_handle)


def describe(name: str) -> dict[str, Any]:
    """What `models` shows of one encoder; resolving its version may fetch and convert weights."""
    encoder = get_encoder(name)
    try:
        encoder.prepare()
        version, needs = encoder.version, None
    except EncoderError as exc:
        version, needs = None, f"needs weights: {exc}"
    return {
        "name": encoder.name,
        "layers": [
            {"name": spec.name, "dim": spec.dim, "default": spec.name == encoder.default_layer}
            for spec in encoder.layers
        ],
        "version": version,
        "needs": needs,
        "licence": {"code": encoder.licence.code, "weights": encoder.licence.weights},
        "description": encoder.description,
    }


def _handle(args: argparse.Namespace) -> int:
    models = [describe(name) for name in args.models or encoder_names()]
    if args.json:
        print_json(models)
        return 0
    table = Table(title="encoders")
    for column in ("model", "layers (dim)", "version", "licence", "description"):
        table.add_column(column)
    for model in models:
        layers = ", ".join(f"{'*' if s['default'] else ''}{s['name']} ({s['dim']})" for s in model["layers"])
        licence = f"code {model['licence']['code']}, weights {model['licence']['weights']}"
        table.add_row(model["name"], layers, model["version"] or model["needs"], licence, model["description"])
    out = console(markup=False)
    out.print(table)
    out.print("* default layer. Pick others with --layer a,b")
    return 0
