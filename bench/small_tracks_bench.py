"""Many small tracks: the per-track cost outside decoding and encoding, against the rate of bare decoding.

Renders `--tracks` one-second clips (`workers/demo_catalog.py`, 44.1 kHz stereo, mp3, Opus, FLAC and WAV in turn)
once into `--work` (reused by later runs), then measures in one run, the cases taking turns round by round:

- decode only: bare PyAV + soxr HQ to the encoder's rate (22.05 kHz mono for `mfcc-stats`), no pipeline, in this
  process on one core: CPU seconds per clip, so clips/s per core (times the cores for what decoding alone allows);
- the local runner end to end (`run_embed`: plan, decode children, `mfcc-stats`, part files, commit), `--workers 2`;
- the Ray runner end to end on a local instance (2 decode workers, one encoder actor; `ray.init` included).

The last column puts the cases on one scale, milliseconds of one core per track: decoding's CPU time, and a runner's
2 cores times its marginal seconds per track (decoding, encoding and everything else a track costs).

Each end-to-end case runs twice per round, on the first half of the clips and on all of them, each into a fresh
output root. A run's tracks/s includes what a run costs once (starting the decode children or Ray, loading the
encoder, planning, the commit); the difference between the two runs cancels those and leaves the per-track rate,
`marginal` = (tracks - tracks/2) / (seconds(all) - seconds(half)): the rate a long run of such clips approaches.
Prints tracks/s next to the decode-only rate and writes bench/results/small_tracks.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
from harness import BenchRun, console, parse_args, print_table, results_path, time_rounds
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.runners.options import RayOptions
from catalog_embed.workers.audio import decode
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.stages import EncoderConfig

MODEL = "mfcc-stats"
RATE = 22_050  # mfcc-stats' front end
CODECS = ("mp3", "opus", "flac", "wav")
WORKERS = 2
SMOKE = {"tracks": 16, "rounds": 1, "cases": "decode,local"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/small-tracks-bench"), help="clips and tables")
    parser.add_argument("--cases", default="decode,local,ray", help="comma-separated subset of decode,local,ray")
    args = parse_args(parser, SMOKE)
    run = BenchRun("small_tracks", args)
    full = _clips(args.work / f"clips-{args.tracks}", args.tracks)
    half = _half(full)
    n_full, n_half = pq.read_metadata(full).num_rows, pq.read_metadata(half).num_rows
    uris = pq.read_table(full, columns=["uri"])["uri"].to_pylist()
    cases = args.cases.split(",")
    runners = [case for case in cases if case != "decode"]
    calls = {(runner, size): partial(_run, manifest, args.work, runner)
             for runner in runners for size, manifest in (("half", half), ("all", full))}  # fmt: skip
    decode_rates = []
    if "decode" in cases:
        calls["decode", "all"] = lambda: decode_rates.append(_decode_only(uris))
    timings = time_rounds(calls, args.rounds)
    results: dict[str, object] = {"tracks": n_full, "codecs": CODECS, "model": MODEL, "workers": WORKERS}
    rows = []
    decode_rate = statistics.median(decode_rates) if decode_rates else None
    if decode_rate:
        results["decode_clips_per_s_per_core"] = decode_rate
        rows.append(("decode only, clips/s of one core's CPU time", decode_rate, None, None, 1000 / decode_rate))
    for runner in runners:
        wall_half, wall_all = (timings[runner, size].median_wall for size in ("half", "all"))
        whole = n_full / wall_all
        marginal = (n_full - n_half) / (wall_all - wall_half) if wall_all > wall_half else None
        results[runner] = {"seconds_half": wall_half, "seconds_all": wall_all, "tracks_per_s": whole,
                           "marginal_tracks_per_s": marginal, "once_per_run_s": wall_all - n_full / marginal
                           if marginal else None}  # fmt: skip
        share = marginal / (WORKERS * decode_rate) if marginal and decode_rate else None
        rows.append((f"{runner} runner, end to end", whole, marginal, share, 2000 / marginal if marginal else None))
    print_table(
        f"{n_full} one-second clips, {MODEL}, {WORKERS} workers, {args.rounds} round(s)",
        ["case", "tracks/s (whole run)", "marginal tracks/s", "marginal x decode-only on 2 cores",
         "core-ms per track"],
        rows,
    )  # fmt: skip
    console.print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs")
    console.print(f"wrote {run.write(results_path('small_tracks'), results)}")


def _clips(root: Path, n: int) -> Path:
    """The manifest of `n` rendered one-second clips under `root`, rendering them on the first run."""
    manifest = root / "manifest.parquet"
    if not manifest.exists():
        console.print(f"rendering {n} one-second clips in {root}")
        config = DemoCatalogConfig(n_tracks=n, duration_s=1.0, codecs=CODECS, n_broken=0)
        render_demo_catalog(root, config, workers=WORKERS)
    return manifest


def _half(manifest: Path) -> Path:
    """A manifest of the first half of `manifest`'s rows (every codec still present: they take turns)."""
    half = manifest.with_name("manifest-half.parquet")
    if not half.exists():
        table = pq.read_table(manifest)
        pq.write_table(table.slice(0, len(table) // 2), half)
    return half


def _decode_only(uris: list[str]) -> float:
    """Clips per second of CPU time on one core: bare decode, downmix and soxr HQ resample, no pipeline."""
    start = os.times()
    for uri in uris:
        with open(uri, "rb") as fh:
            decode(fh, RATE)
    end = os.times()
    return len(uris) / (end.user + end.system - start.user - start.system)


_RUNS = itertools.count()  # numbers each run's output folder


def _run(manifest: Path, work: Path, runner: str) -> None:
    """One `run_embed` of `manifest` with `runner` into a fresh output root; every clip must embed."""
    out = work / f"tables-{os.getpid()}-{next(_RUNS)}-{runner}"
    config = EmbedConfig(
        catalog=str(manifest),
        out=str(out),
        encoder=EncoderConfig(model=MODEL),
        runner=runner,
        workers=WORKERS,
        ray=RayOptions(embed_actors=1),
    )
    summary = run_embed(config, Console(quiet=True))
    shutil.rmtree(out)
    if summary.stats.n_failed:
        msg = f"{runner}: {summary.stats.n_failed} clips failed: {summary.stats.first_errors}"
        raise RuntimeError(msg)


if __name__ == "__main__":
    main()
