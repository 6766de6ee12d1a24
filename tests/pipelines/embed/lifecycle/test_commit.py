"""Committing a run: a step is skipped only for the same content, and one rule for rows a re-embed makes stale."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.embed.lifecycle.commit import commit_run
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import TrackEmbedding, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, RUNS
from catalog_embed.workers.failpoints import ENV as FAILPOINTS
from catalog_embed.workers.failpoints import FailpointError
from catalog_embed.workers.rows import RowContext, embedding_rows
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers.faults import catalog_of, expected_tracks
from tests.helpers.tables import run_row

QUIET = Console(quiet=True)
MFCC = EncoderConfig(model="mfcc-stats")


def _stage(store: TableStore, run_id: str, part: str, tracks: list[str]) -> None:
    ctx = RowContext(run_id, "enc", ("stats",), "v1", "h1")
    rows = [TrackEmbedding(WorkItem(t, f"/audio/{t}.wav", "size=1"), 4.0, 1, {"stats": np.ones(4, np.float32)})
            for t in tracks]
    store.write_part(run_id, EMBEDDINGS, part, embedding_rows(rows, ctx))


def test_rows_staged_after_a_commit_stopped_midway_are_committed_not_skipped(tmp_path, monkeypatch):
    store = TableStore(str(tmp_path / "out"))
    store.ensure_tables()
    _stage(store, "r1", "000-000000", ["t1"])
    monkeypatch.setenv(FAILPOINTS, "commit.runs=raise*1")
    with pytest.raises(FailpointError):
        commit_run(store, "r1", run_row("r1"))  # stopped after the embeddings step, before the runs row
    _stage(store, "r1", "001-000000", ["t2"])  # what a run that resumed r1 staged since
    commit_run(store, "r1", run_row("r1"))
    assert sorted(store.read(EMBEDDINGS)["track_id"].to_pylist()) == ["t1", "t2"]
    assert store.read(RUNS)["run_id"].to_pylist() == ["r1"]


@pytest.fixture
def catalog(small_catalog, small_labels, tmp_path) -> tuple[str, list[str]]:
    good, _ = expected_tracks(small_labels)
    return catalog_of(small_catalog, tmp_path / "catalog", lambda t: t in good[:3]), good[:3]


def _uri(catalog: str, track: str) -> Path:
    table = pq.read_table(catalog).to_pylist()
    return Path(catalog).parent / next(r["uri"] for r in table if r["track_id"] == track)


def _replace_file(catalog: str, track: str, source: Path) -> None:
    """The catalog's file for `track` replaced in place by the bytes of `source` (another recording)."""
    target = _uri(catalog, track)
    shutil.copyfile(source, target)


def test_a_track_re_embedded_without_its_timeline_loses_its_old_timeline(catalog, tmp_path):
    manifest, tracks = catalog
    out = str(tmp_path / "out")
    run_embed(EmbedConfig(catalog=manifest, out=out, encoder=MFCC, write_windows=True), QUIET)
    _replace_file(manifest, tracks[0], _uri(manifest, tracks[1]))
    again = run_embed(EmbedConfig(catalog=manifest, out=out, encoder=MFCC), QUIET)
    assert [i.track_id for i in again.plan.items] == [tracks[0]]
    windows = connect(out).execute("SELECT track_id FROM windows ORDER BY 1").fetchall()
    assert windows == [(t,) for t in tracks[1:]]  # never another recording's timeline


def test_a_changed_file_that_fails_retires_its_rows_and_an_unchanged_one_keeps_them(catalog, tmp_path, monkeypatch):
    manifest, (changed, unchanged, _) = catalog
    timelines, plain = str(tmp_path / "timelines"), str(tmp_path / "plain")
    run_embed(EmbedConfig(catalog=manifest, out=timelines, encoder=MFCC, write_windows=True), QUIET)
    run_embed(EmbedConfig(catalog=manifest, out=plain, encoder=MFCC), QUIET)
    _uri(manifest, changed).write_bytes(b"not audio any more")
    # In `plain`, asking for the timeline plans every track again; the unchanged file then fails transiently.
    monkeypatch.setenv(FAILPOINTS, f"encode=raise:{unchanged}")
    for out in (timelines, plain):
        run_embed(EmbedConfig(catalog=manifest, out=out, encoder=MFCC, write_windows=True, max_failure_ratio=1.0), QUIET)
    con = connect(timelines)
    assert changed not in _tracks(con, "embeddings") and changed not in _tracks(con, "windows")
    assert _tracks(con, "failures") == [changed]
    con = connect(plain)
    assert _tracks(con, "embeddings") == sorted(set(catalog[1]) - {changed})  # the unchanged file's row stays
    assert _tracks(con, "failures") == sorted([changed, unchanged])


def _tracks(con, table: str) -> list[str]:
    live = " WHERE NOT deleted" if table == "embeddings" else ""
    return [r[0] for r in con.execute(f"SELECT track_id FROM {table}{live} ORDER BY 1").fetchall()]
