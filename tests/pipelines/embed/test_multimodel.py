"""Several encoders per decode (`--model a,b,...`) on the local runner: one decode per track for every encoder,
planning and failures per encoder, one run committed all or nothing, resumed after a kill. Parity with separate
runs on every runner: tests/pipelines/runners/test_parity.py."""

from __future__ import annotations

from dataclasses import replace

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.records import WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES, RUNS
from catalog_embed.workers import stages
from catalog_embed.workers.audio import DecodeConfig
from catalog_embed.workers.stages import DecodeStage, EncoderConfig, MultiDecodeStage, TrackFeatures
from tests.helpers.byo_encoders import loud_nan_encoder
from tests.helpers.cli import run_cli
from tests.helpers.faults import embed_process, expected_tracks, kill_session, staged_embedding_parts, wait_for

QUIET = Console(quiet=True)
TWO = "mfcc-stats,chroma-stats"


def _good_item(small_catalog, small_labels) -> WorkItem:
    good, _ = expected_tracks(small_labels)
    uris = dict(zip(*pq.read_table(small_catalog.manifest_path, columns=["track_id", "uri"]).to_pydict().values(),
                    strict=True))  # fmt: skip
    return WorkItem(good[0], uris[good[0]], "f")


@pytest.mark.parametrize("front_end_on", ["decoder", "encoder"])
def test_one_decode_gives_every_encoder_the_input_of_its_own_decode(
    small_catalog, small_labels, tmp_path, monkeypatch, front_end_on
):
    item = _good_item(small_catalog, small_labels)
    models = ["mfcc-stats", "chroma-stats", str(loud_nan_encoder(tmp_path, 1e9))]  # 22.05 kHz twice, 16 kHz
    singles = [DecodeStage(EncoderConfig(model=m, front_end_on=front_end_on), DecodeConfig()) for m in models]
    expected = [stage.process(item) for stage in singles]
    calls = []
    real = stages.load_audio
    monkeypatch.setattr(stages, "load_audio", lambda *args: calls.append(args) or real(*args))
    multi = MultiDecodeStage(tuple(singles), (frozenset(), frozenset({item.track_id}), frozenset()))
    got = multi.process(item)
    assert len(calls) == 1  # decoded once, at the file's rate, for both encoders that embed it
    assert calls[0][1] is None
    assert got.per_model[1] is None  # current for chroma-stats: no front end run for it
    for want, have in zip([expected[0], expected[2]], [got.per_model[0], got.per_model[2]], strict=True):
        assert isinstance(have, TrackFeatures)
        assert have.starts == want.starts and have.duration_s == want.duration_s
        for name in ("windows", "waveform"):
            if getattr(want, name) is None:
                assert getattr(have, name) is None
            else:
                assert getattr(have, name).equal(getattr(want, name)), name
        assert have.sample_rate == want.sample_rate


def test_a_track_new_for_one_encoder_and_current_for_another_is_embedded_by_one(small_catalog, small_labels, tmp_path):
    good, bad = expected_tracks(small_labels)
    out = str(tmp_path / "out")
    base = EmbedConfig(catalog=str(small_catalog.manifest_path), out=out, shard_size=4)
    first = run_embed(replace(base, encoder=EncoderConfig(model="mfcc-stats")), QUIET)
    both = run_embed(replace(base, encoder=EncoderConfig(model=TWO)), QUIET)
    assert both.model == TWO
    embeddings = TableStore(out).read(EMBEDDINGS, ["model", "track_id", "run_id"])
    rows = {(r["model"], r["track_id"]): r["run_id"] for r in embeddings.to_pylist()}
    assert sorted(rows) == sorted([(m, t) for m in ("chroma-stats", "mfcc-stats") for t in good])
    assert {rows["mfcc-stats", t] for t in good} == {first.run_id}  # current for mfcc-stats: left alone
    assert {rows["chroma-stats", t] for t in good} == {both.run_id}
    failures = TableStore(out).read(FAILURES, ["model", "track_id"]).to_pylist()
    # The broken files are known bad for mfcc-stats (unchanged since they failed), new for chroma-stats.
    assert sorted((r["model"], r["track_id"]) for r in failures) == sorted(
        [(m, t) for m in ("chroma-stats", "mfcc-stats") for t in bad]
    )
    mine = {r["model"]: r for r in TableStore(out).read(RUNS).to_pylist() if r["run_id"] == both.run_id}
    assert (mine["mfcc-stats"]["n_embedded"], mine["mfcc-stats"]["n_failed"]) == (0, 0)
    assert (mine["chroma-stats"]["n_embedded"], mine["chroma-stats"]["n_failed"]) == (len(good), len(bad))
    assert mine["mfcc-stats"]["n_skipped"] == len(small_labels)
    assert both.stats.n_embedded == len(good)  # counts are per (encoder, track)


def test_a_kill_mid_run_with_several_encoders_resumes_and_commits_each_once(small_catalog, small_labels, tmp_path):
    good, bad = expected_tracks(small_labels)
    out = str(tmp_path / "out")
    catalog = str(small_catalog.manifest_path)
    stall = pq.read_table(small_catalog.manifest_path)["track_id"].to_pylist()[12]
    args = ("--model", TWO, "--shard-size", "2", "--workers", "1")
    proc = embed_process(catalog, out, *args, failpoints=f"decode=hang:{stall}")
    wait_for(lambda: staged_embedding_parts(out) >= 4, proc, "four shards were staged")
    kill_session(proc)
    rerun = embed_process(catalog, out, *args)
    log = rerun.communicate(timeout=400)[0]
    assert rerun.returncode == 0, log
    assert "resuming run" in log
    assert int(log.split("resuming run ", 1)[1].split(": ", 1)[1].split(" ", 1)[0]) >= 8
    con = connect(out)
    for model in TWO.split(","):
        embedded = [r[0] for r in con.execute(f"SELECT track_id FROM embeddings WHERE model = '{model}' ORDER BY 1").fetchall()]
        failed = [r[0] for r in con.execute(f"SELECT track_id FROM failures WHERE model = '{model}' ORDER BY 1").fetchall()]
        assert (embedded, failed) == (good, bad), model
    runs = con.execute("SELECT run_id, model, n_embedded, n_failed FROM runs ORDER BY model").fetchall()
    assert len({r[0] for r in runs}) == 1
    assert [r[1:] for r in runs] == [("chroma-stats", len(good), len(bad)), ("mfcc-stats", len(good), len(bad))]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--model", "mfcc-stats,mfcc-stats"), "name each encoder once"),
        (("--model", TWO, "--layer", "stats"), "--layer applies to one encoder"),
        (("--model", TWO, "--weights", "w.pt"), "--weights applies to one encoder"),
    ],
)
def test_several_encoders_refuse_one_encoders_options_in_one_line(small_catalog, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "embed", "--catalog", str(small_catalog.manifest_path), "--out", str(out), *extra)
    assert code == 2
    assert err.startswith("catalog-embed: error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
