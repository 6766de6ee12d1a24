"""`--storage-option KEY=VALUE`: how every command that reads or writes tables reaches their store.

The options go to deltalake (and, for an S3 endpoint, to fsspec: see `TableStore`); credentials come from the
environment's default chain, never from the command line.
"""

from __future__ import annotations

import argparse

from catalog_embed.schemas.errors import ConfigError

HELP = "deltalake storage option for the tables, e.g. AWS_ENDPOINT_URL=http://127.0.0.1:9000; repeatable"


def add_storage_option_argument(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable `--storage-option` to a subcommand."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=HELP)


def storage_options_from_args(args: argparse.Namespace) -> dict[str, str] | None:
    """The parsed `--storage-option` pairs of a subcommand, or None when none were given."""
    return parse_storage_options(args.storage_option)


def parse_storage_options(pairs: list[str]) -> dict[str, str] | None:
    """`KEY=VALUE` pairs as a dict, or None when there are none.

    Raises:
        ConfigError: a pair is not KEY=VALUE.
    """
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            msg = f"--storage-option {pair!r} is not KEY=VALUE"
            raise ConfigError(msg)
        options[key] = value
    return options or None
