"""The benchmarks' shared harness: interleaved timing with medians, a `--smoke` size, a table printer, and a JSON
writer that records where and from what code every result came.

Every `bench/*.py` imports it as `harness` (a script's own folder is first on `sys.path`); importing it puts the
repository root on `sys.path` too, so that a bench can use what it shares with the tests (`tests.helpers`: the
fault proxy, moto's server) without `PYTHONPATH`. Each JSON it writes
holds the bench's own keys beside `meta`: the bench, the command line and parsed arguments, the start and end time
(UTC), the machine (CPU model, cores, memory, load average at start and end, GPUs), the git commit and whether the
tree was dirty, Python's version and the versions of the key packages installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
# A folder for results instead of bench/results/: tests set it, so that a smoke run never overwrites a measurement.
RESULTS_ENV = "CATALOG_EMBED_BENCH_RESULTS"
# What a bench's figures depend on; those not installed are left out of `meta.packages`.
PACKAGES = ("catalog-embed", "torch", "torchaudio", "numpy", "pyarrow", "deltalake", "av", "soxr", "duckdb",
            "ray", "apache-beam", "usearch", "faiss-cpu", "scikit-learn")  # fmt: skip
# Wide enough for every bench's table when the output is a pipe (rich would assume 80 columns and squeeze it);
# tables do not expand, so a narrow table stays narrow.
console = Console(width=180)

Key = TypeVar("Key")


@dataclass
class Timing:
    """The seconds each timed call of one case took.

    Attributes:
        wall: wall-clock seconds per call.
        cpu: CPU seconds of this process per call (the work of child processes is not counted).
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median_wall(self) -> float:
        """Median wall-clock seconds of a call."""
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        """Median CPU seconds of a call."""
        return statistics.median(self.cpu)


def time_rounds(
    calls: Mapping[Key, Callable[[], object]],
    repeat: int,
    *,
    warmup: bool = False,
    sync: Callable[[], None] | None = None,
    around: Callable[[Key], AbstractContextManager[object]] | None = None,
) -> dict[Key, Timing]:
    """Time every call `repeat` times, the calls taking turns round by round.

    Taking turns makes the load of a shared machine, which comes and goes, weigh on every case alike.

    Args:
        calls: the cases, each a call with no arguments.
        repeat: timed rounds.
        warmup: run one untimed round first (allocators, caches, autotuning).
        sync: called before the clock starts and before it stops (on CUDA: wait for the queued kernels).
        around: a context for each timed call, entered before the clock starts and left after it stops
            (sampling GPU utilisation, resetting peak-memory counters): its own cost is not timed.

    Returns:
        Each case's `Timing`.
    """
    sync = sync or (lambda: None)
    timings = {key: Timing() for key in calls}
    for round_ in range(repeat + warmup):
        for key, call in calls.items():
            with around(key) if around else nullcontext():
                sync()
                cpu, wall = time.process_time(), time.perf_counter()
                call()
                sync()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if round_ >= warmup:
                timings[key].wall.append(wall)
                timings[key].cpu.append(cpu)
    return timings


@dataclass(frozen=True)
class ProcessUsage:
    """What one child process cost, read from the kernel when it exited (`os.wait4`).

    Attributes:
        wall_s: seconds from its start to its exit.
        cpu_s: user plus system CPU seconds (steadier than wall time on a shared machine).
        peak_rss_mb: its peak resident memory.
        stdout: what it printed.
    """

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    stdout: str


def run_process(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> ProcessUsage:
    """Run `cmd` to its end, measured (`ProcessUsage`); exits the bench naming the command and its stderr's tail
    when it fails.

    Args:
        cmd: the command line.
        env: variables added to this process's environment.
        cwd: its working folder (the repository root: `python -c` code can import `tests.helpers`).
    """
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env={**os.environ, **(env or {})}, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed: {stderr.read().decode()[-3000:]}")
        stdout.seek(0)
        printed = stdout.read().decode()
    return ProcessUsage(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, printed)


def parse_args(
    parser: argparse.ArgumentParser, smoke: Mapping[str, object], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Add `--smoke` to `parser` and parse the command line.

    Args:
        parser: the bench's parser, its own options declared.
        smoke: argument values (by `dest`) of the bench's smallest size, which runs in seconds: it checks that the
            bench works (tests/test_bench.py runs it), its figures mean nothing. They override the command line's.
        argv: the arguments; None reads `sys.argv`.

    Returns:
        The parsed arguments.
    """
    sizes = ", ".join(f"{name}={value}" for name, value in smoke.items())
    parser.add_argument("--smoke", action="store_true", help=f"the smallest size, seconds to run ({sizes})")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(smoke)
    return args


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]], *, left: int = 1) -> None:
    """Print a table: the first `left` columns (labels) aligned left, the others (figures) right.

    Args:
        title: the table's title.
        columns: the column headings.
        rows: one sequence of cells per row; strings print as they are, other values through `_fmt`.
        left: how many leading columns are labels.
    """
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*(cell if isinstance(cell, str) else _fmt(cell) for cell in row))
    console.print(table)


def _fmt(value: object) -> str:
    """A figure for a table: three significant digits below 100, whole numbers above, "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


class BenchRun:
    """One run of a bench: what `meta` records, taken when the run starts, and the writer of its JSON."""

    def __init__(self, bench: str, args: argparse.Namespace) -> None:
        """Record the start: time, command line, machine, commit and versions.

        Args:
            bench: the bench's name.
            args: its parsed arguments (recorded as they are, non-JSON values as strings).
        """
        self.meta: dict = {
            "bench": bench,
            "command": [sys.executable, *sys.argv],
            "args": vars(args),
            "started_at": _now(),
            "machine": _machine(),
            "git": _git(),
            "python": platform.python_version(),
            "packages": _versions(),
        }

    def write(self, path: Path, results: Mapping[str, object]) -> Path:
        """Write `results` and `meta` (with the end time and load average now) as JSON to `path`.

        Writing again overwrites, so a long bench can write after every row and keep what it measured if stopped.

        Args:
            path: where to write; its folder is created.
            results: the bench's own keys.

        Returns:
            `path`.
        """
        self.meta["finished_at"] = _now()
        self.meta["machine"]["load_average_end"] = os.getloadavg()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**results, "meta": self.meta}, indent=2, default=str) + "\n")
        return path


def results_path(name: str) -> Path:
    """Where a bench writes its JSON: `<name>.json` in bench/results/, or in `$CATALOG_EMBED_BENCH_RESULTS`."""
    return Path(os.environ.get(RESULTS_ENV) or ROOT / "bench" / "results") / f"{name}.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _machine() -> dict:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
        "gpus": _gpus(),
    }


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (x86 and most Linux); the architecture elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith(("model name", "Model")))
    return next(names, platform.processor() or platform.machine())


def _gpus() -> list[str]:
    """Each NVIDIA GPU's name and memory, from nvidia-smi (so that a CPU bench need not import torch)."""
    if not shutil.which("nvidia-smi"):
        return []
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    done = subprocess.run(query, capture_output=True, text=True, check=False)
    return done.stdout.strip().splitlines() if done.returncode == 0 else []


def _git() -> dict:
    """The commit the code was at and whether tracked files differed from it (None outside a checkout)."""

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False)
        except OSError:  # no git on the machine
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
