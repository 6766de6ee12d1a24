"""`catalog-embed demo-catalog OUT`: render a labeled demo music catalog, offline and deterministically."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog

_DEFAULTS = DemoCatalogConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo-catalog` subcommand."""
    parser = subparsers.add_parser(
        "demo-catalog",
        help="render a labeled demo catalog (General MIDI, every codec, a few broken files)",
        description=(
            "Render synthetic tonal tracks labeled with instrument family, key and tempo, encoded as mp3, Ogg "
            "Vorbis, Opus, FLAC, m4a/AAC and WAV, plus a few files broken on purpose. Writes OUT/audio/, "
            "OUT/manifest.parquet, OUT/labels.parquet and OUT/README.txt. The same arguments give the same bytes."
        ),
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="output folder (new or empty)")
    parser.add_argument(
        "--tracks", type=int, default=_DEFAULTS.n_tracks, help="manifest rows, broken ones included (%(default)s)"
    )
    parser.add_argument(
        "--duration", type=float, default=_DEFAULTS.duration_s, help="seconds per track (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="random seed (%(default)s)")
    parser.add_argument(
        "--broken", type=int, default=_DEFAULTS.n_broken, help="rows broken on purpose (%(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=_usable_cpus(),
        help="rendering processes; the output does not depend on it (default: usable CPUs, %(default)s)",
    )
    parser.set_defaults(handler=_handle)


def _usable_cpus() -> int:
    # The affinity mask, not the machine's core count: containers and `taskset` restrict it.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _handle(args: argparse.Namespace) -> int:
    config = DemoCatalogConfig(
        n_tracks=args.tracks, duration_s=args.duration, seed=args.seed, n_broken=args.broken
    )
    started = time.perf_counter()
    catalog = render_demo_catalog(args.out, config, workers=args.workers)
    print(
        f"demo-catalog: {catalog.n_tracks} tracks ({catalog.n_broken} broken on purpose) of {config.duration_s:g} s "
        f"in {time.perf_counter() - started:.1f} s -> {catalog.manifest_path} and {catalog.labels_path.name}"
    )
    return 0
