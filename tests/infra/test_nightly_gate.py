"""infra/nightly-gate.sh end to end on this machine: the candidate is embedded, compared with the live rows, and
promoted only when the gates pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.tables import RUNS
from catalog_embed.workers.stages import EncoderConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "nightly-gate.sh"


def _gate(small_catalog, live: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = os.environ | {
        "CATALOG": str(small_catalog.manifest_path), "OUT": str(live), "CANDIDATE_OUT": str(tmp_path / "candidate"),
        "MODEL": "chroma-stats", "REPORT": str(tmp_path / "report"), "PYTHONPATH": str(ROOT),
        "CATALOG_EMBED": f"{sys.executable} -m catalog_embed.pipelines.cli",
    } | env
    return subprocess.run(["bash", str(SCRIPT), "--workers", "1"], env=environment, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def test_the_gate_promotes_a_passing_candidate_and_stops_a_failing_one(small_catalog, tmp_path):
    live = tmp_path / "live"
    run_embed(EmbedConfig(catalog=str(small_catalog.manifest_path), out=str(live),
                          encoder=EncoderConfig(model="chroma-stats"), workers=1), Console(quiet=True))
    runs = TableStore(str(live)).read(RUNS).num_rows

    passed = _gate(small_catalog, live, tmp_path)
    assert passed.returncode == 0, passed.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] and report["overlap"]["mean"] == 1.0
    assert TableStore(str(live)).read(RUNS).num_rows == runs + 1  # the promoting embed ran (nothing to re-embed)

    failed = _gate(small_catalog, live, tmp_path, MIN_OVERLAP="1.5")
    assert failed.returncode == 1, failed.stderr
    assert "gate failed: overlap" in failed.stderr
    assert TableStore(str(live)).read(RUNS).num_rows == runs + 1  # the live tables were left alone
