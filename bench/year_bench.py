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

Bytes do not depend on the machine's load; seconds do (the load average is printed next to them).

    python bench/year_bench.py [--tracks 2000] [--dim 200] [--nights 365] [--no-maintain] [--prune] [--vacuum-every 7]
                               [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.cli import main as cli
from catalog_embed.pipelines.embed.lifecycle.commit import KEYS, commit_run
from catalog_embed.pipelines.embed.maintain import maintain
from catalog_embed.pipelines.embed.plan import Request, RunLimits, read_state
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import TrackEmbedding, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, RUNS, TABLES
from catalog_embed.workers.rows import RowContext, embedding_rows

MODEL = "synthetic"
CHART_NIGHTS = (1, 30, 90, 180, 365)


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


def run_row(run_id: str) -> pa.Table:
    now = datetime.now(UTC)
    values = {
        f.name: now if pa.types.is_timestamp(f.type) else 0 if pa.types.is_integer(f.type)
        else 0.0 if pa.types.is_floating(f.type) else "bench"
        for f in RUNS.schema
    }
    return pa.Table.from_pylist([values | {"run_id": run_id}], schema=RUNS.schema)


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


def night_kinds(tracks: int, dim: int, seed: int) -> list[dict]:
    """Item 3: one night of each kind on a fresh table of `tracks` rows."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "out"
        store = TableStore(str(root))
        store.ensure_tables()
        catalog = Catalog(tracks, dim, seed)
        commit_night(store, "night-0", catalog.vectors(catalog.live), [])
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


def median_s(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    return {
        "night": night,
        "files": files,
        "log_entries": len(commits),
        "replayed_entries": sum(1 for c in commits if c > (checkpoints[-1] if checkpoints else -1)),
        "checkpoints": len(checkpoints),
        "plan_s": median_s(lambda: plan_state(store)),
        "query_s": median_s(lambda: connect(str(root)).execute(
            "SELECT count(*), avg(n_windows) FROM embeddings WHERE NOT deleted").fetchall()),
        "similar_s": median_s(lambda: similar(root, catalog.live[0])),
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
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "out"
        store = TableStore(str(root))
        store.ensure_tables()
        catalog = Catalog(tracks, dim, seed)
        commit_night(store, "night-0", catalog.vectors(catalog.live), [])
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
                shutil.copytree(root, Path(tmp) / "night-1")
        return night_one_vs_last(Path(tmp) / "night-1", root, catalog.live[0])


def night_one_vs_last(first: Path, last: Path, track: str, rounds: int = 9) -> dict:
    """Plan and `similar` on the night-1 tables and the last night's, alternated so both see the same load: the
    ratio of their medians is what the year did to them, not what the machine's neighbours did."""
    times: dict[str, list[float]] = {f"{what}_{which}": [] for what in ("plan", "similar") for which in ("first", "last")}
    for _ in range(rounds):
        for which, root in (("first", first), ("last", last)):
            store = TableStore(str(root))
            times[f"plan_{which}"].append(median_s(lambda store=store: plan_state(store), 1))
            times[f"similar_{which}"].append(median_s(lambda root=root: similar(root, track), 1))
    medians = {name: statistics.median(values) for name, values in times.items()}
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
    parser.add_argument("--json", default="bench/results/year.json")
    args = parser.parse_args()
    result: dict = {
        "tracks": args.tracks, "dim": args.dim, "maintain": not args.no_maintain, "prune": args.prune,
        "vacuum_every": args.vacuum_every,
        "cpus": os.cpu_count(),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_kinds:
        result["night_kinds"] = night_kinds(args.tracks, args.dim, args.seed)
        print(f"{'night':<22}{'table B':>12}{'changed B':>12}{'written B':>12}{'read B':>12}{'written/table':>15}")
        for r in result["night_kinds"]:
            print(f"{r['night']:<22}{r['table_bytes']:>12,}{r['changed_bytes']:>12,}{r['written_bytes']:>12,}"
                  f"{r['read_bytes']:>12,}{r['written_over_table']:>15.1%}")
        out.write_text(json.dumps(result, indent=2))
    result["year"] = []
    print(f"{'night':>6}{'files e/w/f/r':>16}{'log':>6}{'replay':>7}{'ckpt':>5}{'plan s':>8}{'query s':>8}"
          f"{'similar s':>10}{'live MB':>9}{'storage MB':>11}{'wrote MB':>9}{'load':>6}")

    def on_row(r: dict) -> None:
        result["year"].append(r)
        out.write_text(json.dumps(result, indent=2))
        files = "/".join(str(r["files"][name]) for name in ("embeddings", "windows", "failures", "runs"))
        print(f"{r['night']:>6}{files:>16}{r['log_entries']:>6}{r['replayed_entries']:>7}{r['checkpoints']:>5}"
              f"{r['plan_s']:>8.3f}{r['query_s']:>8.3f}{r['similar_s']:>10.3f}{r['live_bytes'] / 1e6:>9.2f}"
              f"{r['storage_bytes'] / 1e6:>11.2f}{r['written_last_night'] / 1e6:>9.2f}{r['load']:>6.1f}", flush=True)

    result["night_one_vs_last"] = ratio = year(
        args.tracks, args.dim, args.nights, not args.no_maintain, args.prune, args.vacuum_every, args.seed, on_row
    )
    out.write_text(json.dumps(result, indent=2))
    print(f"night {args.nights} against night 1, alternated (medians of 9): plan {ratio['plan_ratio']:.2f}x "
          f"({ratio['plan_last']:.3f} s / {ratio['plan_first']:.3f} s), similar {ratio['similar_ratio']:.2f}x "
          f"({ratio['similar_last']:.3f} s / {ratio['similar_first']:.3f} s)")


if __name__ == "__main__":
    main()
