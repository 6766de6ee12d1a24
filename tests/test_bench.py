"""Every bench runs at its smallest size (`--smoke`): it exits 0, prints its table and writes its JSON with the
harness's record of the run and its own result keys. Behaviour only: a benchmark measures, a test never times.

Each bench runs as the README runs it, `python bench/<name>.py`, in a subprocess, its JSON sent to a temporary folder
(`CATALOG_EMBED_BENCH_RESULTS`) so that a real measurement in bench/results/ is never overwritten.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.probe_fixtures import embeddings_rows, labels_for, latent, write_embeddings

ROOT = Path(__file__).resolve().parents[1]
META = {"bench", "command", "args", "started_at", "finished_at", "machine", "git", "python", "packages"}
MACHINE = {"cpu_model", "cores", "memory_gib", "load_average_start", "load_average_end", "gpus"}

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Bench:
    """One bench's smoke run and what it must leave behind."""

    script: str
    argv: tuple[str, ...]
    json_glob: str
    heading: str  # a column of its table
    keys: frozenset[str]  # its own top-level JSON keys


BENCHES = [
    Bench("ann_bench.py", ("--smoke",), "ann_bench-*.json", "recall@10", frozenset({"rows", "skipped"})),
    Bench("decode_bench.py", ("--smoke",), "decode_bench.json", "mp3 +resample", frozenset({"core", "results"})),
    Bench("embed_bench.py", ("--smoke",), "embed_bench.json", "vs naive", frozenset({"windows", "results"})),
    Bench("encoders_bench.py", ("--smoke",), "encoders.json", "windows/s", frozenset({"device", "rows"})),
    # Its GPU sections are checked by bench/device_check.sh on a lent GPU; Ray's run is left to runners_bench.
    Bench("gpu_bench.py", ("--device", "cpu", "--smoke"), "gpu_bench-cpu.json", "measure",
          frozenset({"device", "encoder", "decode", "end_to_end"})),
    Bench("multimodel_bench.py", ("--smoke",), "multimodel.json", "decode s",
          frozenset({"medians", "runs", "decode_s_saved", "wall_ratio", "decode_ratio"})),
    Bench("probe_bench.py", ("--smoke",), "probe_bench.json", "test ROC-AUC",
          frozenset({"load_seconds", "single_trials", "grid"})),
    Bench("runners_bench.py", ("--smoke",), "runners.json", "wall vs local",
          frozenset({"runners", "ray_speedup_over_1_worker"})),
    # Local and S3 (moto) catalogs of a few hundred rows.
    Bench("scale_bench.py", ("--smoke",), "scale_bench.json", "peak RSS MB", frozenset({"results"})),
    Bench("small_tracks_bench.py", ("--smoke",), "small_tracks.json", "marginal tracks/s",
          frozenset({"tracks", "decode_clips_per_s_per_core", "local"})),
    Bench("table_scale_bench.py", ("--smoke",), "table_scale.json", "peak RSS MB",
          frozenset({"rows", "dim", "staged_bytes", "steps", "live_rows"})),
    # store_faults_bench.py is left out: even its smoke (each phase once) runs the command line in some ten
    # processes, minutes; tests/objectstore/test_store_faults.py covers its behaviour.
    Bench("year_bench.py", ("--smoke",), "year.json", "written/table",
          frozenset({"night_kinds", "year", "night_one_vs_last"})),
]  # fmt: skip


def run_bench(script: str, *argv: str, results: Path) -> str:
    """`python bench/<script> argv...` from the repository root; returns what it printed, asserting it exited 0."""
    env = {**os.environ, "CATALOG_EMBED_BENCH_RESULTS": str(results)}
    done = subprocess.run([sys.executable, f"bench/{script}", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def assert_meta(document: dict, bench: str) -> None:
    """The harness's record: its keys, the machine's, the git state's and our own package's version."""
    meta = document["meta"]
    assert META <= meta.keys()
    assert MACHINE <= meta["machine"].keys()
    assert meta["bench"] == bench
    assert {"commit", "dirty"} <= meta["git"].keys()
    assert "catalog-embed" in meta["packages"]


@pytest.mark.parametrize("bench", BENCHES, ids=lambda b: b.script.removesuffix(".py"))
def test_bench_smoke(bench, tmp_path):
    out = run_bench(bench.script, *bench.argv, results=tmp_path)
    assert bench.heading in out
    [path] = tmp_path.glob(bench.json_glob)
    document = json.loads(path.read_text())
    assert_meta(document, bench.script.removesuffix("_bench.py"))
    assert document["meta"]["command"][-len(bench.argv) :] == list(bench.argv)
    assert document["meta"]["args"]["smoke"] is True
    assert bench.keys <= document.keys()


def test_reliability_smoke(tmp_path):
    """At its smallest size the reliability bench still kills a worker and the driver, and the resumed run loses
    and duplicates nothing; its cases (stalled commit, edited catalog, damaged tables, hostile --where) hold too."""
    out = run_bench("reliability_bench.py", "--smoke", results=tmp_path)
    assert "target" in out
    report = json.loads((tmp_path / "reliability.json").read_text())
    assert_meta(report, "reliability")
    assert report["resumed"] is True
    assert (report["lost"], report["duplicates"], report["job_failures"]) == (0, 0, 0)
    assert report["every invariant held"] is True, report


def test_probe_demo(tmp_path):
    """`make probe-demo`'s script on generated tables shaped like the demo catalog's (one model, its three tasks;
    no split column: a seeded split stratified by class keeps every key in the training split)."""
    n = 240
    z = latent(n)
    write_embeddings(tmp_path / "tables" / "embeddings", embeddings_rows(z, model="toy", dim=16))
    labels = pa.table(
        {
            "track_id": labels_for("multiclass", z)["track_id"],
            "instrument_family": labels_for("multiclass", z)["genre"],
            "key": labels_for("key", z)["key"],
            "tempo": labels_for("regression", z)["arousal"],
        }
    )
    pq.write_table(labels, tmp_path / "labels.parquet")
    out = run_bench("probe_demo.py", "--tables", str(tmp_path / "tables"), "--labels", str(tmp_path / "labels.parquet"),
                    "--out", str(tmp_path / "probes"), "--smoke", results=tmp_path)  # fmt: skip
    assert "toy" in out
    assert (tmp_path / "probes" / "results.md").read_text() in out
    document = json.loads((tmp_path / "probes" / "results.json").read_text())
    assert_meta(document, "probe_demo")
    assert {(p["model"], p["task"]) for p in document["probes"]} == {("toy", t) for t in ("instrument", "key", "tempo")}
