"""Encoder throughput: windows per second of each encoder, fp32 and bf16, at two batch sizes, on one device.

    python bench/encoders_bench.py [--device cpu|cuda] [--threads 2] [--repeat 5] [--batches 32,64]
                                   [--precisions fp32,bf16] [--models musicnn-msd,...] [--smoke]

For each encoder: load it on the device once per precision, cut one window from seeded noise with its front end and
repeat it to each batch size; after a warm-up call per precision, time `repeat` calls of `Encoder.embed` per
precision (synchronised on CUDA), the precisions taking turns call by call so a shared machine's load weighs on
each alike, and report the batch over the median call time. Calls that take longer than 10 s are repeated 3 times
instead, so the slowest encoder on a CPU finishes in minutes. Each encoder's front end is timed too (fp32, on the
same device): windows per second made from 60 s of noise.

mule-sfnfnet-f0 runs with stand-in weights (seeded random initialisation, skip gains drawn from [0.1, 0.5] so every
block computes): the released weights are not shipped, and the speed of the arithmetic does not depend on the
values.

The CPU may be shared with other work: every row records the 1-minute load average when it was measured. On CUDA,
rows add the mean GPU utilisation sampled during the timed calls (NVML, when pynvml is installed) and the peak
memory of a call. Prints a table and writes bench/results/encoders.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from harness import BenchRun, console, parse_args, print_table, results_path, time_rounds

from catalog_embed.workers.encoders import Encoder, get_encoder
from catalog_embed.workers.encoders.base import resolve_device
from catalog_embed.workers.encoders.sfnfnet import write_standin_weights

MODELS = ("musicnn-msd", "musicnn-mtt", "mule-sfnfnet-f0", "mfcc-stats", "chroma-stats")
LONG_CALL_S = 10.0
LONG_CALL_REPEAT = 3
FRONT_END_AUDIO_S = 60.0
# Every encoder, one precision, one small batch: each model's code path runs once.
SMOKE = {"batches": [1], "precisions": ["fp32"], "repeat": 1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _gpu_utilisation(device: torch.device, samples: list[int]) -> Iterator[None]:
    """Sample NVML utilisation (percent) every 50 ms while the block runs; nothing without CUDA or pynvml."""
    if device.type != "cuda":
        yield
        return
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            try:
                samples.append(torch.cuda.utilization(device))
            except (ModuleNotFoundError, RuntimeError):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def time_interleaved(encoders: dict[str, Encoder], windows: torch.Tensor, repeat: int) -> dict[str, dict]:
    """Per precision: the `Timing` of `embed` on `windows`, NVML utilisation samples and peak memory.

    After one warm-up call each, the precisions take turns call by call, so that the load of a shared machine
    weighs on each alike. Calls longer than `LONG_CALL_S` are repeated `LONG_CALL_REPEAT` times at most.
    """
    device = next(iter(encoders.values())).device
    slow = False
    for encoder in encoders.values():
        start = time.perf_counter()
        encoder.embed(windows)
        _sync(device)
        slow |= time.perf_counter() - start > LONG_CALL_S
    repeat = min(repeat, LONG_CALL_REPEAT) if slow else repeat
    measured = {precision: {"util": [], "peak_mib": None} for precision in encoders}

    @contextmanager
    def watched(precision: str) -> Iterator[None]:
        """NVML sampling and the peak-memory counter around one timed call, their own cost outside its time."""
        entry = measured[precision]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _gpu_utilisation(device, entry["util"]):
            yield
        if device.type == "cuda":
            entry["peak_mib"] = max(entry["peak_mib"] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)

    calls = {precision: partial(encoder.embed, windows) for precision, encoder in encoders.items()}
    for precision, timing in time_rounds(calls, repeat, sync=partial(_sync, device), around=watched).items():
        measured[precision]["timing"] = timing
    return measured


def front_end_rate(encoder: Encoder, device: torch.device, repeat: int) -> float:
    """Windows per second the encoder's front end makes from noise on `device` (median of `repeat`)."""
    front_end = encoder.front_end().to(device).eval()
    waveform = torch.randn(int(FRONT_END_AUDIO_S * front_end.sample_rate), generator=torch.Generator().manual_seed(0))
    waveform = (waveform * 0.1).to(device)
    with torch.inference_mode():
        n_windows = len(front_end(waveform))
        timing = time_rounds({"front end": partial(front_end, waveform)}, repeat, sync=partial(_sync, device))
    return n_windows / timing["front end"].median_wall


def bench_model(name: str, args: argparse.Namespace, device: torch.device, mule_weights: str) -> list[dict]:
    """Every (precision, batch) row of one encoder."""
    options = {"weights": mule_weights} if name == "mule-sfnfnet-f0" else {}
    encoders = {}
    for precision in args.precisions:
        encoders[precision] = get_encoder(name, **options)
        encoders[precision].load(device, precision)
    any_encoder = next(iter(encoders.values()))
    front_end_wps = front_end_rate(any_encoder, device, args.repeat)
    front_end = any_encoder.front_end()
    noise = torch.randn(front_end.window_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        window = front_end(noise)[:1]
    rows = []
    for batch in args.batches:
        windows = window.expand(batch, *window.shape[1:]).contiguous().to(device)
        for precision, measured in time_interleaved(encoders, windows, args.repeat).items():
            seconds = measured["timing"].median_wall
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "batch": batch,
                    "windows_per_s": batch / seconds,
                    "seconds_per_call": seconds,
                    "repeats": len(measured["timing"].wall),
                    "front_end_windows_per_s": front_end_wps,
                    "load_avg_1m": os.getloadavg()[0],
                    "gpu_util_pct": statistics.mean(measured["util"]) if measured["util"] else None,
                    "gpu_peak_mib": measured["peak_mib"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[32, 64])
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    args = parse_args(parser, SMOKE)
    run = BenchRun("encoders", args)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="encoders-bench-") as scratch:
        mule_weights = write_standin_weights(Path(scratch)) if "mule-sfnfnet-f0" in args.models else ""
        for name in args.models:
            rows.extend(bench_model(name, args, device, mule_weights))
    columns = ["model", "precision", "batch", "windows/s", "s/call", "front end windows/s", "load avg 1m"]
    if device.type == "cuda":
        columns += ["GPU util %", "GPU peak MiB"]
    table = []
    for row in rows:
        cells = [
            row["model"], row["precision"], str(row["batch"]), f"{row['windows_per_s']:.1f}",
            f"{row['seconds_per_call']:.3f}", f"{row['front_end_windows_per_s']:.0f}", f"{row['load_avg_1m']:.2f}",
        ]  # fmt: skip
        if device.type == "cuda":
            util = row["gpu_util_pct"]
            cells += ["n/a" if util is None else f"{util:.0f}", f"{row['gpu_peak_mib']:.0f}"]
        table.append(cells)
    print_table(f"encoders on {device} ({args.threads} torch threads)", columns, table, left=2)
    results = {"device": str(device), "torch_threads": torch.get_num_threads(), "rows": rows}
    path = run.write(results_path("encoders"), results)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
