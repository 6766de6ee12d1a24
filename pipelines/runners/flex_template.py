"""Entry point of the Dataflow Flex Template: the file `FLEX_TEMPLATE_PYTHON_PY_FILE` names in infra/Dockerfile.

The template launcher runs this file with the template's parameters and Dataflow's own pipeline options, all as
`--name=value` with underscores (`--shard_size=64`, `--temp_location=gs://...`, `--template_location=...`). Our
flags are the `catalog-embed embed` flags with hyphens, so a name that is one of ours once hyphenated is ours
(`--temp_location` fills `--temp-location`); every other option passes through to Beam untouched. The run goes to
`--runner dataflow` and returns once the job is launched: the job commits the run from its last step.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from catalog_embed.pipelines.embed.config import config_from_args
from catalog_embed.pipelines.embed.job import register, run_embed


def parse_launcher_args(argv: list[str]) -> argparse.Namespace:
    """Parse the launcher's arguments into the `embed` namespace; what is not ours lands in `beam_option`."""
    parser = argparse.ArgumentParser(prog="catalog-embed-flex-template")
    register(parser.add_subparsers(dest="command", required=True))
    hyphenated = [_hyphenated(arg) for arg in argv]
    original = dict(zip(hyphenated, argv, strict=True))
    args, unknown = parser.parse_known_args(["embed", *hyphenated])
    args.beam_option = [*getattr(args, "beam_option", []), *(original[arg] for arg in unknown)]
    return args


def main(argv: list[str] | None = None) -> int:
    """Launch the run the template parameters describe; returns the exit code."""
    config = config_from_args(parse_launcher_args(sys.argv[1:] if argv is None else argv))
    config = replace(config, runner="dataflow", beam=replace(config.beam, detach=True))
    run_embed(config)
    return 0


def _hyphenated(arg: str) -> str:
    """'--shard_size=64' -> '--shard-size=64' (the value is left alone)."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


if __name__ == "__main__":
    sys.exit(main())
