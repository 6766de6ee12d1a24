"""Conditions the user fixes on their side (a full disk, a path this user may not write, a read-only HOME) are one
line naming the path and the fix, exit 2, never a traceback. Real ones: a tiny tmpfs that fills up, and the
command run without root's power to write anywhere (CAP_DAC_OVERRIDE dropped), so file modes bind as for any user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from tests.helpers.cli import run_cli
from tests.helpers.tables import commit, ids, mixture

# Root writes through any file mode; without these capabilities it is bound by them like any other user.
AS_ANOTHER_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _without_root_powers(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command bound by file modes")
    return subprocess.run(
        [*AS_ANOTHER_USER, sys.executable, "-m", "catalog_embed.pipelines.cli", *argv],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )


def _one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("catalog-embed: error: "), done.stderr
    return done.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 48 KiB tmpfs: room for a run's staging, not for its commit."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_naming_the_path(tiny_disk, tmp_path, capsys):
    catalog = render_demo_catalog(tmp_path / "catalog", DemoCatalogConfig(n_tracks=2, duration_s=2.0, n_broken=0,
                                                                          codecs=("wav",)))
    out = tiny_disk / "tables"
    code, _, err = run_cli(capsys, "embed", "--catalog", str(catalog.manifest_path), "--out", str(out),
                           "--model", "mfcc-stats", "--workers", "1")
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line == (
        f"catalog-embed: error: {out}: no space left on the device: free some space or pass a path on another disk, "
        "then run again"
    )


@pytest.fixture
def read_only_tables(tmp_path):
    out = tmp_path / "tables"
    store = TableStore(str(out))
    store.ensure_tables()
    commit(store, "r1", "synth", dict(zip(ids(20), mixture(20, 8, 0), strict=True)))
    for folder in (out, *out.rglob("*")):
        folder.chmod(0o555 if folder.is_dir() else 0o444)
    yield out
    for folder in (out, *out.rglob("*")):
        folder.chmod(0o755)


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        (["index", "--out", "{out}", "--model", "synth"], "{out}/_indexes"),
        (["similar", "--out", "{out}", "--track", "t0001", "--output", "{out}/n.csv"], "{out}/n.csv"),
    ],
)
def test_a_path_this_user_cannot_write_is_one_line_naming_it(read_only_tables, argv, path):
    # The analysts' commands check their output places before any work (pipelines/analysts/outputs.py), so the
    # line is theirs, not the generic one for an OSError: it names the place and where to write instead.
    err = _one_line(_without_root_powers(*(a.format(out=read_only_tables) for a in argv)))
    assert path.format(out=read_only_tables) in err


def test_a_read_only_home_names_the_cache_variable(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o555)
    env = {k: v for k, v in os.environ.items() if k != "CATALOG_EMBED_CACHE"} | {"HOME": str(home)}
    err = _one_line(_without_root_powers("models", env=env))
    assert f"cannot create the cache folder {home}/.cache/catalog-embed (Permission denied)" in err
    assert "set CATALOG_EMBED_CACHE to a folder this user can write" in err


@pytest.mark.parametrize("command", [["query", "--out", "s3://bucket/tables", "SELECT 1"],
                                     ["plan", "--catalog", "s3://bucket/catalog.parquet", "--out", "s3://bucket/t",
                                      "--model", "mfcc-stats"]])
def test_an_object_store_without_credentials_is_one_line_naming_what_to_set(tmp_path, command):
    # No key in the environment, no ~/.aws, no instance metadata to ask: the request is never signed, so the
    # endpoint (a closed port on this machine) is never reached.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    done = subprocess.run(
        [sys.executable, "-m", "catalog_embed.pipelines.cli", *command, "--storage-option",
         "AWS_ENDPOINT_URL=http://127.0.0.1:9", "--storage-option", "AWS_ALLOW_HTTP=true"],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    line = _one_line(done)
    assert "S3 credentials not found" in line and "AWS_ACCESS_KEY_ID" in line
