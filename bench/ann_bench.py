"""Approximate nearest-neighbour libraries on synthetic catalogs: build time, memory, queries/s, recall@10.

Candidates are the ANN libraries PyPI offers as wheels for Python 3.11 on this machine: usearch (HNSW) and
faiss-cpu (HNSW and IVF-Flat). hnswlib ships no wheel for 3.11 (its sdist fails to build here) and lancedb
indexes Lance files, not Delta tables, so neither is measured.

Vectors come from a seeded Gaussian mixture (clusters of tracks, as real catalogs have), normalised, so recall
figures mean something: uniform noise in 200 dimensions has no near neighbours to find. Each library runs in its
own child process, so its peak RSS is its own; "index MB" is the RSS the built index added (vectors held by
the index included).
Queries are held-out draws of the same mixture, answered one core at a time; recall@10 is against exact search.

    python bench/ann_bench.py                          # 1,000,000 x 200 and 100,000 x 1728 (minutes)
    python bench/ann_bench.py --n 20000 --n 5000       # the same two shapes, smaller
    python bench/ann_bench.py --smoke                  # 2,000 and 500 vectors: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from harness import BenchRun, console, parse_args, print_table, results_path

SHAPES = ((1_000_000, 200), (100_000, 1728))
K = 10
CANDIDATES = ("usearch-hnsw-f32", "usearch-hnsw-i8", "faiss-hnsw-flat", "faiss-ivf-flat")
SMOKE = {"n": [2_000, 500]}


def mixture(n: int, dim: int, seed: int, clusters: int = 1000, latent: int = 32) -> np.ndarray:
    """`n` unit vectors from a seeded Gaussian mixture of `clusters` components (float32, made in chunks).

    The components live in a `latent`-dimensional subspace (plus a little isotropic noise), as learned embeddings
    do: with full-rank noise in 200 dimensions every point is about equally far from every other and "the" ten
    nearest neighbours are arbitrary. Queries drawn with another seed share the subspace (`seed // 1000`).
    """
    space = np.random.default_rng(seed // 1000)
    basis = space.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    centres = 2.0 * space.standard_normal((clusters, latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        z = centres[rng.integers(0, clusters, stop - start)] + rng.standard_normal((stop - start, latent), np.float32)
        out[start:stop] = z @ basis + 0.05 * rng.standard_normal((stop - start, dim), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by inner product (cosine on unit vectors), in blocks of the data."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(data), 200_000):
        scores = queries @ data[start : start + 200_000].T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argsort(-s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc: VmRSS (now) or VmHWM (peak; unlike ru_maxrss it does not
    inherit the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    msg = f"no {field} in /proc/self/status"
    raise RuntimeError(msg)


def run_candidate(name: str, n: int, dim: int, seed: int, truth_path: str, threads: int) -> dict:
    """Build one index in this process and measure it (the child side)."""
    data = mixture(n, dim, seed)
    queries = mixture(1000, dim, seed + 1)
    truth = np.load(truth_path)
    base = _status_mb("VmRSS")
    started = time.perf_counter()
    if name.startswith("usearch"):
        from usearch.index import Index

        index = Index(ndim=dim, metric="cos", dtype="i8" if name.endswith("i8") else "f32",
                      connectivity=16, expansion_add=128, expansion_search=64)
        index.add(np.arange(n, dtype=np.uint64), data, threads=threads)
        build = time.perf_counter() - started

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q, K, threads=1).keys.astype(np.int64)
    else:
        import faiss

        faiss.omp_set_num_threads(threads)
        if name == "faiss-hnsw-flat":
            index = faiss.IndexHNSWFlat(dim, 16, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 128
            index.add(data)
            index.hnsw.efSearch = 64
        else:
            nlist = int(4 * np.sqrt(n))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(data[np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)])
            index.add(data)
            index.nprobe = 16
        build = time.perf_counter() - started
        faiss.omp_set_num_threads(1)

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q, K)[1]

    started = time.perf_counter()
    found = search(queries)
    seconds = time.perf_counter() - started
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))
    return {
        "library": name,
        "n": n,
        "dim": dim,
        "build_s": build,
        "build_threads": threads,
        "peak_rss_mb": _status_mb("VmHWM"),
        "index_mb": _status_mb("VmRSS") - base,
        "queries_per_s_one_core": len(queries) / seconds,
        "recall_at_10": recall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append",
                        help="vectors per shape, once per shape: 200-d, then 1728-d; 0 skips (default 1e6, 1e5)")
    parser.add_argument("--threads", type=int, default=2, help="threads for building (queries use one)")
    parser.add_argument("--library", action="append", choices=CANDIDATES, help="default: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=4, metavar=("NAME", "N", "DIM", "TRUTH"), help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.child:
        name, n, dim, truth = args.child
        print(json.dumps(run_candidate(name, int(n), int(dim), args.seed, truth, args.threads)))
        return 0

    run = BenchRun("ann", args)
    sizes = args.n or [n for n, _ in SHAPES]
    # faiss-cpu is no dependency of ours (usearch was chosen): where it is missing its candidates are skipped.
    libraries = [name for name in args.library or CANDIDATES if find_spec(name.split("-")[0])]
    skipped = sorted(set(args.library or CANDIDATES) - set(libraries))
    if skipped:
        console.print(f"skipped, their library not installed: {', '.join(skipped)}")
    rows: list[dict] = []
    results = {"rows": rows, "skipped": skipped}
    out = results_path(f"ann_bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    with tempfile.TemporaryDirectory() as tmp:
        for n, (_, dim) in zip(sizes, SHAPES, strict=False):
            if n == 0:  # --n 0 skips a shape
                continue
            truth = Path(tmp) / f"truth-{n}-{dim}.npy"
            data, queries = mixture(n, dim, args.seed), mixture(1000, dim, args.seed + 1)
            started = time.perf_counter()
            np.save(truth, exact_top_k(data, queries, K))
            exact_qps = 1000 / (time.perf_counter() - started)
            del data, queries
            for name in libraries:
                child = subprocess.run(
                    [sys.executable, __file__, "--child", name, str(n), str(dim), str(truth),
                     "--threads", str(args.threads), "--seed", str(args.seed)],
                    capture_output=True, text=True, check=True,
                )
                row = json.loads(child.stdout.strip().splitlines()[-1])
                row["exact_queries_per_s_blas"] = exact_qps
                row["load_avg_1m"] = os.getloadavg()[0]
                rows.append(row)
                console.print(f"{name} {n:,} x {dim}: built in {row['build_s']:.1f} s")
                # Written after every row: a long run that is stopped keeps what it measured.
                run.write(out, results)
    print_table(
        "ANN libraries: build, memory, queries on one core, recall@10 against exact search",
        ("library", "vectors", "build s", "index MB", "peak MB", "q/s, 1 core", "recall@10", "exact q/s", "load"),
        ((row["library"], f"{row['n']:,} x {row['dim']}", f"{row['build_s']:.1f}", f"{row['index_mb']:.0f}",
          f"{row['peak_rss_mb']:.0f}", f"{row['queries_per_s_one_core']:.0f}", f"{row['recall_at_10']:.3f}",
          f"{row['exact_queries_per_s_blas']:.0f}", f"{row['load_avg_1m']:.1f}") for row in rows),
    )  # fmt: skip
    console.print(f"results -> {run.write(out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
