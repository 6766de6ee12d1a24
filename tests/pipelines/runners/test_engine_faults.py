"""Faults on the distributed runners: a Beam bundle repeated after a failure, a Ray worker killed mid-run, and the
driver of a Beam or a Ray run killed mid-run and then mid-commit.

Each scenario ends with every good track exactly once in `embeddings` and every bad one exactly once in
`failures`. Kills are real `kill -9`s of processes found by their titles, or the failpoint `exit`, which ends the
process the same way at an exact point (see `catalog_embed.workers.failpoints`).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import STAGING
from catalog_embed.pipelines.runners.beam import BeamRunner
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES
from catalog_embed.workers.failpoints import ENV as FAILPOINTS
from tests.helpers.faults import (
    alive,
    embed_process,
    expected_tracks,
    finish,
    kill_session,
    session_processes,
    staged_embedding_parts,
    table_tracks,
    wait_for,
)

pytestmark = pytest.mark.slow
QUIET = Console(quiet=True)
SHARD_SIZE = 2


def _shard_of(track_id: str, manifest: Path) -> str:
    """The part name of the shard holding `track_id` in a first attempt (every track planned, manifest order)."""
    order = pq.read_table(manifest)["track_id"].to_pylist()
    return f"000-{order.index(track_id) // SHARD_SIZE:06d}"


def test_beam_repeats_a_failed_bundle_and_every_track_lands_once(small_catalog, small_labels, tmp_path, monkeypatch,
                                                                  caplog):
    """Beam retries a failed bundle (Dataflow up to four times in batch); the failed attempt's side effects stay.
    Beam's bundle-based DirectRunner retries as Dataflow does (the default FnApi one fails the job at once). Here
    the first attempt at writing a shard holding a bad track dies after its `failures` part and before its
    `embeddings` part, and the first attempt at the commit dies after committing `failures`; the retries write the
    parts again under the same names and skip the commit steps already in the tables."""
    good, bad = expected_tracks(small_labels)
    shard = _shard_of(bad[0], small_catalog.manifest_path)
    monkeypatch.setattr(BeamRunner, "pipeline_options", lambda self, job: PipelineOptions(runner="BundleBasedDirectRunner"))
    monkeypatch.setenv(FAILPOINTS, f"write_shard=raise*1:{shard};commit.embeddings=raise*1")
    out = str(tmp_path / "out")
    config = EmbedConfig(catalog=str(small_catalog.manifest_path), out=out, runner="beam", shard_size=SHARD_SIZE)
    with caplog.at_level(logging.ERROR, logger="apache_beam.runners.direct.executor"):
        summary = run_embed(config, QUIET)
    retried = " ".join(r.getMessage() for r in caplog.records)
    assert "failpoint write_shard" in retried and "failpoint commit.embeddings" in retried, "no bundle was retried"
    assert table_tracks(out) == (good, bad)
    assert (summary.stats.n_embedded, summary.stats.n_failed) == (len(good), len(bad))
    assert connect(out).execute("SELECT n_embedded, n_failed FROM runs").fetchall() == [(len(good), len(bad))]


@pytest.mark.parametrize("runner", ["beam", "ray"])
def test_driver_killed_mid_run_then_mid_commit_then_the_rerun_finishes(small_catalog, small_labels, tmp_path, runner):
    """Run 1 is killed (its whole session: Ray's head and workers, Beam's decode processes) while writing a shard:
    that shard's `failures` part is staged, its `embeddings` part is not. Run 2 resumes, embeds that shard again
    and dies between committing `failures` and `embeddings`. Run 3 finishes the commit."""
    good, bad = expected_tracks(small_labels)
    manifest = small_catalog.manifest_path
    shard = _shard_of(bad[0], manifest)
    out = str(tmp_path / "out")
    args = (str(manifest), out, "--runner", runner, "--shard-size", str(SHARD_SIZE), "--workers", "1")

    first = embed_process(*args, failpoints=f"write_shard=hang:{shard}")

    def mid_shard() -> bool:
        staging = Path(out, STAGING)
        return any(staging.glob(f"*/{FAILURES.name}/*-{shard}.parquet")) and not any(
            staging.glob(f"*/{EMBEDDINGS.name}/*-{shard}.parquet")
        )

    wait_for(mid_shard, first, f"shard {shard} was half written")
    staged_before_kill = staged_embedding_parts(out)
    kill_session(first)
    assert table_tracks(out) == ([], [])  # nothing committed: staged parts are invisible

    second = embed_process(*args, failpoints="commit.embeddings=exit")
    log = finish(second)
    assert second.returncode == 137, log
    resumed = int(log.split("resuming run ", 1)[1].split(": ", 1)[1].split(" ", 1)[0])
    assert resumed == staged_before_kill * SHARD_SIZE  # the staged shards were not embedded again
    assert table_tracks(out) == ([], bad)  # died mid-commit: failures are in, once, embeddings are not

    third = embed_process(*args)
    log = finish(third)
    assert third.returncode == 0, log
    assert table_tracks(out) == (good, bad)
    con = connect(out)
    assert con.execute("SELECT count(*), max(n_embedded), max(n_failed) FROM runs").fetchone() == (1, len(good), len(bad))


def test_a_killed_ray_worker_costs_no_track(small_catalog, small_labels, tmp_path):
    """Once shards are being staged, kill -9 the Ray workers running decode tasks (their decode children go with
    them) and the encoder actor. Ray runs the tasks again in new workers and restarts the actor. A file near the end
    of the catalog hangs its decoder, so the run is still going whenever the kill lands; the hang costs its track
    one `DecodeTimeout` row, and nothing else is lost or written twice."""
    good, bad = expected_tracks(small_labels)
    manifest = small_catalog.manifest_path
    order = pq.read_table(manifest)["track_id"].to_pylist()
    stuck = next(track for track in reversed(order) if track in good)
    out = str(tmp_path / "out")
    proc = embed_process(
        str(manifest), out, "--runner", "ray", "--shard-size", str(SHARD_SIZE), "--workers", "2",
        "--decode-timeout", "20", failpoints=f"decode=hang:{stuck}",
    )
    targets: dict[str, list[int]] = {}

    def workers_busy() -> bool:
        """Shards are staged, and a decode task (with its decode child) and the encoder actor are up."""
        if staged_embedding_parts(out) < 2:
            return False
        processes = session_processes(proc)
        decoders = [pid for pid, p in processes.items() if p.command.startswith("ray::Map(_decode_shard)")]
        targets["decoders"] = decoders
        targets["encoders"] = [pid for pid, p in processes.items() if p.command.startswith("ray::MapWorker(Map(")]
        targets["children"] = [pid for pid, p in processes.items() if p.ppid in decoders and "spawn_main" in p.command]
        return all(targets.values())

    wait_for(workers_busy, proc, "shards were staged while a decode task and the encoder actor ran")
    for pid in targets["decoders"] + targets["encoders"]:
        os.kill(pid, signal.SIGKILL)
    children = targets["children"]
    wait_for(lambda: not any(alive(pid) for pid in children), proc, "the killed workers' decode children ended")
    log = finish(proc)
    assert proc.returncode == 0, log
    assert "A worker died or was killed while executing a task" in log  # Ray saw the kill and ran the task again
    assert table_tracks(out) == (sorted(set(good) - {stuck}), sorted(bad + [stuck]))
    reasons = dict(connect(out).execute("SELECT track_id, error_type FROM failures").fetchall())
    assert reasons[stuck] == "DecodeTimeout"
