"""A year of nights: what a night writes against what it changed, and what grows over 365 incremental runs.

Rows go through the real commit path (`commit_run`: staged part files, the embed merge rules, the `runs` row) with
synthetic vectors instead of decoded audio, so a night costs what committing costs.

1. Night kinds (issue 20 item 3): on a table of --tracks rows, one night each of new tracks only (1%), 1% re-encoded,
   1% removed (marked deleted). For each: bytes the embeddings table's log added and removed, bytes the process read
   (/proc/self/io rchar), and the bytes of the changed rows (their staged Parquet), next to the table's bytes.
2. A year (item 4): --nights nights, each re-encoding 1%, adding 1% and removing 1% of the live tracks, followed by
   `maintain` unless --no-maintain (as the nightly recipes in infra/ run it). Leaving tracks are marked `deleted`
   (the default, so the table keeps 1% more rows each night) or deleted with --prune (the table's size stays flat). At nights 1, 30, 90, 180 and 365: files
   per table, log entries (JSON commits on storage, and since the last checkpoint: what a reader replays),
   checkpoints, plan time (reading the state `plan` reads), a DuckDB query and `similar` (medians of 3), live bytes
   and bytes on storage (every --vacuum-every nights, 7 by default, replaced files are vacuumed, as a nightly
   `vacuum` with its 7-day retention would). At the end, plan and `similar` on the night-1 tables and the last
   night's, alternated so that both see the same load.

Bytes do not depend on the machine's load; seconds do (the load average is printed next to them). Prints a table
of the night kinds and one of the year, and writes bench/results/year.json (again after every charted night, so a
long run keeps what it measured).

    python bench/year_bench.py [--tracks 2000] [--dim 200] [--nights 365] [--no-maintain] [--prune] [--vacuum-every 7]
                               [--skip-kinds] [--seed 0] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from harness import BenchRun, console, parse_args, print_table, results_path, time_rounds

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.cli import main as cli
from catalog_embed.pipelines.embed.lifecycle.commit import KEYS, commit_run
from catalog_embed.pipelines.embed.maintain import maintain
from catalog_embed.pipelines.embed.plan import Request, RunLimits, read_state
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import TrackEmbedding, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, TABLES
from catalog_embed.workers.rows import RowContext, embedding_rows
from tests.helpers.tables import run_row

MODEL = "synthetic"
CHART_NIGHTS = (1, 30, 90, 180, 365)
# Every kind of night and two nights of the year (the second vacuumed and charted), on a small table.
SMOKE = {"tracks": 200, "dim": 8, "nights": 2, "vacuum_every": 2}


class Catalog:
    """The live track ids and a random source of nights over them."""

    def __init__(self, tracks: int, dim: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.next_id = 0
        self.live: list[str] = self.new(tracks)

    def new(self, n: int) -> list[str]:
        ids = [f"t{self.next_id + i:08d}" for i in range(n)]
        self.next_id += n
        return ids

    def pick(self, n: int) -> list[str]:
        return [self.live[i] for i in self.rng.choice(len(self.live), n, replace=False)]

    def vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(ids, self.rng.standard_normal((len(ids), self.dim)).astype(np.float32), strict=True))


def commit_night(
    store: TableStore, run_id: str, vectors: dict[str, np.ndarray], gone: list[str], prune: bool = False
) -> int:
    """Commit one night through the embed commit path; returns the bytes of its staged rows."""
    ctx = RowContext(run_id, MODEL, ("pooled",), "v1", "h1")
    staged = 0
    if vectors:
        items = [TrackEmbedding(WorkItem(t, f"/audio/{t}.wav", "size=1"), 6.0, 2, {"pooled": v}) for t, v in vectors.items()]
        path = store.write_part(run_id, EMBEDDINGS, "000000", embedding_rows(items, ctx))
        staged = store.fs.size(path)
    keys = pa.table({"model": [MODEL] * len(gone), "track_id": gone}, schema=KEYS)
    commit_run(store, run_id, run_row(run_id), gone=keys, prune=prune)
    return staged


def log_bytes(root: Path, since: int) -> tuple[int, int]:
    """Bytes of the files the embeddings log added and removed in commits after version `since`."""
    added = removed = 0
    for entry in sorted((root / "embeddings" / "_delta_log").glob("*.json")):
        if int(entry.stem) <= since:
            continue
        for line in entry.read_text().splitlines():
            action = json.loads(line)
            added += action.get("add", {}).get("size", 0)
            removed += action.get("remove", {}).get("size", 0) or 0
    return added, removed


def rchar() -> int:
    """Bytes this process has read through read() calls so far (page cache included: load-independent)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def table_bytes(store: TableStore) -> int:
    actions = pa.table(store.table(EMBEDDINGS).get_add_actions(flatten=False))
    return sum(actions["size_bytes"].to_pylist())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def first_night(tracks: int, dim: int, seed: int) -> Iterator[tuple[Path, TableStore, Catalog]]:
    """A temporary folder holding tables of `tracks` rows, committed as night 0; yields it, their store (the
    tables are at `<folder>/out`) and the catalog."""
    with tempfile.TemporaryDirectory() as tmp:
        store = TableStore(str(Path(tmp) / "out"))
        store.ensure_tables()
        catalog = Catalog(tracks, dim, seed)
        commit_night(store, "night-0", catalog.vectors(catalog.live), [])
        yield Path(tmp), store, catalog


def night_kinds(tracks: int, dim: int, seed: int) -> list[dict]:
    """Item 3: one night of each kind on a fresh table of `tracks` rows."""
    rows = []
    with first_night(tracks, dim, seed) as (tmp, store, catalog):
        root = tmp / "out"
        n = max(1, tracks // 100)
        kinds: list[tuple[str, Callable[[], tuple[dict, list]]]] = [
            ("new tracks only (1%)", lambda: (catalog.vectors(catalog.new(n)), [])),
            ("1% re-encoded", lambda: (catalog.vectors(catalog.pick(n)), [])),
            ("1% removed", lambda: ({}, catalog.pick(n))),
        ]
        for i, (kind, make) in enumerate(kinds, 1):
            vectors, gone = make()
            before, total = store.table(EMBEDDINGS).version(), table_bytes(store)
            read0 = rchar()
            staged = commit_night(store, f"night-{i}", vectors, gone)
            read = rchar() - read0
            added, removed = log_bytes(root, before)
            # A removed track's changed bytes are its row's, as a staged row of it would have been.
            changed = staged or round(total / store.table(EMBEDDINGS).to_pyarrow_table(columns=["track_id"]).num_rows * n)
            rows.append({
                "night": kind, "table_bytes": total, "changed_bytes": changed, "written_bytes": added,
                "removed_bytes": removed, "read_bytes": read, "written_over_table": added / total,
                "written_over_changed": added / changed,
            })
            catalog.live = [t for t in catalog.live if t not in set(gone)] + [t for t in vectors if t not in catalog.live]
    return rows


def plan_state(store: TableStore) -> None:
    """What `plan` reads from the tables (the diff against the catalog itself does not depend on the tables)."""
    read_state(store, MODEL, Request(("pooled",), False, RunLimits(600.0, 0.0, 4096.0, 60.0)))


def similar(root: Path, track: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        cli(["similar", "--out", str(root), "--track", track, "--k", "10"])


def chart_row(night: int, root: Path, store: TableStore, catalog: Catalog, written: int) -> dict:
    files = {spec.name: len(store.table(spec).file_uris()) for spec in TABLES.values()}
    log = root / "embeddings" / "_delta_log"
    commits = sorted(int(p.stem) for p in log.glob("*.json"))
    checkpoints = sorted(int(p.name.split(".")[0]) for p in log.glob("*.checkpoint*.parquet"))
    track = catalog.live[0]
    timings = time_rounds(
        {
            "plan_s": lambda: plan_state(store),
            "query_s": lambda: connect(str(root)).execute(
                "SELECT count(*), avg(n_windows) FROM embeddings WHERE NOT deleted").fetchall(),
            "similar_s": lambda: similar(root, track),
        },
        3,
    )  # fmt: skip
    return {
        "night": night,
        "files": files,
        "log_entries": len(commits),
        "replayed_entries": sum(1 for c in commits if c > (checkpoints[-1] if checkpoints else -1)),
        "checkpoints": len(checkpoints),
        **{name: timing.median_wall for name, timing in timings.items()},
        "live_bytes": table_bytes(store),
        "storage_bytes": folder_bytes(root),
        "written_last_night": written,
        "load": os.getloadavg()[0],
    }


def year(
    tracks: int, dim: int, nights: int, run_maintain: bool, prune: bool, vacuum_every: int, seed: int,
    on_row: Callable[[dict], None],
) -> dict:
    """Run the nights, reporting chart rows to `on_row`; returns `night_one_vs_last`."""
    with first_night(tracks, dim, seed) as (tmp, store, catalog):
        root = tmp / "out"
        for night in range(1, nights + 1):
            n = max(1, len(catalog.live) // 100)
            changed, gone, arrived = catalog.pick(n), catalog.pick(n), catalog.new(n)
            gone = [t for t in gone if t not in set(changed)]
            before = store.table(EMBEDDINGS).version()
            commit_night(store, f"night-{night}", catalog.vectors(changed + arrived), gone, prune)
            written = log_bytes(root, before)[0]
            catalog.live = [t for t in catalog.live if t not in set(gone)] + arrived
            if run_maintain:
                maintain(str(root))
            if vacuum_every and night % vacuum_every == 0:
                # Nights here are seconds apart: removing every replaced file each `vacuum_every` nights leaves at
                # most that many nights of them, as `vacuum` with a week's retention does on a nightly schedule.
                for spec in TABLES.values():
                    store.table(spec).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
            if night in CHART_NIGHTS or night == nights:
                on_row(chart_row(night, root, store, catalog, written))
            if night == 1:
                shutil.copytree(root, tmp / "night-1")
        return night_one_vs_last(tmp / "night-1", root, catalog.live[0])


def night_one_vs_last(first: Path, last: Path, track: str, rounds: int = 9) -> dict:
    """Plan and `similar` on the night-1 tables and the last night's, alternated so both see the same load: the
    ratio of their medians is what the year did to them, not what the machine's neighbours did."""
    calls: dict[str, Callable[[], object]] = {}
    for which, root in (("first", first), ("last", last)):
        store = TableStore(str(root))
        calls[f"plan_{which}"] = lambda store=store: plan_state(store)
        calls[f"similar_{which}"] = lambda root=root: similar(root, track)
    medians = {name: timing.median_wall for name, timing in time_rounds(calls, rounds).items()}
    return medians | {
        "plan_ratio": medians["plan_last"] / medians["plan_first"],
        "similar_ratio": medians["similar_last"] / medians["similar_first"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--no-maintain", action="store_true")
    parser.add_argument("--prune", action="store_true", help="delete leaving tracks (default: mark them deleted)")
    parser.add_argument("--skip-kinds", action="store_true", help="only the year")
    parser.add_argument("--vacuum-every", type=int, default=7, help="nights between vacuums (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, SMOKE)
    run = BenchRun("year", args)
    path = results_path("year")
    result: dict = {
        "tracks": args.tracks, "dim": args.dim, "maintain": not args.no_maintain, "prune": args.prune,
        "vacuum_every": args.vacuum_every,
    }
    if not args.skip_kinds:
        result["night_kinds"] = night_kinds(args.tracks, args.dim, args.seed)
        print_table(
            f"one night of each kind on {args.tracks:,} tracks",
            ("night", "table B", "changed B", "written B", "read B", "written/table"),
            ((r["night"], f"{r['table_bytes']:,}", f"{r['changed_bytes']:,}", f"{r['written_bytes']:,}",
              f"{r['read_bytes']:,}", f"{r['written_over_table']:.1%}") for r in result["night_kinds"]),
        )  # fmt: skip
        run.write(path, result)
    result["year"] = []

    def on_row(r: dict) -> None:
        result["year"].append(r)
        run.write(path, result)
        console.print(f"night {r['night']} of {args.nights} charted (load {r['load']:.1f})")

    result["night_one_vs_last"] = ratio = year(
        args.tracks, args.dim, args.nights, not args.no_maintain, args.prune, args.vacuum_every, args.seed, on_row
    )
    run.write(path, result)
    print_table(
        f"{args.nights} nights on {args.tracks:,} tracks: at charted nights (seconds: medians of 3)",
        ("night", "files e/w/f/r", "log", "replay", "ckpt", "plan s", "query s", "similar s", "live MB", "storage MB",
         "wrote MB", "load"),
        ((str(r["night"]), "/".join(str(r["files"][name]) for name in ("embeddings", "windows", "failures", "runs")),
          str(r["log_entries"]), str(r["replayed_entries"]), str(r["checkpoints"]), f"{r['plan_s']:.3f}",
          f"{r['query_s']:.3f}", f"{r['similar_s']:.3f}", f"{r['live_bytes'] / 1e6:.2f}",
          f"{r['storage_bytes'] / 1e6:.2f}", f"{r['written_last_night'] / 1e6:.2f}", f"{r['load']:.1f}")
         for r in result["year"]),
    )  # fmt: skip
    console.print(f"night {args.nights} against night 1, alternated (medians of 9): plan "
                  f"{ratio['plan_ratio']:.2f}x ({ratio['plan_last']:.3f} s / {ratio['plan_first']:.3f} s), similar "
                  f"{ratio['similar_ratio']:.2f}x ({ratio['similar_last']:.3f} s / {ratio['similar_first']:.3f} s)")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
