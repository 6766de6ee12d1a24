"""Scale benchmark: `catalog-embed plan` on catalogs of 100,000 and 1,000,000 rows, local and on S3 (moto).

Each catalog is a Parquet manifest of distinct paths to real audio: a few thousand one-second WAV clips, each
hard-linked under many names (hard links, not symlinks: the URI policy resolves symlinks, and a catalog of
symlinks would measure that instead). The S3 catalog holds one object per row in a bucket of moto's server,
started here on a free loopback port.

Every measurement runs the command line in a subprocess (`python -m catalog_embed.pipelines.cli plan`), as users
run it, and reads its CPU time and peak RSS from the kernel (`os.wait4`). `--python LABEL=PATH` (repeatable)
names the interpreters to compare, e.g. main's virtual environment against this branch's; on each catalog they
take turns, run by run, so that every figure of one table comes from the same session of the machine; the load
average is recorded next to them. Figures are medians over the runs (peak RSS: the largest).

    python bench/scale_bench.py [--rows 100000 1000000] [--s3-rows 100000] [--repeat 3]
        [--python main=/work/main/.venv/bin/python --python branch=.venv/bin/python] [--data /tmp/scale-bench] [--smoke]

Prints a table and writes bench/results/scale_bench.json (after every row, so a long run keeps what it measured).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import sys
import tempfile
import wave
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from harness import BenchRun, console, parse_args, print_table, results_path, run_process, time_rounds

BUCKET = "scale-bench"
# One small local and one small S3 catalog, each planned once; a fresh --data folder (None), not the shared cache.
SMOKE = {"rows": [200], "s3_rows": [100], "sources": 4, "repeat": 1, "data": None}
# Files per folder: catalogs group tracks by album or label, not one flat folder of a million files.
_PER_FOLDER = 1000


def _clip(seconds: float, rate: int, seed: int) -> bytes:
    """A real WAV clip: a tone whose pitch depends on `seed`, so that the clips differ."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * (110 + seed % 880) * t) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())
    return out.getvalue()


def _relative_path(i: int) -> str:
    return f"audio/{i // _PER_FOLDER:05d}/track-{i:07d}.wav"


def _manifest(n_rows: int, uri_of) -> pa.Table:
    ids = [f"track-{i:07d}" for i in range(n_rows)]
    return pa.table({"track_id": ids, "uri": [uri_of(i) for i in range(n_rows)]})


def local_catalog(root: Path, n_rows: int, n_sources: int) -> Path:
    """A manifest of `n_rows` distinct local paths (relative to the manifest), hard links to `n_sources` clips."""
    manifest = root / f"manifest-{n_rows}.parquet"
    if manifest.exists():
        return manifest
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    for s in range(n_sources):
        source = sources / f"{s:05d}.wav"
        if not source.exists():
            source.write_bytes(_clip(1.0, 16000, s))
    for i in range(n_rows):
        path = root / _relative_path(i)
        if i % _PER_FOLDER == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.link(sources / f"{i % n_sources:05d}.wav", path)
    pq.write_table(_manifest(n_rows, _relative_path), manifest)
    return manifest


def moto_env(endpoint: str) -> dict[str, str]:
    """The environment that points S3 clients at moto's server at `endpoint`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def s3_catalog(env: dict[str, str], n_rows: int, n_sources: int) -> str:
    """A bucket holding `n_rows` objects (copies of `n_sources` short clips) and a manifest of their URIs."""
    import s3fs  # only the S3 part needs it

    os.environ.update(env)
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    clips = [_clip(0.1, 8000, s) for s in range(n_sources)]
    batch = 2000
    for start in range(0, n_rows, batch):
        fs.pipe({f"{BUCKET}/{_relative_path(i)}": clips[i % n_sources] for i in range(start, min(n_rows, start + batch))})
    manifest = f"{BUCKET}/manifest-{n_rows}.parquet"
    with fs.open(manifest, "wb") as fh:
        pq.write_table(_manifest(n_rows, lambda i: f"s3://{BUCKET}/{_relative_path(i)}"), fh)
    return f"s3://{manifest}"


def measure(python: str, catalog: str, out: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """CPU seconds and peak RSS (MB) of one `plan` command, read from the kernel when the child exits, and the
    new tracks it counted (its wall time is the harness's)."""
    cmd = [python, "-m", "catalog_embed.pipelines.cli", "plan", "--catalog", catalog, "--out", str(out)]
    usage = run_process([*cmd, "--model", "mfcc-stats"], env)
    new = int(re.search(r"tracks in the catalog: (\d+) new", usage.stdout)[1])
    return {"cpu_s": usage.cpu_s, "peak_rss_mb": usage.peak_rss_mb, "new": new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--s3-rows", type=int, nargs="*", default=[100_000])
    parser.add_argument("--sources", type=int, default=2000, help="distinct audio clips behind the rows")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure below 1M rows (1M rows: once)")
    parser.add_argument("--python", action="append", default=[], metavar="LABEL=PATH", help="interpreter to measure")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "scale-bench",
                        help="where the local catalogs are made, and kept for the next run")
    args = parse_args(parser, SMOKE)
    run = BenchRun("scale", args)
    pythons = dict(p.split("=", 1) for p in args.python) or {"this": sys.executable}
    data = args.data or Path(tempfile.mkdtemp(prefix="scale-bench-data-"))
    out = Path(tempfile.mkdtemp(prefix="scale-bench-out-")) / "tables"  # no tables: every row is new
    results = []
    with ExitStack() as stack:
        cases: list[tuple[str, int, str, dict[str, str] | None]] = []
        for n_rows in args.rows:
            cases.append(("local", n_rows, str(local_catalog(data, n_rows, args.sources)), None))
        if args.s3_rows:
            from tests.objectstore.conftest import _moto_server  # only the S3 part needs it (and pytest, s3fs)

            log = Path(tempfile.mkdtemp(prefix="scale-bench-moto-")) / "moto.log"
            env = moto_env(stack.enter_context(_moto_server(log)))
            cases += [("s3", n_rows, s3_catalog(env, n_rows, args.sources), env) for n_rows in args.s3_rows]
        for where, n_rows, catalog, env in cases:
            runs: dict[str, list[dict[str, float]]] = {label: [] for label in pythons}
            calls = {
                label: lambda python=python, done=runs[label]: done.append(measure(python, catalog, out, env))
                for label, python in pythons.items()
            }
            timings = time_rounds(calls, 1 if n_rows >= 1_000_000 else args.repeat)
            assert all(r["new"] == n_rows for done in runs.values() for r in done), runs
            for label, python in pythons.items():
                results.append(
                    {
                        "catalog": where,
                        "rows": n_rows,
                        "code": label,
                        "python": python,
                        "runs": len(runs[label]),
                        "plan_s": timings[label].median_wall,
                        "cpu_s": statistics.median(r["cpu_s"] for r in runs[label]),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[label]),
                        "load_avg": os.getloadavg()[0],
                    }
                )
                row = results[-1]
                console.print(f"{where} {n_rows:,} {label}: plan {row['plan_s']:.1f} s")
            run.write(results_path("scale_bench"), {"results": results})
    print_table(
        "catalog-embed plan, every row new: medians (peak RSS: the largest)",
        ("catalog", "rows", "code", "plan s", "CPU s", "runs", "peak RSS MB", "load"),
        ((r["catalog"], f"{r['rows']:,}", r["code"], f"{r['plan_s']:.1f}", f"{r['cpu_s']:.1f}", str(r["runs"]),
          f"{r['peak_rss_mb']:.0f}", f"{r['load_avg']:.1f}") for r in results),
        left=3,
    )  # fmt: skip
    console.print(f"wrote {results_path('scale_bench')}")


if __name__ == "__main__":
    main()
