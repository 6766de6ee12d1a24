"""The overlapped loop keeps its decode children busy while the encoder runs: a thread iterates the decode pool into
a bounded queue (a pool hands out work only while it is iterated), and what goes wrong there reaches the run."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from catalog_embed.schemas.errors import WorkerError
from catalog_embed.schemas.records import TrackFailure, WorkItem
from catalog_embed.workers.isolation import IsolatedPool
from catalog_embed.workers.overlap import DecodeFeeder
from catalog_embed.workers.stages import DecodeStage, EncoderConfig, TrackFeatures

AHEAD = 3
# Generous: decoding three 4 s tracks takes well under a second; the wait ends as soon as they are decoded.
DEADLINE_S = 120.0


def _items(catalog) -> list[WorkItem]:
    return [WorkItem(row["track_id"], row["uri"], "") for row in pq.read_table(catalog.manifest_path).to_pylist()]


def test_tracks_are_decoded_ahead_while_nobody_takes_them(small_catalog):
    """Nothing consumes the decoded tracks (as while the encoder runs), yet the queue fills up to its bound and no
    further; then every track comes out, in plan order."""
    items = _items(small_catalog)
    stage = DecodeStage(EncoderConfig(model="chroma-stats"))
    with IsolatedPool(stage, 1, 60.0, 4096) as pool, DecodeFeeder(pool, items, AHEAD) as decoded:
        deadline = time.monotonic() + DEADLINE_S
        while decoded._queue.qsize() < AHEAD and time.monotonic() < deadline:
            time.sleep(0.05)
        assert decoded._queue.qsize() == AHEAD
        results = [result for result, _seconds in (next(decoded) for _ in items)]
    assert [r.item.track_id for r in results] == [item.track_id for item in items]
    assert {type(r) for r in results} == {TrackFeatures, TrackFailure}  # the catalog holds broken files too


def test_a_decode_worker_that_cannot_start_fails_the_run(small_catalog):
    stage = DecodeStage(EncoderConfig(model="no-such-encoder"))
    with IsolatedPool(stage, 1, 60.0, 4096) as pool, DecodeFeeder(pool, _items(small_catalog), AHEAD) as decoded:
        with pytest.raises(WorkerError, match="died while starting"):
            next(decoded)
