"""Damaged tables: every command that opens one says in one line which table, which file and what to do (exit 2),
and leaves every byte as it was; `embed` refuses before any work and never repairs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from tests.helpers.cli import run_cli
from tests.helpers.tables import commit, ids, mixture

LOG = Path("embeddings/_delta_log")


def _data_file(out: Path) -> Path:
    return min((out / "embeddings" / "model=synth").glob("*.parquet"))


# kind -> (damage done to a copy of the tables, what the error must name)
DAMAGE = {
    "garbage log entry": (lambda out: (out / LOG / f"{1:020d}.json").write_text("not json {\n"),
                          f"_delta_log/{1:020d}.json is not a Delta commit"),
    "deleted log entry": (lambda out: (out / LOG / f"{1:020d}.json").unlink(), f"_delta_log/{1:020d}.json is missing"),
    "deleted first log entry": (lambda out: (out / LOG / f"{0:020d}.json").unlink(),
                                f"_delta_log/{0:020d}.json is missing"),
    "garbage _last_checkpoint": (lambda out: (out / LOG / "_last_checkpoint").write_text('{"version": 7, "size": 6}'),
                                 "delete _last_checkpoint"),
    "truncated data file": (lambda out: os.truncate(_data_file(out), 100), "(truncated or overwritten)"),
    "missing data file": (lambda out: _data_file(out).unlink(), ".parquet is missing"),
    "deleted log": (lambda out: shutil.rmtree(out / LOG), "but no _delta_log/ entries"),
}

COMMANDS = {
    "query": ["query", "--out", "{out}", "SELECT count(*) FROM embeddings"],
    "similar": ["similar", "--out", "{out}", "--model", "synth", "--track", "t0001"],
    "index": ["index", "--out", "{out}", "--model", "synth"],
    "vacuum": ["vacuum", "--out", "{out}"],
    "plan": ["plan", "--catalog", "{catalog}", "--out", "{out}", "--model", "mfcc-stats"],
    "embed": ["embed", "--catalog", "{catalog}", "--out", "{out}", "--model", "mfcc-stats", "--workers", "1"],
}


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> tuple[Path, Path]:
    """Tables with two commits of `synth` rows, and a two-track catalog to embed."""
    base = tmp_path_factory.mktemp("damaged")
    out = base / "tables"
    store = TableStore(str(out))
    store.ensure_tables()
    commit(store, "r1", "synth", dict(zip(ids(20), mixture(20, 8, 0), strict=True)))
    commit(store, "r2", "synth", dict(zip(ids(5, "u"), mixture(5, 8, 1), strict=True)))
    config = DemoCatalogConfig(n_tracks=2, duration_s=2.0, n_broken=0, codecs=("wav",))
    return out, render_demo_catalog(base / "catalog", config).manifest_path


def _damaged(intact: tuple[Path, Path], kind: str, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "tables"
    shutil.copytree(intact[0], out)
    damage, named = DAMAGE[kind]
    damage(out)
    return out, named


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_table_is_one_line_naming_the_file_and_nothing_is_written(intact, kind, command, tmp_path,
                                                                            capsys):
    out, named = _damaged(intact, kind, tmp_path)
    before = _hashes(tmp_path)
    argv = [a.format(out=out, catalog=intact[1]) for a in COMMANDS[command]]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("catalog-embed: error: "), err
    assert f"embeddings table at {out}/embeddings is damaged" in err and named in err
    assert "restore" in err or "delete _last_checkpoint" in err
    assert _hashes(tmp_path) == before  # nothing written, nothing "repaired", no staging, no index


def test_intact_tables_pass_the_same_commands(intact, tmp_path, capsys):
    # The checks refuse damage only: the same tables undamaged answer every command.
    out = tmp_path / "tables"
    shutil.copytree(intact[0], out)
    for argv in COMMANDS.values():
        code, _, err = run_cli(capsys, *(a.format(out=out, catalog=intact[1]) for a in argv))
        assert code == 0, (argv, err)


def test_no_rust_backtrace_reaches_the_output(intact, tmp_path):
    # deltalake appends a Rust backtrace to its error messages when RUST_BACKTRACE is set, as on many machines.
    out, named = _damaged(intact, "garbage log entry", tmp_path)
    env = dict(os.environ, RUST_BACKTRACE="1")
    env.pop("RUST_LIB_BACKTRACE", None)
    done = subprocess.run(
        [sys.executable, "-m", "catalog_embed.pipelines.cli", "similar", "--out", str(out), "--track", "t0001"],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and named in done.stderr, done.stderr
