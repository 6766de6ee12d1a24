"""Feed-the-GPU benchmark: decoding, the encoder and the whole pipeline measured in one run, in windows per second.

    python bench/gpu_bench.py [--device cuda|cpu] [--model musicnn-msd] [--precision bf16] [--tracks 64]
                              [--seconds 120] [--workers N] [--batch N] [--repeat 5] [--no-compile]
                              [--[no-]cold-warm] [--no-ray] [--smoke]

Sections (each one's figures are rows of the printed table and keys of the JSON it writes):

- decode: `catalog_embed.workers.stages.DecodeStage` as the runners configure it for the device (on a GPU only decoding, at
  the file's own rate: resampling and the front end run on the GPU) on one core in this process, then an
  `IsolatedPool` of `--workers` children: windows per second and times real time.
- encoder: `Encoder.embed` on one batch of the front end's windows repeated to `--batch` (on a GPU by default the
  size `EncoderConfig.windows_per_batch` picks from the measured memory footprint), eager and under
  `--compile` (`Encoder.compile`), median of `--repeat` calls after a warm-up, the two modes taking turns:
  windows/s and TFLOP/s (from `torch.utils.flop_counter` on one eager call), the compile time in this process,
  and (`--cold-warm`, the default on CUDA) a cold and a warm start of a fresh process compiling against an empty
  and then the same inductor cache (`TORCHINDUCTOR_CACHE_DIR`). On CUDA, the peak memory of a call per window and
  the footprint `Encoder.measure_memory` reports.
- end to end: the local runner's loop alone ("loop": `catalog_embed.workers.overlap.embed_overlapped`, no planning, tables or
  commit, so it runs where deltalake is not installed), then `catalog_embed.pipelines.embed.job.run_embed` on the local runner and
  on Ray (a local instance, one encoder actor, which takes the GPU with `--device cuda`), compiled when compiling
  won in the encoder section: windows/s, times real time, and the share of the wall time spent in the encoder
  (`stage_seconds['encode']`, a synchronous call: on a GPU the busy share the encoder can have).
- efficiency = end-to-end rate / min(decode pool rate, encoder rate), per runner.

The demo catalog (`catalog_embed.workers.demo_catalog`, every codec, no broken files) is rendered once into a temporary folder.
Prints a table with the machine's load average and writes bench/results/gpu_bench-<device>.json.

Without a GPU: `--device cpu --tracks 16 --seconds 30 --repeat 3` finishes in about 5 minutes on 2 busy cores
(`--cold-warm` adds two compilations, 1 to 3 minutes there); `--device cpu --smoke` (2 short tracks, one decode
worker, eager only, no Ray) checks that every section but Ray's runs, in seconds.

On the GPU machine (Python 3.12 with torch, torchaudio, pyarrow, fsspec, safetensors and rich, no internet, no PyAV,
soxr, deltalake or Ray) the PyAV and soxr wheels (36 MB together) are enough for every section but `run_embed`'s,
which are skipped with the missing package named: deltalake (52 MB) does not fit beside PyAV in the 64 MiB a call
carries. `bench/device_check.sh` is the prepared check: it installs the carried wheels, runs the CUDA tests and
this bench for musicnn fp32 and bf16 and SF-NFNet-F0 bf16, and says how to carry what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from harness import BenchRun, console, parse_args, print_table, results_path, time_rounds
from rich.console import Console

from catalog_embed.workers.encoders import Encoder, get_encoder
from catalog_embed.workers.encoders.base import INDUCTOR_CACHE_ENV, resolve_device
from catalog_embed.workers.encoders.sfnfnet import write_standin_weights

DECODE_TIMEOUT_S = 300.0
DECODE_MEMORY_MB = 4096.0
SMOKE = {"tracks": 2, "seconds": 4.0, "workers": 1, "batch": 2, "repeat": 1, "compile": False, "cold_warm": False,
         "ray": False}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _encoder_options(model: str, work: Path) -> dict[str, str]:
    """Stand-in weights for MULE (the released ones are not shipped); nothing for the others."""
    if model != "mule-sfnfnet-f0":
        return {}
    folder = work / "mule-standin"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        write_standin_weights(folder)
    return {"weights": str(folder)}


def _windows(encoder: Encoder, batch: int) -> torch.Tensor:
    """One window of the front end's output for seeded noise, repeated to `batch` (speed does not depend on it)."""
    front_end = encoder.front_end().eval()
    noise = torch.randn(front_end.window_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        window = front_end(noise)[:1]
    return window.expand(batch, *window.shape[1:]).contiguous()


def _flops_per_window(encoder: Encoder, windows: torch.Tensor) -> float | None:
    """Floating-point operations of one window, counted by PyTorch's flop counter (None when it counts none)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        encoder.embed(windows)
    total = counter.get_total_flops()
    return total / len(windows) if total else None


def encoder_section(args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    """Eager and compiled windows/s of `args.model` on `device`, with memory and compile-cache figures."""
    from catalog_embed.workers.stages import EncoderConfig

    options = _encoder_options(args.model, work)
    eager = get_encoder(args.model, **options)
    eager.load(device, args.precision)
    config = EncoderConfig(model=args.model, device=str(device), precision=args.precision, batch_windows=args.batch)
    batch = config.windows_per_batch(encoder=eager)
    windows = _windows(eager, batch).to(device)
    result: dict = {"batch_windows": batch}
    if device.type == "cuda":
        footprint = eager.measure_memory()
        result["footprint_window_mib"] = footprint.window_bytes / 2**20
        result["footprint_fixed_mib"] = footprint.fixed_bytes / 2**20
    eager.embed(windows)  # warm-up (cuDNN autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        eager.embed(windows)
        result["peak_mib_per_window"] = (torch.cuda.max_memory_allocated(device) - before) / batch / 2**20
    flops = _flops_per_window(eager, windows[: min(batch, 8)])
    result["gflop_per_window"] = flops / 1e9 if flops else None
    calls = {"eager": partial(eager.embed, windows)}
    compiled = None
    if args.compile:
        compiled = get_encoder(args.model, **options)
        compiled.load(device, args.precision)
        compiled.compile(batch)
        _sync(device)
        start = time.perf_counter()
        compiled.embed(windows)
        _sync(device)
        result["compile_first_call_s"] = time.perf_counter() - start
        calls["compiled"] = partial(compiled.embed, windows)
    for mode, timing in time_rounds(calls, args.repeat, sync=partial(_sync, device)).items():
        seconds = timing.median_wall
        result[f"{mode}_windows_per_s"] = batch / seconds
        if flops:
            result[f"{mode}_tflop_per_s"] = flops * batch / seconds / 1e12
    calls = eager = compiled = None  # free the device for the processes below and the sections after
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.compile and args.cold_warm:
        cache = work / "inductor-cold-warm"
        result["cold_start_s"] = _compile_start(args, device, batch, cache)
        result["warm_start_s"] = _compile_start(args, device, batch, cache)
    return result


def _compile_start(args: argparse.Namespace, device: torch.device, batch: int, cache: Path) -> float:
    """Seconds a fresh process takes from loading the encoder to its first compiled batch, with `cache`."""
    env = {**os.environ, INDUCTOR_CACHE_ENV: str(cache)}
    command = [sys.executable, __file__, "--compile-start", "--device", str(device), "--model", args.model,
               "--precision", args.precision, "--batch", str(batch), "--work", str(cache.parent)]  # fmt: skip
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["seconds"]


def compile_start(args: argparse.Namespace, device: torch.device) -> None:
    """Child of `_compile_start`: load, compile and run one batch; print the seconds it took as JSON."""
    start = time.perf_counter()
    encoder = get_encoder(args.model, **_encoder_options(args.model, Path(args.work)))
    encoder.load(device, args.precision)
    encoder.compile(args.batch)
    encoder.embed(_windows(encoder, args.batch).to(device))
    _sync(device)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def decode_section(args: argparse.Namespace, work: Path) -> tuple[dict, Path]:
    """Windows/s of decoding on one core and in the pool; also returns the catalog's manifest."""
    import pyarrow.parquet as pq

    from catalog_embed.schemas.records import WorkItem
    from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
    from catalog_embed.workers.isolation import IsolatedPool
    from catalog_embed.workers.stages import DecodeStage, EncoderConfig, TrackFeatures

    demo = DemoCatalogConfig(n_tracks=args.tracks, duration_s=args.seconds, n_broken=0)
    catalog = render_demo_catalog(work / "catalog", demo, workers=args.workers)
    rows = pq.read_table(catalog.manifest_path).to_pylist()
    items = [WorkItem(track_id=row["track_id"], uri=row["uri"], fingerprint="") for row in rows]
    stage = DecodeStage(EncoderConfig(model=args.model, device=args.device, **_encoder_options(args.model, work)))
    stage.setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    decoded = [stage(item) for item in items]
    one_core_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    tracks = [d for d in decoded if isinstance(d, TrackFeatures)]
    windows = sum(t.n_windows for t in tracks)
    audio_s = sum(t.duration_s for t in tracks)
    with IsolatedPool(stage, args.workers, DECODE_TIMEOUT_S, DECODE_MEMORY_MB) as pool:
        # The children start first (importing torch takes them seconds): the pool's rate is that of decoding.
        list(pool.imap(items[: args.workers], ahead=args.workers))
        start = time.perf_counter()
        pooled = [result for result, _seconds in pool.imap(items, ahead=2 * args.workers)]
        pool_s = time.perf_counter() - start
    failed = [d for d in pooled if not isinstance(d, TrackFeatures)]
    result = {
        "tracks": len(items),
        "failed": len(failed),
        "windows": windows,
        "audio_s": audio_s,
        "one_core_windows_per_s": windows / one_core_s,
        "one_core_x_real_time": audio_s / one_core_s,
        "pool_workers": args.workers,
        "pool_windows_per_s": windows / pool_s,
        "pool_x_real_time": audio_s / pool_s,
    }
    return result, catalog.manifest_path


def _encoder_config(args: argparse.Namespace, work: Path, compiled: bool, batch: int):  # noqa: ANN202
    from catalog_embed.workers.stages import EncoderConfig

    options = _encoder_options(args.model, work)
    return EncoderConfig(
        model=args.model, device=args.device, precision=args.precision, batch_windows=batch, compile=compiled, **options
    )


def _run_result(compiled: bool, wall: float, stats, windows: int) -> dict:  # noqa: ANN001
    encode_s = stats.stage_seconds.get("encode")
    return {
        "compiled": compiled,
        "wall_s": wall,
        "embedded": stats.n_embedded,
        "failed": stats.n_failed,
        "windows_per_s": windows / wall,
        "x_real_time": stats.audio_seconds / wall,
        "encoder_busy_share": encode_s / wall if encode_s is not None else None,
        "stage_seconds": stats.stage_seconds,
    }


def end_to_end_section(args: argparse.Namespace, manifest: Path, work: Path, runner: str, compiled: bool,
                       batch: int, windows: int) -> dict:  # fmt: skip
    """One `run_embed` on `runner` into a fresh output root."""
    from catalog_embed.pipelines.embed.config import EmbedConfig
    from catalog_embed.pipelines.embed.job import run_embed
    from catalog_embed.pipelines.runners.options import RayOptions

    config = EmbedConfig(
        catalog=str(manifest),
        out=str(work / f"tables-{runner}"),
        encoder=_encoder_config(args, work, compiled, batch),
        runner=runner,
        workers=args.workers,
        shard_size=args.shard_size,
        ray=RayOptions(embed_actors=1),
    )
    summary = run_embed(config, Console(quiet=True))
    return _run_result(compiled, summary.wall_seconds, summary.stats, windows)


def loop_section(args: argparse.Namespace, manifest: Path, work: Path, compiled: bool, batch: int,
                 windows: int) -> dict:  # fmt: skip
    """The local runner's loop (`catalog_embed.workers.overlap.embed_overlapped`: decode children, feeding thread, shard core)
    over the catalog, without planning, tables or commit: it needs neither deltalake nor DuckDB."""
    import pyarrow.parquet as pq

    from catalog_embed.schemas.records import WorkItem
    from catalog_embed.workers.overlap import embed_overlapped
    from catalog_embed.workers.rows import RowContext
    from catalog_embed.workers.shard import ShardEmbedder, ShardStats
    from catalog_embed.workers.stages import DecodeStage

    encoder = _encoder_config(args, work, compiled, batch)
    rows = pq.read_table(manifest).to_pylist()
    items = [WorkItem(track_id=row["track_id"], uri=row["uri"], fingerprint="") for row in rows]
    shards = [(f"{i:06d}", items[i : i + args.shard_size]) for i in range(0, len(items), args.shard_size)]
    layers = encoder.resolved_layers(encoder.build())
    embedder = ShardEmbedder(encoder, RowContext("bench", args.model, layers, "bench", "bench"))
    stats = ShardStats()
    start = time.perf_counter()
    for output in embed_overlapped(DecodeStage(encoder), embedder, shards, args.workers, DECODE_TIMEOUT_S):
        stats.merge(output.stats)
    wall = time.perf_counter() - start
    embedder.teardown()
    return _run_result(compiled, wall, stats, windows)


def _skipped(section: str, exc: ImportError) -> dict:
    return {"skipped": f"{section} needs {exc.name or exc}, not installed here"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="musicnn-msd")
    parser.add_argument("--precision", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--tracks", type=int, default=64, help="demo tracks to decode and embed")
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds per track")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="decode processes")
    parser.add_argument("--batch", type=int, help="windows per encoder call (default: sized to the device)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="timed encoder calls per mode")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled encoder")
    parser.add_argument("--cold-warm", action=argparse.BooleanOptionalAction, default=None,
                        help="time a cold and a warm compile start in fresh processes (default: on CUDA)")  # fmt: skip
    parser.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray end-to-end run")
    parser.add_argument("--compile-start", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    device = resolve_device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.cold_warm is None:  # two more compilations: seconds on a GPU, minutes on a few CPU cores
        args.cold_warm = device.type == "cuda"
    if args.compile_start:
        compile_start(args, device)
        return
    run = BenchRun("gpu", args)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else run.meta["machine"]["cpu_model"]
    report: dict = {"device": name}
    console.print(f"{args.model} {args.precision} on {name}; work in {work}")

    start = time.perf_counter()
    report["encoder"] = encoder_section(args, device, work)
    console.print(f"encoder section: {time.perf_counter() - start:.0f} s")
    encoder = report["encoder"]
    compiled_wins = encoder.get("compiled_windows_per_s", 0.0) > encoder["eager_windows_per_s"]
    encoder_rate = max(encoder["eager_windows_per_s"], encoder.get("compiled_windows_per_s", 0.0))

    start = time.perf_counter()
    try:
        report["decode"], manifest = decode_section(args, work)
    except ImportError as exc:
        report["decode"], manifest = _skipped("decoding", exc), None
    console.print(f"decode section: {time.perf_counter() - start:.0f} s")

    report["end_to_end"] = {}
    if manifest is not None:
        decode = report["decode"]
        for runner in ("loop", "local", "ray") if args.ray else ("loop", "local"):
            start = time.perf_counter()
            try:
                section = loop_section if runner == "loop" else partial(end_to_end_section, runner=runner)
                run_result = section(args, manifest, work, compiled=compiled_wins, batch=encoder["batch_windows"],
                                     windows=decode["windows"])  # fmt: skip
                run_result["efficiency"] = run_result["windows_per_s"] / min(decode["pool_windows_per_s"], encoder_rate)
            except ImportError as exc:
                run_result = _skipped(f"the {runner} runner", exc)
            report["end_to_end"][runner] = run_result
            console.print(f"end to end, {runner}: {time.perf_counter() - start:.0f} s")

    rows = [(section, key, value) for section in ("encoder", "decode") for key, value in report[section].items()]
    rows += [
        (f"end to end, {runner}", key, value)
        for runner, run_result in report["end_to_end"].items()
        for key, value in run_result.items()
        if key != "stage_seconds"
    ]
    load = (run.meta["machine"]["load_average_start"][0], os.getloadavg()[0])
    rows.append(("machine", "load average (1 min) before / after", f"{load[0]:.1f} / {load[1]:.1f}"))
    print_table(f"{args.model} {args.precision} on {name} ({os.cpu_count()} CPUs), {args.tracks} x {args.seconds:g} s "
                "tracks", ("section", "measure", "value"), rows, left=2)  # fmt: skip
    console.print(f"wrote {run.write(results_path(f'gpu_bench-{device.type}'), report)}")


if __name__ == "__main__":
    main()
