"""Running the command line in-process, as tests do."""

from __future__ import annotations

import pytest

from catalog_embed.pipelines.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`catalog-embed argv...`: its exit code and what it printed to stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err
