"""Running the command line as its own process against S3 through the fault proxy (`tests/helpers/fault_proxy.py`).

The process reaches the store only through the proxy: the environment's `AWS_ENDPOINT_URL` (the catalog and the
audio, read through fsspec) and `--storage-option` (the tables). Client timeouts are short, so that a stalled
request costs seconds: `timeout` for deltalake, `FSSPEC_S3`'s botocore `read_timeout` for s3fs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
# Below the proxy's stall: a stalled request times out on the client's side and is retried.
CLIENT_TIMEOUT_S = 2
# Bounds one command's wall time: a run that neither finishes nor gives up is a failure of the test.
PROCESS_TIMEOUT_S = 480


class Finished(NamedTuple):
    """A finished command: its exit status and its output (stdout and stderr together)."""

    code: int
    output: str

    @property
    def last_line(self) -> str:
        """The last line it printed."""
        lines = self.output.strip().splitlines()
        return lines[-1] if lines else ""


def storage_flags(endpoint: str) -> list[str]:
    """`--storage-option` flags that point the tables at `endpoint`, with a short timeout."""
    options = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "conditional_put": "etag",
        "timeout": f"{CLIENT_TIMEOUT_S}s",
        "connect_timeout": f"{CLIENT_TIMEOUT_S}s",
    }
    return [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]


def run_cli(endpoint: str, *argv: str, s3fs_attempts: int | None = None) -> Finished:
    """`catalog-embed argv...` in a process of its own, every S3 client in it pointed at `endpoint`;
    `s3fs_attempts` sets botocore's attempts per request under s3fs (a short budget for a store that keeps failing:
    its default backoff takes minutes to give up)."""
    config_kwargs: dict = {"read_timeout": CLIENT_TIMEOUT_S, "connect_timeout": CLIENT_TIMEOUT_S}
    if s3fs_attempts is not None:
        config_kwargs["retries"] = {"mode": "standard", "max_attempts": s3fs_attempts}
    s3fs_config = {"config_kwargs": config_kwargs}
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        AWS_ENDPOINT_URL=endpoint,
        AWS_ALLOW_HTTP="true",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        FSSPEC_S3=json.dumps(s3fs_config),
    )
    command = [sys.executable, "-m", "catalog_embed.pipelines.cli", *argv]
    try:
        done = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or "") + (exc.stderr or "") if isinstance(exc.stdout, str) else ""
        return Finished(-1, f"{output}\n(timed out after {PROCESS_TIMEOUT_S} s)")
    return Finished(done.returncode, done.stdout + done.stderr)


def embed(endpoint: str, catalog: str, out: str, *extra: str, s3fs_attempts: int | None = None) -> Finished:
    """`catalog-embed embed` of `catalog` into `out` with the cheap `mfcc-stats` encoder, through `endpoint`."""
    return run_cli(
        endpoint, "embed", "--catalog", catalog, "--out", out, "--model", "mfcc-stats", "--workers", "1",
        "--shard-size", "2", *storage_flags(endpoint), *extra, s3fs_attempts=s3fs_attempts,
    )
