"""`catalog-embed models`: the encoders this install can run, with their outputs, versions and licences.

Bring-your-own encoders are listed by naming their configs: `catalog-embed models my-encoder.json`,
`transformers` checkpoints by theirs: `catalog-embed models hf:<repo-id or folder>`, and HEAR 2021 API modules by
their import names: `catalog-embed models hear:<module>` (which imports the module and loads its model once).

The table holds short columns only (name, layers, version, licence); what a model is and what it still needs (its
weights, say) are notes under the table, wrapped, so that piped output stays readable line by line.
"""

from __future__ import annotations

import argparse
import re
import textwrap
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
        help="registered names, bring-your-own encoder configs (*.json), hf: checkpoints or hear: modules to list "
        "instead of every registered one",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array: name, layers (name, dim, default), version (null when weights are missing), "
        "needs (what is missing, the note under the table), licence, description",
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


NOTE_WIDTH = 120
"""Characters per line of the notes under the table."""
_NUMBERED = re.compile(r"(.*?)(\d+)")


def layers_text(layers: list[dict[str, Any]]) -> str:
    """Layers as `name (dim)`, the default starred; a run of numbered layers of one width as `hidden_0..24 (1024)`
    (a 24-layer checkpoint would otherwise fill a line)."""
    groups: list[list[dict[str, Any]]] = []
    for layer in layers:
        last = groups[-1][-1] if groups else None
        if last is not None and _follows(last, layer) and not (last["default"] or layer["default"]):
            groups[-1].append(layer)
        else:
            groups.append([layer])
    parts = []
    for group in groups:
        first, end = group[0], group[-1]
        name = first["name"] if len(group) == 1 else f"{first['name']}..{_NUMBERED.fullmatch(end['name'])[2]}"
        parts.append(f"{'*' if first['default'] else ''}{name} ({first['dim']})")
    return ", ".join(parts)


def _follows(previous: dict[str, Any], layer: dict[str, Any]) -> bool:
    """Whether `layer` is `previous`'s successor: same stem, next number, same width."""
    a, b = _NUMBERED.fullmatch(previous["name"]), _NUMBERED.fullmatch(layer["name"])
    return bool(a and b and a[1] == b[1] and int(b[2]) == int(a[2]) + 1 and previous["dim"] == layer["dim"])


def notes(models: list[dict[str, Any]]) -> list[str]:
    """The lines under the table: each model's description and what it needs, wrapped to `NOTE_WIDTH`."""
    lines = []
    for model in models:
        for text in (model["description"], model["needs"]):
            if text:
                lines += textwrap.wrap(f"{model['name']}: {text}", NOTE_WIDTH, subsequent_indent="    ")
    return lines


def _handle(args: argparse.Namespace) -> int:
    models = [describe(name) for name in args.models or encoder_names()]
    if args.json:
        print_json(models)
        return 0
    table = Table(title="encoders")
    for column in ("model", "layers (dim)", "version", "licence: code / weights"):
        table.add_column(column)
    for model in models:
        licence = f"{model['licence']['code']} / {model['licence']['weights']}"
        table.add_row(model["name"], layers_text(model["layers"]), model["version"] or "needs weights", licence)
    out = console(markup=False)
    out.print(table)
    out.print("* default layer. Pick others with --layer a,b")
    for line in notes(models):
        out.print(line)
    return 0
