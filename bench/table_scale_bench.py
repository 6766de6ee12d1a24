"""A million-row embeddings table: committing a run of that many tracks, then `query`, `similar` and `index` on it.

Stages one run of `--rows` tracks (clustered float32 vectors of `--dim`, `tests/helpers/tables.mixture`) the way the
embed job's workers do, as part files of `--shard-rows` rows under `<out>/_staging/<run_id>/`, then measures each
step as a process of its own, its wall time, CPU time and peak RSS read from the kernel (`harness.run_process`):

1. commit: `commit_run` of the staged run into an empty output root (reading the staged parts, the embeddings
   merge, the failures and windows steps, the `runs` row, dropping the staging);
2. query: `catalog-embed query` counting live rows and averaging a column over the whole table;
3. similar, exact: `catalog-embed similar --search exact` for one track (every vector read and compared);
4. index: `catalog-embed index` (usearch HNSW over every vector);
5. similar, index: `catalog-embed similar --search index` for the same track.

    python bench/table_scale_bench.py [--rows 1000000] [--dim 200] [--shard-rows 10000] [--work /tmp/table-scale]

Prints a table and writes bench/results/table_scale.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from harness import BenchRun, console, parse_args, print_table, results_path, run_process

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import TrackEmbedding, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS
from catalog_embed.workers.rows import RowContext, embedding_rows
from tests.helpers.tables import mixture

MODEL = "synthetic"
RUN_ID = "table-scale"
SMOKE = {"rows": 2000, "dim": 8, "shard_rows": 500, "work": None}
COMMIT = """
import sys
from catalog_embed.pipelines.embed.lifecycle.commit import commit_run
from catalog_embed.pipelines.io.store import TableStore
from tests.helpers.tables import run_row
commit_run(TableStore(sys.argv[1]), sys.argv[2], run_row(sys.argv[2]))
"""


def stage(out: Path, rows: int, dim: int, shard_rows: int) -> int:
    """Create the tables (as `embed` does before its run) and write `rows` tracks' embeddings as staged part files
    of run `RUN_ID`; returns their bytes."""
    store = TableStore(str(out))
    store.ensure_tables()
    ctx = RowContext(RUN_ID, MODEL, ("pooled",), "v1", "h1")
    staged = 0
    for shard, start in enumerate(range(0, rows, shard_rows)):
        vectors = mixture(min(shard_rows, rows - start), dim, seed=shard)
        tracks = [
            TrackEmbedding(WorkItem(f"t{start + i:08d}", f"/audio/t{start + i:08d}.wav", "size=1"), 30.0, 10,
                           {"pooled": vector})
            for i, vector in enumerate(vectors)
        ]  # fmt: skip
        path = store.write_part(RUN_ID, EMBEDDINGS, f"{shard:06d}", embedding_rows(tracks, ctx))
        staged += store.fs.size(path)
    return staged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--shard-rows", type=int, default=10_000, help="tracks per staged part file")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "table-scale", help="scratch")
    args = parse_args(parser, SMOKE)
    run = BenchRun("table_scale", args)
    work = args.work or Path(tempfile.mkdtemp(prefix="table-scale-"))
    out = work / "tables"
    shutil.rmtree(out, ignore_errors=True)
    console.print(f"staging {args.rows:,} rows of {args.dim} floats in {out}")
    staged = stage(out, args.rows, args.dim, args.shard_rows)
    cli = [sys.executable, "-m", "catalog_embed.pipelines.cli"]
    track = "t00000042"
    steps = {
        "commit": [sys.executable, "-c", COMMIT, str(out), RUN_ID],
        "query": [*cli, "query", "--out", str(out), "--json",
                  "SELECT count(*) AS live, avg(duration_s) AS mean_s FROM embeddings WHERE NOT deleted"],
        "similar, exact": [*cli, "similar", "--out", str(out), "--track", track, "--search", "exact", "--json"],
        "index": [*cli, "index", "--out", str(out)],
        "similar, index": [*cli, "similar", "--out", str(out), "--track", track, "--search", "index", "--json"],
    }  # fmt: skip
    results: dict[str, object] = {"rows": args.rows, "dim": args.dim, "staged_bytes": staged, "steps": {}}
    for name, cmd in steps.items():
        usage = run_process(cmd)
        results["steps"][name] = {"wall_s": usage.wall_s, "cpu_s": usage.cpu_s, "peak_rss_mb": usage.peak_rss_mb}
        console.print(f"{name}: {usage.wall_s:.1f} s, peak RSS {usage.peak_rss_mb:,.0f} MB")
        if name == "query":
            results["live_rows"] = int(usage.stdout.split('"live": ')[1].split(",")[0])
        run.write(results_path("table_scale"), results)
    assert results["live_rows"] == args.rows, results
    print_table(
        f"an embeddings table of {args.rows:,} rows x {args.dim} floats ({staged / 2**20:,.0f} MB staged)",
        ("step", "wall s", "CPU s", "peak RSS MB"),
        ((name, s["wall_s"], s["cpu_s"], s["peak_rss_mb"]) for name, s in results["steps"].items()),
    )
    console.print(f"wrote {results_path('table_scale')}")
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
