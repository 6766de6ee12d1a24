"""An object store that fails: the embed job and the table readers against moto's S3 server behind the fault proxy
(`tests/helpers/fault_proxy.py`: 503 SlowDown, connection resets, responses cut after the server applied the
request, stalls past the client's timeout).

For each phase (audio reads, staging writes, the commit, table reads) and rate (1%, 10%, 50% of the phase's
requests), on a fresh output prefix:
1. runs the command with the faults on; it must succeed, or end with exit 75 and a one-line error (no traceback);
2. turns the faults off and, when the first run did not succeed, runs it again: it must succeed;
3. checks the tables: every good track embedded exactly once, a failures row for each broken file and no other.

For table reads the tables are committed first without faults, then `query`, `similar` and `probe` run with them.

Prints the matrix and writes bench/results/store_faults.json (again after every cell, so a long run keeps what it
measured). Asserts its invariants (exit status 1 when one fails).

    python bench/store_faults_bench.py [--rates 0.01,0.1,0.5] [--phases audio,staging,commit,tables] [--seed 0]
        [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import s3fs
from harness import BenchRun, console, parse_args, print_table, results_path

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from tests.helpers.fault_proxy import AUDIO_READS, COMMITS, STAGING_WRITES, TABLE_READS, FaultProxy, FaultRule
from tests.helpers.store_faults import Finished, embed, run_cli, storage_flags
from tests.objectstore.conftest import BUCKET, _moto_server, _upload_catalog

PHASES = {"audio": AUDIO_READS, "staging": STAGING_WRITES, "commit": COMMITS, "tables": TABLE_READS}
STALL_S = 5.0
# Every phase once, at a rate that faults half its requests (minutes all the same: each cell runs the command line
# in processes of its own, and a stall costs the client's timeout).
SMOKE = {"rates": "0.5"}


def _tables(endpoint: str, out: str) -> tuple[list[str], list[str]]:
    con = connect(out, {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"})
    embedded = [r[0] for r in con.execute("SELECT track_id FROM embeddings WHERE NOT deleted ORDER BY 1").fetchall()]
    failed = [r[0] for r in con.execute("SELECT track_id FROM failures ORDER BY 1").fetchall()]
    return embedded, failed


def _clean(finished: Finished) -> bool:
    """Succeeded, or ended resumable with one line and no traceback."""
    if "Traceback" in finished.output:
        return False
    return finished.code == 0 or (finished.code == 75 and finished.last_line.startswith("catalog-embed: error:"))


def _readers(endpoint: str, out: str, labels: Path, probe_out: Path) -> list[Finished]:
    flags = storage_flags(endpoint)
    return [
        run_cli(endpoint, "query", "--out", out, "--json", "SELECT count(*) AS n FROM embeddings", *flags),
        run_cli(endpoint, "similar", "--out", out, "--track", "demo-0003", "--k", "3", *flags),
        run_cli(endpoint, "probe", "--embeddings", out, "--labels", str(labels), "--task", "mode",
                "--kind", "multiclass", "--out", str(probe_out), "--max-epochs", "2", *flags),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.01,0.1,0.5")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, SMOKE)
    run = BenchRun("store_faults", args)
    rates = [float(r) for r in args.rates.split(",")]
    phases = args.phases.split(",")
    # This process reads the tables straight from the server (no proxy) to check them.
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    work = Path(tempfile.mkdtemp(prefix="store-faults-"))
    catalog = render_demo_catalog(work / "catalog", DemoCatalogConfig(n_tracks=18, duration_s=4.0, n_broken=6, seed=7))
    labels = pq.read_table(catalog.labels_path).to_pylist()
    good = sorted(la["track_id"] for la in labels if la["broken"] is None)
    bad = sorted(la["track_id"] for la in labels if la["broken"] is not None)
    probe_labels = work / "labels.csv"
    pacsv.write_csv(pq.read_table(catalog.labels_path).select(["track_id", "mode"]), probe_labels)
    rows, ok = [], True
    with _moto_server(work / "moto.log") as upstream:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(endpoint_url=upstream)
        fs.mkdir(BUCKET)
        bucket = _upload_catalog(fs, "s3", upstream, catalog)
        for cell, (phase, rate) in enumerate((p, r) for p in phases for r in rates):
            out = f"s3://{BUCKET}/{phase}-{int(rate * 100)}"
            with FaultProxy(upstream, seed=args.seed + cell, stall_s=STALL_S) as proxy:
                start = time.perf_counter()
                if phase == "tables":
                    setup = embed(proxy.endpoint, bucket.manifest, out)
                    assert setup.code == 0, setup.output[-2000:]
                proxy.set_rules(FaultRule(rate, **PHASES[phase]))
                if phase == "tables":
                    first = _readers(proxy.endpoint, out, probe_labels, work / f"probe-{rate}")
                else:
                    first = [embed(proxy.endpoint, bucket.manifest, out)]
                injected, matched = dict(proxy.injected), proxy.matched
                proxy.set_rules()
                again: list[Finished] = []
                if any(f.code != 0 for f in first):
                    again = (
                        _readers(proxy.endpoint, out, probe_labels, work / f"probe-{rate}-again")
                        if phase == "tables"
                        else [embed(proxy.endpoint, bucket.manifest, out)]
                    )
                seconds = time.perf_counter() - start
            embedded, failed = _tables(upstream, out)
            exact = embedded == good and failed == bad
            clean = all(_clean(f) for f in first) and all(f.code == 0 for f in again)
            ok &= exact and clean
            rows.append({
                "phase": phase, "rate": rate, "matched": matched, "injected": injected,
                "first": [f.code for f in first], "rerun": [f.code for f in again],
                "errors": [f.last_line for f in first if f.code != 0],
            "error_causes": [f.output.strip().splitlines()[-12:] for f in first if f.code != 0],
                "exactly_once": exact, "clean": clean, "seconds": round(seconds, 1),
                "tracebacks": sum("Traceback" in f.output for f in first + again),
            })
            print(json.dumps(rows[-1]), flush=True)
            run.write(results_path("store_faults"), {"cells": rows, "every invariant held": ok})
    print_table(
        "store faults: moto behind the fault proxy (18 tracks, 6 broken, mfcc-stats)",
        ("phase", "rate", "requests", "injected", "first exit", "rerun exit", "exactly once", "clean", "s"),
        ((r["phase"], f"{r['rate']:.0%}", str(r["matched"]),
          ", ".join(f"{k} {v}" for k, v in sorted(r["injected"].items())) or "-", str(r["first"]),
          str(r["rerun"] or "-"), str(r["exactly_once"]), str(r["clean"]), f"{r['seconds']:.0f}") for r in rows),
    )  # fmt: skip
    console.print(f"every invariant held: {ok}; wrote {results_path('store_faults')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
