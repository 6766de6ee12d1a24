"""Staged shards: the two halves of "embeddings part last", and what a resumed run keeps of them.

`write_shard` writes a shard's parts with its embeddings part last, so the embeddings part's presence marks the
shard complete; `prune_torn_shards` relies on that when a run is resumed: it deletes the parts of shards a killed
worker left incomplete (they are redone whole) and keeps complete shards only for rows that still match the plan.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES, WINDOWS
from catalog_embed.workers import failpoints
from catalog_embed.workers.shard import ShardOutput


def write_shard(store: TableStore, run_id: str, shard: ShardOutput) -> float:
    """Write one shard's part files, always all of them and the embeddings part last: its presence marks the
    shard complete when a crashed run is resumed (see `prune_torn_shards`).

    Returns:
        Seconds spent writing.
    """
    start = time.perf_counter()
    store.write_part(run_id, FAILURES, shard.name, shard.failures)
    if shard.windows is not None:
        store.write_part(run_id, WINDOWS, shard.name, shard.windows)
    failpoints.hit("write_shard", shard.name)  # a worker lost mid-shard: some parts written, not the last
    store.write_part(run_id, EMBEDDINGS, shard.name, shard.embeddings)
    return time.perf_counter() - start


def prune_torn_shards(
    store: TableStore, run_id: str, listed: Callable[[], Mapping[str, tuple[str, str]]]
) -> tuple[set[str], int]:
    """Make a resumed run's staging hold only what its current plan still wants; return the tracks it keeps (not
    to embed again) and the next attempt number.

    The parts of a shard without its embeddings part (a worker killed mid-shard) are deleted, so the shard is
    redone whole. A complete shard keeps only its rows of tracks the catalog still lists with the same URI and
    fingerprint: the catalog may have been edited in place since the run staged them (a track removed, or pointed
    at another file). Tracks it lists unchanged stay although the plan may skip them now: the run's own commit, cut
    short, may have put them in the tables already. Such a shard's parts are rewritten without those rows, its embeddings part last, so that a crash
    midway leaves a shard this function prunes the same way again. Call this only on a run this process holds.

    Args:
        store: the output store.
        run_id: the run.
        listed: builds track id -> (uri, fingerprint) of every track the catalog lists (only called when the run
            has staged shards to check).
    """
    complete = {posixpath.basename(p) for p in store.staged_parts(run_id, EMBEDDINGS)}
    attempts = [-1]
    for spec in (FAILURES, WINDOWS, EMBEDDINGS):
        for part in store.staged_parts(run_id, spec):
            name = posixpath.basename(part)
            attempts.append(int(name.removeprefix("part-").split("-", 1)[0]))
            if name not in complete:
                store.fs.rm(part)
    kept: set[str] = set()
    files = listed() if complete else {}
    for name in sorted(complete):
        shard = name.removeprefix("part-").removesuffix(".parquet")
        parts = {spec: posixpath.join(store.staging_dir(run_id, spec), name) for spec in (FAILURES, WINDOWS, EMBEDDINGS)}
        rows = {spec: pq.read_table(path, filesystem=store.fs) for spec, path in parts.items() if store.fs.exists(path)}
        keep = {spec: _still_listed(table, files) for spec, table in rows.items() if spec is not WINDOWS}
        embedded = rows[EMBEDDINGS].filter(keep[EMBEDDINGS])["track_id"]
        if WINDOWS in rows:
            keep[WINDOWS] = pc.is_in(rows[WINDOWS]["track_id"], embedded)
        for spec in (FAILURES, WINDOWS, EMBEDDINGS):  # the embeddings part last, as write_shard writes them
            if spec in rows and pc.any(pc.invert(keep[spec])).as_py():
                store.write_part(run_id, spec, shard, rows[spec].filter(keep[spec]))
        for spec in (FAILURES, EMBEDDINGS):
            if spec in rows:
                kept.update(rows[spec].filter(keep[spec])["track_id"].to_pylist())
    return kept, max(attempts) + 1


def _still_listed(rows: pa.Table, files: Mapping[str, tuple[str, str]]) -> pa.Array:
    """Which staged rows are of a track the catalog lists with the same URI and fingerprint."""
    staged = zip(
        rows["track_id"].to_pylist(), rows["source_uri"].to_pylist(), rows["source_fingerprint"].to_pylist(), strict=True
    )
    return pa.array([files.get(track) == (uri, fingerprint) for track, uri, fingerprint in staged], pa.bool_())


def staged_counts(store: TableStore, run_id: str, model: str) -> tuple[int, int, float]:
    """(tracks embedded, tracks failed, audio seconds) staged by a run for `model` over all its attempts."""
    embedded = store.read_staged(run_id, EMBEDDINGS)
    embedded = embedded.filter(pc.equal(embedded["model"], model))
    failed = store.read_staged(run_id, FAILURES)
    failed = failed.filter(pc.equal(failed["model"], model))
    return embedded.num_rows, failed.num_rows, float(pc.sum(embedded["duration_s"]).as_py() or 0.0)
