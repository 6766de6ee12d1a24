"""Decode benchmark: one file to 16 kHz mono, path by path, on one pinned core.

Renders two 44.1 kHz stereo demo tracks with `workers/demo_catalog.py` (mp3 and Ogg Vorbis, `--seconds` long, real
music from a SoundFont), then times each path on each file: CPU seconds of this process (one core pinned with
`os.sched_setaffinity`, one torch thread), median over `--repeats` rounds after a warm-up round; each round runs
every path once, so that load from other processes weighs on all paths alike. CPU time, not wall time, because the
machine is shared: wall-clock medians go into the JSON too.

Paths (decode-only = decode and downmix to mono at the file's rate; decode+resample = to 16 kHz):

  today            to_ndarray() + mean() downmix, torchaudio Kaiser-best sinc (64 zero crossings): the path before.
  planes + soxr HQ `catalog_embed.workers.audio.decode`: downmix from the decoder's float planes, soxr HQ (the chosen path on
                   the CPU).
  native, to a GPU what a decode worker does when the front end runs on the GPU: decode at the file's rate and
                   ship float16 ("+resample" is that: the GPU resamples, `catalog_embed.workers.audio.DeviceResampler`, whose
                   quality figures are computed here on the CPU).
  planes + soxr VHQ, planes + torchaudio sinc-16: the same decode, other resamplers.
  swr, swr filter 64: FFmpeg's own resampler through `av.AudioResampler(format="flt", layout="mono")`, which
      downmixes too (its stereo-to-mono matrix is scaled to the mean); the default filter and filter_size 64. The
      PyAV wheel's FFmpeg has no libsoxr (`aresample` with `resampler=soxr` fails), so soxr runs through python-soxr.

Quality of each resampler, 44.1 kHz to 16 kHz: 440 Hz + 3 kHz tones against the same tones synthesised at 16 kHz
(SNR), white noise against soxr HQ (SNR), and the level of a 10 kHz tone (above the new Nyquist frequency) after
resampling, relative to the input (aliasing). Prints a table and writes bench/results/decode_bench.json.

    python bench/decode_bench.py [--seconds 90] [--repeats 5] [--core N] [--out PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import soxr
import torch
import torchaudio.functional as AF
from harness import BenchRun, console, parse_args, print_table, results_path, time_rounds

from catalog_embed.workers.audio import DeviceResampler, decode, resample
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.stages import SHIPPED_DTYPE

SMOKE = {"seconds": 2.0, "repeats": 1}
TARGET_RATE = 16_000
# torchaudio's "kaiser_best" (librosa/resampy's): what workers/audio.py used before soxr.
KAISER_BEST = {
    "lowpass_filter_width": 64,
    "rolloff": 0.9475937167399596,
    "resampling_method": "sinc_interp_kaiser",
    "beta": 14.769656459379492,
}
KAISER_16 = {**KAISER_BEST, "lowpass_filter_width": 16}
# swresample maps stereo to mono with 1/sqrt(2) per channel; its volume option scales that to the mean.
SWR_MEAN = {"rematrix_volume": str(2**-0.5)}


def decode_today(path: Path) -> tuple[np.ndarray, int]:
    """The decode loop before: planar float frames through to_ndarray(), then mean() over channels."""
    with path.open("rb") as fh, av.open(fh, metadata_errors="ignore") as container:
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")
        chunks = []
        for frame in container.decode(stream):
            for converted in to_float.resample(frame):
                block = converted.to_ndarray()
                chunks.append(block.mean(axis=0, dtype=np.float32) if block.shape[0] > 1 else block[0])
        return np.concatenate(chunks), stream.codec_context.sample_rate


def decode_planes(path: Path, rate: int | None = None) -> tuple[np.ndarray, int]:
    """The decode loop now: `catalog_embed.workers.audio.decode`, at `rate` (None: the file's own)."""
    with path.open("rb") as fh:
        audio = decode(fh, rate)
    return audio.samples, audio.sample_rate


def decode_swr(path: Path, rate: int | None, options: dict[str, str]) -> np.ndarray:
    """Decode with FFmpeg's resampler converting every frame to mono float (at `rate`, None: the file's)."""
    with path.open("rb") as fh, av.open(fh, metadata_errors="ignore") as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate, options={**SWR_MEAN, **options})
        chunks = [out.to_ndarray()[0] for frame in container.decode(audio=0) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray()[0] for out in resampler.resample(None)]
        return np.concatenate(chunks)


def torchaudio_resampler(params: dict) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda samples, rate: AF.resample(torch.from_numpy(samples), rate, TARGET_RATE, **params).numpy()


def device_resampler(samples: np.ndarray, rate: int) -> np.ndarray:
    """`catalog_embed.workers.audio.DeviceResampler`, run here on the CPU (its quality does not depend on the device)."""
    return DeviceResampler(TARGET_RATE)(torch.from_numpy(samples), rate).numpy()


def soxr_resampler(quality: str) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda samples, rate: soxr.resample(samples, rate, TARGET_RATE, quality=quality)


def swr_resampler(options: dict[str, str]) -> Callable[[np.ndarray, int], np.ndarray]:
    def run(samples: np.ndarray, rate: int) -> np.ndarray:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE, options=options or None)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        return np.concatenate([out.to_ndarray()[0] for out in resampler.resample(frame) + resampler.resample(None)])

    return run


def paths() -> list[dict]:
    """Each path: how it decodes, how it decodes and resamples, and its resampler alone (for the quality)."""

    def planes_with(resampler: Callable) -> Callable[[Path], np.ndarray]:
        return lambda path: resampler(*decode_planes(path))

    today = torchaudio_resampler(KAISER_BEST)
    return [
        {
            "path": "today",
            "resampler": "torchaudio Kaiser-best (64)",
            "decode": decode_today,
            "full": lambda path: today(*decode_today(path)),
            "resample": today,
        },
        {
            "path": "planes (chosen)",
            "resampler": "soxr HQ",
            "decode": decode_planes,
            "full": lambda path: decode_planes(path, TARGET_RATE),
            "resample": lambda samples, rate: resample(samples, rate, TARGET_RATE),
        },
        {
            "path": "native, to a GPU",
            "resampler": "soxr HQ taps on the GPU",
            "decode": decode_planes,
            # A decode worker's whole share when the front end runs on the GPU: decode at the file's rate, ship float16.
            "full": lambda path: torch.from_numpy(decode_planes(path)[0]).to(SHIPPED_DTYPE),
            "resample": device_resampler,
        },
        {
            "path": "planes",
            "resampler": "soxr VHQ",
            "decode": decode_planes,
            "full": planes_with(soxr_resampler("VHQ")),
            "resample": soxr_resampler("VHQ"),
        },
        {
            "path": "planes",
            "resampler": "torchaudio Kaiser (16)",
            "decode": decode_planes,
            "full": planes_with(torchaudio_resampler(KAISER_16)),
            "resample": torchaudio_resampler(KAISER_16),
        },
        {
            "path": "swr",
            "resampler": "FFmpeg swr (filter 32)",
            "decode": lambda path: decode_swr(path, None, {}),
            "full": lambda path: decode_swr(path, TARGET_RATE, {}),
            "resample": swr_resampler({}),
        },
        {
            "path": "swr",
            "resampler": "FFmpeg swr (filter 64)",
            "decode": lambda path: decode_swr(path, None, {"filter_size": "64"}),
            "full": lambda path: decode_swr(path, TARGET_RATE, {"filter_size": "64"}),
            "resample": swr_resampler({"filter_size": "64"}),
        },
    ]


def tones(rate: int, freqs: tuple[tuple[float, float], ...], seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return sum(amplitude * np.sin(2 * np.pi * f * t) for f, amplitude in freqs).astype(np.float32)


def level_db(signal: np.ndarray, reference: np.ndarray) -> float:
    """Mean power of `signal` relative to `reference`'s (the two may differ in rate and length)."""
    power = np.mean(signal.astype(np.float64) ** 2)
    return float(10 * np.log10(max(power, 1e-300) / np.mean(reference.astype(np.float64) ** 2)))


def quality(resampler: Callable[[np.ndarray, int], np.ndarray]) -> dict[str, float]:
    """The figures of `tests/workers/test_audio.py`, 44.1 kHz to 16 kHz, edges left out."""
    inner = slice(1_000, -1_000)
    passband = ((440, 0.3), (3_000, 0.2))
    ours, exact = resampler(tones(44_100, passband), 44_100), tones(TARGET_RATE, passband)
    noise = np.random.default_rng(0).standard_normal(44_100 * 3).astype(np.float32) * 0.1
    noisy, reference = resampler(noise, 44_100), soxr.resample(noise, 44_100, TARGET_RATE, quality="HQ")
    above = tones(44_100, ((10_000, 0.5),))
    return {
        "tones_snr_db": -level_db(ours[inner] - exact[inner], exact[inner]),
        "noise_snr_vs_soxr_hq_db": -level_db(noisy[inner] - reference[inner], reference[inner]),
        "alias_10k_db": level_db(resampler(above, 44_100)[inner], above),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each rendered track")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path and file (median)")
    parser.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="the CPU core to pin")
    parser.add_argument("--out", type=Path, default=results_path("decode_bench"))
    args = parse_args(parser, SMOKE)

    run = BenchRun("decode", args)
    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        console.print(f"rendering an mp3 and an Ogg Vorbis track of {args.seconds:g} s (44.1 kHz stereo) ...")
        catalog = render_demo_catalog(
            Path(work) / "catalog",
            DemoCatalogConfig(n_tracks=2, duration_s=args.seconds, codecs=("mp3", "ogg"), n_broken=0),
        )
        files = {path.suffix[1:]: path for path in sorted((catalog.root / "audio").iterdir())}
        specs = paths()
        cases = {
            (i, codec, kind): (lambda fn=spec[kind], path=path: fn(path))
            for i, spec in enumerate(specs)
            for codec, path in files.items()
            for kind in ("decode", "full")
        }
        console.print(f"timing {len(specs)} paths on {len(files)} files, {args.repeats} rounds ...")
        measured = time_rounds(cases, args.repeats, warmup=True)
        results = []
        for i, spec in enumerate(specs):
            row = {"path": spec["path"], "resampler": spec["resampler"], **quality(spec["resample"])}
            for codec in files:
                for kind in ("decode", "full"):
                    row[f"{codec}_{kind}_x"] = args.seconds / measured[i, codec, kind].median_cpu
                    row[f"{codec}_{kind}_wall_x"] = args.seconds / measured[i, codec, kind].median_wall
            results.append(row)

    today = results[0]
    for row in results:
        row["speedup_mp3"] = row["mp3_full_x"] / today["mp3_full_x"]
        row["speedup_ogg"] = row["ogg_full_x"] / today["ogg_full_x"]
    print_table(
        f"{args.seconds:g} s tracks, one core pinned, CPU-time x real time (median of {args.repeats})",
        ("path", "resampler", "mp3 decode", "mp3 +resample", "ogg decode", "ogg +resample", "vs today",
         "tones SNR", "noise vs soxr HQ", "10 kHz alias"),
        (
            (
                row["path"],
                row["resampler"],
                f"{row['mp3_decode_x']:.0f}x",
                f"{row['mp3_full_x']:.0f}x",
                f"{row['ogg_decode_x']:.0f}x",
                f"{row['ogg_full_x']:.0f}x",
                f"{row['speedup_mp3']:.2f} / {row['speedup_ogg']:.2f}",
                f"{row['tones_snr_db']:.0f} dB",
                "identical" if row["noise_snr_vs_soxr_hq_db"] > 300 else f"{row['noise_snr_vs_soxr_hq_db']:.0f} dB",
                f"{row['alias_10k_db']:.0f} dB",
            )
            for row in results
        ),
        left=2,
    )  # fmt: skip
    path = run.write(args.out, {"core": args.core, "seconds": args.seconds, "repeats": args.repeats,
                                "results": results})  # fmt: skip
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
