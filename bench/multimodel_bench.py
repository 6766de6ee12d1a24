"""Several encoders per decode: one run with `--model a,b,c` against three runs of one encoder each, same catalog.

Each round runs both, interleaved (the order alternates between rounds), every run into a fresh output root, on
the local runner. Reports the medians over rounds of the wall time and of the decode stage's seconds (summed over
decode workers: the CPU time the decode costs), and what one decode for three encoders saves. Prints a table and
writes bench/results/multimodel.json.

    python bench/multimodel_bench.py [--tracks 24] [--duration 30] [--rounds 3] [--models mfcc-stats,chroma-stats,musicnn-msd]
        [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from harness import BenchRun, console, parse_args, print_table, results_path
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import RunSummary, run_embed
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.stages import EncoderConfig

# Both cases once, on two tracks, with the two cheapest encoders (several encoders per decode all the same).
SMOKE = {"tracks": 2, "duration": 2.0, "rounds": 1, "models": "mfcc-stats,chroma-stats"}


def _measure(config: EmbedConfig, models: list[str], together: bool) -> dict[str, float]:
    """Wall and decode seconds of the models' runs: one run of all of them, or one run each (summed)."""
    quiet = Console(quiet=True)
    groups = [",".join(models)] if together else models
    summaries: list[RunSummary] = [
        run_embed(replace(config, out=f"{config.out}-{i}", encoder=EncoderConfig(model=group)), quiet)
        for i, group in enumerate(groups)
    ]
    return {
        "wall_s": sum(s.wall_seconds for s in summaries),
        "decode_s": sum(s.stats.stage_seconds.get("decode", 0.0) for s in summaries),
        "encode_s": sum(s.stats.stage_seconds.get("encode", 0.0) for s in summaries),
        "audio_s": sum(s.stats.audio_seconds for s in summaries),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=24, help="demo catalog rows")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per track")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="mfcc-stats,chroma-stats,musicnn-msd")
    args = parse_args(parser, SMOKE)
    models = args.models.split(",")
    run = BenchRun("multimodel", args)
    work = Path(tempfile.mkdtemp(prefix="multimodel-bench-"))
    demo = DemoCatalogConfig(n_tracks=args.tracks, duration_s=args.duration, n_broken=0)  # decode work, not faults
    console.print(f"rendering {demo.n_tracks} x {demo.duration_s:g} s demo tracks in {work}")
    catalog = render_demo_catalog(work / "catalog", demo, workers=2)
    cases = {"one run, --model " + args.models: True, f"{len(models)} runs, one encoder each": False}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in cases}
    load = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        order = list(cases.items()) if round_ % 2 == 0 else list(reversed(cases.items()))
        for label, together in order:
            config = EmbedConfig(catalog=str(catalog.manifest_path), out=str(work / f"out-{round_}-{together}"))
            runs[label].append(_measure(config, models, together))
            load.append(os.getloadavg()[0])
            console.print(f"round {round_ + 1}: {label}: {runs[label][-1]['wall_s']:.1f} s wall")

    medians = {label: {k: statistics.median(r[k] for r in done) for k in done[0]} for label, done in runs.items()}
    (one, several) = cases
    saved = {
        "decode_s_saved": medians[several]["decode_s"] - medians[one]["decode_s"],
        "wall_ratio": statistics.median(
            s["wall_s"] / o["wall_s"] for o, s in zip(runs[one], runs[several], strict=True)
        ),
        "decode_ratio": statistics.median(
            s["decode_s"] / o["decode_s"] for o, s in zip(runs[one], runs[several], strict=True)
        ),
    }
    print_table(
        f"{len(models)} encoders on {demo.n_tracks} x {demo.duration_s:g} s demo tracks, "
        f"median of {args.rounds}, load {statistics.median(load):.1f}",
        ("case", "wall s", "decode s", "encode s"),
        ((label, f"{row['wall_s']:.1f}", f"{row['decode_s']:.1f}", f"{row['encode_s']:.1f}")
         for label, row in medians.items()),
    )  # fmt: skip
    console.print(
        f"decode seconds saved: {saved['decode_s_saved']:.1f} ({saved['decode_ratio']:.2f}x less decoding); "
        f"wall: {saved['wall_ratio']:.2f}x faster in one run"
    )
    results = {
        "catalog": {"tracks": demo.n_tracks, "duration_s": demo.duration_s, "broken": demo.n_broken},
        "models": models,
        "rounds": args.rounds,
        "load_average": load,
        "medians": medians,
        "runs": runs,
        **saved,
    }
    console.print(f"wrote {run.write(results_path('multimodel'), results)}")


if __name__ == "__main__":
    main()
