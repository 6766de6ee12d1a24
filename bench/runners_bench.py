"""Runner benchmark: the same demo catalog through every engine that runs on one machine, in one process run.

Measures end to end (`run_embed`: plan, engine start-up, decode, encode, write, commit) for

- the local runner with 2 decode workers: the reference every overhead is measured against;
- Beam's DirectRunner in this process (`--workers 1`) and with 2 SDK worker processes;
- Ray on a local instance with 1 and 2 CPU decode workers (one encoder actor), and with 2 of each: how Ray
  scales here, where a CPU encoder rather than decoding bounds the run.

Rounds interleave the runners, so that a machine whose load drifts (other jobs, thermal limits) affects them alike;
each figure is the median over rounds and every overhead compares runs of the same round. Every run writes a fresh
output root. Prints a table and writes bench/results/runners.json.

Ray gives each worker as many intra-op threads as CPUs it reserved (one), while the local runner and Beam let
torch use every core. On a busy machine that alone changes the encoder's speed severalfold, so compare engines
with the same thread count: `OMP_NUM_THREADS=1` pins it for every process of every runner (it is recorded).

    OMP_NUM_THREADS=1 python bench/runners_bench.py [--tracks 48] [--duration 30] [--rounds 3] [--case LABEL] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from harness import BenchRun, console, parse_args, print_table, results_path
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.runners.options import RayOptions
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog

# (label, runner, decode workers, encoder actors)
CASES = (
    ("local, 2 workers", "local", 2, 1),
    ("beam direct, in process", "beam", 1, 1),
    ("beam direct, 2 workers", "beam", 2, 1),
    ("ray, 1 CPU worker", "ray", 1, 1),
    ("ray, 2 CPU workers", "ray", 2, 1),
    ("ray, 2 CPU workers, 2 encoder actors", "ray", 2, 2),
)
REFERENCE = CASES[0][0]
# One case per engine, once, on a catalog of two good tracks and one file of each broken kind (the demo's 6).
SMOKE = {"tracks": 8, "duration": 2.0, "rounds": 1, "case": ["beam direct, in process", "ray, 1 CPU worker"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=48, help="demo catalog rows (the full demo has 240)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per track (the demo's 30)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--case", action="append", choices=[label for label, *_ in CASES],
                        help=f"a case to run, repeatable (default: all; {REFERENCE!r}, the reference, always runs)")
    args = parse_args(parser, SMOKE)
    cases = [case for case in CASES if case[0] == REFERENCE or args.case is None or case[0] in args.case]
    run = BenchRun("runners", args)
    work = Path(tempfile.mkdtemp(prefix="runners-bench-"))
    demo = DemoCatalogConfig(n_tracks=args.tracks, duration_s=args.duration)
    console.print(f"rendering {demo.n_tracks} x {demo.duration_s:g} s demo tracks ({demo.n_broken} broken) in {work}")
    catalog = render_demo_catalog(work / "catalog", demo, workers=2)
    quiet = Console(quiet=True)
    runs: dict[str, list[dict]] = {label: [] for label, *_ in cases}
    for round_ in range(args.rounds):
        for label, runner, workers, actors in cases:
            config = EmbedConfig(
                catalog=str(catalog.manifest_path),
                out=str(work / f"tables-{round_}-{runner}-{workers}-{actors}"),
                runner=runner,
                workers=workers,
                shard_size=args.shard_size,
                ray=RayOptions(embed_actors=actors) if runner == "ray" else RayOptions(),
            )
            summary = run_embed(config, quiet)
            runs[label].append(
                {
                    "wall_s": summary.wall_seconds,
                    "audio_s": summary.stats.audio_seconds,
                    "n_embedded": summary.stats.n_embedded,
                    "n_failed": summary.stats.n_failed,
                    "stage_seconds": summary.stats.stage_seconds,
                }
            )
            console.print(f"round {round_ + 1}: {label}: {summary.wall_seconds:.1f} s")

    rows = []
    for label, runner, workers, actors in cases:
        done = runs[label]
        wall = statistics.median(r["wall_s"] for r in done)
        audio = done[0]["audio_s"]
        overheads = [r["wall_s"] / ref["wall_s"] for r, ref in zip(done, runs[REFERENCE], strict=True)]
        rows.append(
            {
                "runner": label,
                "engine": runner,
                "workers": workers,
                "encoder_actors": actors,
                "wall_s": wall,
                "x_real_time": audio / wall,
                "tracks_per_s": (done[0]["n_embedded"] + done[0]["n_failed"]) / wall,
                "vs_local": statistics.median(overheads),
                "walls_s": [r["wall_s"] for r in done],
                "n_embedded": done[0]["n_embedded"],
                "n_failed": done[0]["n_failed"],
                "stage_seconds": [r["stage_seconds"] for r in done],
            }
        )
    by_label = {row["runner"]: row for row in rows}
    ray_scaling = {
        label: by_label["ray, 1 CPU worker"]["wall_s"] / by_label[label]["wall_s"]
        for label in ("ray, 2 CPU workers", "ray, 2 CPU workers, 2 encoder actors")
        if {label, "ray, 1 CPU worker"} <= by_label.keys()  # both cases ran (see --case)
    }

    print_table(
        f"runners on {demo.n_tracks} x {demo.duration_s:g} s demo tracks, median of {args.rounds}",
        ("runner", "wall s", "x real time", "tracks/s", "wall vs local"),
        ((row["runner"], f"{row['wall_s']:.1f}", f"{row['x_real_time']:.1f}", f"{row['tracks_per_s']:.2f}",
          f"{row['vs_local']:.2f}x") for row in rows),
    )  # fmt: skip
    for label, speedup in ray_scaling.items():
        console.print(f"ray speed-up over 1 CPU worker, {label}: {speedup:.2f}x")

    results = {
        "catalog": {"tracks": demo.n_tracks, "duration_s": demo.duration_s, "broken": demo.n_broken},
        "rounds": args.rounds,
        "shard_size": args.shard_size,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "runners": rows,
        "ray_speedup_over_1_worker": ray_scaling,
    }
    console.print(f"wrote {run.write(results_path('runners'), results)}")


if __name__ == "__main__":
    main()
