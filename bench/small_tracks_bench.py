"""Many small tracks: the per-track cost outside decoding and encoding, against the rate of bare decoding.

Renders `--tracks` one-second clips (`workers/demo_catalog.py`, 44.1 kHz stereo, mp3, Opus, FLAC and WAV in turn)
once into `--work` (reused by later runs), then measures in one process run:

- decode only: bare PyAV + soxr HQ to the encoder's rate (22.05 kHz mono for `mfcc-stats`), no pipeline, in this
  process on one core: CPU seconds per clip, so clips/s per core (times the cores for what decoding alone allows);
- the local runner end to end (`run_embed`: plan, decode children, `mfcc-stats`, part files, commit), `--workers 2`;
- the Ray runner end to end on a local instance (2 decode workers, one encoder actor; `ray.init` included).

Rounds interleave the cases so that a shared machine's drifting load weighs on each alike; each figure is the median
over rounds. Prints tracks/s next to the decode-only rate and writes bench/results/small_tracks[-LABEL].json.

To compare two trees of the code in one bench run, alternate this script between them (the script itself only uses
`run_embed`, `EmbedConfig` and `decode`, which both have), e.g. with a baseline tree importable first on PYTHONPATH:

    python bench/small_tracks_bench.py --tracks 2000 --rounds 1 --label after
    PYTHONPATH=/tmp/base-shim python bench/small_tracks_bench.py --tracks 2000 --rounds 1 --label before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

import catalog_embed.workers
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.runners.options import RayOptions
from catalog_embed.workers.audio import decode
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.stages import EncoderConfig

RESULTS = Path(__file__).parent / "results"
MODEL = "mfcc-stats"
RATE = 22_050  # mfcc-stats' front end
CODECS = ("mp3", "opus", "flac", "wav")
WORKERS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/small-tracks-bench"), help="clips and tables")
    parser.add_argument("--cases", default="decode,local,ray", help="comma-separated subset of decode,local,ray")
    parser.add_argument("--label", default="", help="names the JSON (small_tracks-LABEL.json) and the rows")
    args = parser.parse_args()
    console = Console()
    manifest = _clips(args.work / f"clips-{args.tracks}", args.tracks, console)
    uris = pq.read_table(manifest, columns=["uri"])["uri"].to_pylist()
    cases = args.cases.split(",")
    runs: dict[str, list[float]] = {case: [] for case in cases}
    for round_ in range(args.rounds):
        for case in cases:
            if case == "decode":
                runs[case].append(_decode_only(uris))
            else:
                out = args.work / f"tables-{os.getpid()}-{round_}-{case}"
                runs[case].append(_end_to_end(manifest, out, case))
            console.print(f"round {round_ + 1} {case}: {runs[case][-1]:.1f} tracks/s")
    result = {
        "label": args.label,
        "code": str(Path(catalog_embed.workers.__path__[0]).parent),
        "tracks": args.tracks,
        "codecs": CODECS,
        "model": MODEL,
        "workers": WORKERS,
        "rounds": args.rounds,
        "tracks_per_s": {case: statistics.median(rates) for case, rates in runs.items()},
        "runs": runs,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "at": datetime.now(UTC).isoformat(),
    }
    _print(result, console)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"small_tracks{'-' + args.label if args.label else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {path}")


def _clips(root: Path, n: int, console: Console) -> Path:
    """The manifest of `n` rendered one-second clips under `root`, rendering them on the first run."""
    manifest = root / "manifest.parquet"
    if not manifest.exists():
        console.print(f"rendering {n} one-second clips in {root}")
        config = DemoCatalogConfig(n_tracks=n, duration_s=1.0, codecs=CODECS, n_broken=0)
        render_demo_catalog(root, config, workers=WORKERS)
    return manifest


def _decode_only(uris: list[str]) -> float:
    """Clips per second of CPU time on one core: bare decode, downmix and soxr HQ resample, no pipeline."""
    start = time.process_time()
    for uri in uris:
        with open(uri, "rb") as fh:
            decode(fh, RATE)
    return len(uris) / (time.process_time() - start)


def _end_to_end(manifest: Path, out: Path, runner: str) -> float:
    """Tracks per wall second of one `run_embed` on a fresh output root."""
    config = EmbedConfig(
        catalog=str(manifest),
        out=str(out),
        encoder=EncoderConfig(model=MODEL),
        runner=runner,
        workers=WORKERS,
        ray=RayOptions(embed_actors=1),
    )
    summary = run_embed(config, Console(quiet=True))
    done = summary.stats.n_embedded + summary.stats.n_failed
    if summary.stats.n_failed:
        msg = f"{runner}: {summary.stats.n_failed} clips failed: {summary.stats.first_errors}"
        raise RuntimeError(msg)
    return done / summary.wall_seconds


def _print(result: dict, console: Console) -> None:
    rates = result["tracks_per_s"]
    table = Table(title=f"{result['tracks']} one-second clips, {MODEL}, {WORKERS} workers ({result['label'] or 'this tree'})")
    table.add_column("case")
    table.add_column("tracks/s", justify="right")
    table.add_column("x decode-only on 2 cores", justify="right")
    decode_rate = rates.get("decode")
    for case, rate in rates.items():
        label = "decode only, 1 core" if case == "decode" else f"{case} runner, end to end"
        share = f"{rate / (WORKERS * decode_rate):.2f}" if decode_rate and case != "decode" else ""
        table.add_row(label, f"{rate:.1f}", share)
    console.print(table)
    console.print(f"load average {result['load_average']}, {result['cpus']} CPUs (shared machine)")


if __name__ == "__main__":
    main()
