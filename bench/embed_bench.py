"""End-to-end embed benchmark: per-stage throughput and the local runner against a naive baseline.

Renders a demo catalog, then measures, in one process run so every figure shares the machine's state:

- each stage alone (decode, front end, encoder, write) in audio seconds per wall second, and the encoder in
  windows per second;
- the naive baseline: one file at a time, one model call per track, no batching across tracks, no worker pool;
- the local runner end to end with 1 and 2 decode workers.

Each measurement is repeated and the median reported. Prints a table and writes bench/results/embed_bench.json.

    python bench/embed_bench.py [--tracks 40] [--duration 30] [--repeat 3] [--model musicnn-msd] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import torch
from harness import BenchRun, console, parse_args, print_table, results_path, time_rounds
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.embed.lifecycle.shards import write_shard
from catalog_embed.pipelines.io.catalog import fingerprints
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import WorkItem
from catalog_embed.workers.audio import load_audio
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.rows import RowContext
from catalog_embed.workers.shard import ShardOutput
from catalog_embed.workers.stages import EmbedStage, EncoderConfig, TrackFeatures

SMOKE = {"tracks": 2, "duration": 3.0, "repeat": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=40)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default="musicnn-msd")
    parser.add_argument("--batch-windows", type=int, default=64)
    args = parse_args(parser, SMOKE)
    run = BenchRun("embed", args)
    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    console.print(f"rendering {args.tracks} x {args.duration:g} s demo tracks in {work} ...")
    catalog = render_demo_catalog(
        work / "catalog", DemoCatalogConfig(n_tracks=args.tracks, duration_s=args.duration, n_broken=0), workers=2
    )
    manifest = pq.read_table(catalog.manifest_path)
    uris = manifest["uri"].to_pylist()
    items = [
        WorkItem(t, u, f)
        for t, u, f in zip(manifest["track_id"].to_pylist(), uris, fingerprints(uris), strict=True)
    ]
    encoder_config = EncoderConfig(model=args.model, batch_windows=args.batch_windows)
    embed = EmbedStage(encoder_config)
    embed.setup()
    front_end = embed.model.front_end().eval()
    rate = front_end.sample_rate

    audio = [load_audio(u, rate) for u in uris]
    audio_s = sum(a.duration_s for a in audio)
    with torch.inference_mode():
        windows = [front_end(torch.from_numpy(a.samples)) for a in audio]
    n_windows = sum(len(w) for w in windows)
    features = [
        TrackFeatures(item, w, front_end.window_starts(len(a.samples)), a.duration_s)
        for item, w, a in zip(items, windows, audio, strict=True)
    ]
    ctx = RowContext("bench", embed.model.name, (embed.model.default_layer,), embed.model.version, "bench")

    def decode_all() -> None:
        for u in uris:
            load_audio(u, rate)

    def front_end_all() -> None:
        with torch.inference_mode():
            for a in audio:
                front_end(torch.from_numpy(a.samples))

    def encode_all() -> None:
        embed(features)

    embedded = embed(features)

    def write_all() -> None:
        out = tempfile.mkdtemp(dir=work)
        store = TableStore(out)
        write_shard(store, "bench", ShardOutput.of("000000", embedded, [], ctx, with_windows=False))

    def naive() -> None:
        # One file at a time, one model call per track (batches never span tracks), no decode pool.
        for item in items:
            a = load_audio(item.uri, rate)
            with torch.inference_mode():
                w = front_end(torch.from_numpy(a.samples))
            embed([TrackFeatures(item, w, front_end.window_starts(len(a.samples)), a.duration_s)])

    def end_to_end(workers: int) -> Callable[[], object]:
        def run() -> None:
            out = tempfile.mkdtemp(dir=work)
            config = EmbedConfig(
                catalog=str(catalog.manifest_path), out=out, encoder=encoder_config, workers=workers
            )
            run_embed(config, Console(quiet=True))

        return run

    calls = {
        "decode": decode_all,
        "front end": front_end_all,
        "encoder": encode_all,
        "write (part files)": write_all,
        "naive baseline": naive,
        "local, 1 worker": end_to_end(1),
        "local, 2 workers": end_to_end(2),
    }
    console.print(f"measuring the stages, the naive baseline and the local runner, {args.repeat} rounds ...")
    measurements = {name: timing.median_wall for name, timing in time_rounds(calls, args.repeat).items()}

    naive_s = measurements["naive baseline"]
    rows = [
        {
            "measurement": name,
            "median_s": seconds,
            "audio_s_per_s": audio_s / seconds,
            "windows_per_s": n_windows / seconds,
            "speedup_vs_naive": naive_s / seconds,
        }
        for name, seconds in measurements.items()
    ]
    print_table(
        f"{args.tracks} tracks, {audio_s / 60:.1f} min of audio, {n_windows} windows, {args.model}",
        ("measurement", "median s", "audio s / s", "windows / s", "vs naive"),
        (
            (row["measurement"], f"{row['median_s']:.2f}", f"{row['audio_s_per_s']:.1f}",
             f"{row['windows_per_s']:.1f}", f"{row['speedup_vs_naive']:.2f}x")
            for row in rows
        ),
    )  # fmt: skip
    console.print(f"torch threads {torch.get_num_threads()}, batch {args.batch_windows} windows")
    results = {
        "tracks": args.tracks,
        "duration_s": args.duration,
        "audio_s": audio_s,
        "windows": n_windows,
        "model": args.model,
        "repeat": args.repeat,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }
    console.print(f"wrote {run.write(results_path('embed_bench'), results)}")


if __name__ == "__main__":
    main()
