"""Every runner writes the same tables: one catalog (every codec, every kind of broken file) through local, Beam's
DirectRunner (also with the graph Dataflow gets with GPUs: the encode step's accelerator hint and a fusion break
before it, which the DirectRunner runs but does not place) and a local Ray instance, each into its own output root,
compared row by row. The encoder raises on
one track (the `encode` failpoint) in the main runs; a second set of runs uses an encoder that returns NaN on half
the tracks. Each fault costs its own tracks a `failures` row, the same on every runner."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import RunSummary, run_embed
from catalog_embed.pipelines.io.store import STAGING, TableStore
from catalog_embed.pipelines.runners.beam import BeamRunner
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES, RUNS, WINDOWS
from catalog_embed.workers import failpoints
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers.byo_encoders import loud_half, loud_nan_encoder

RUNNER_NAMES = ("local", "beam", "ray")
RIGHT_FITTED = "beam, right-fitted"
QUIET = Console(quiet=True)
# Encoder batches are assembled differently by each engine; float32 convolutions over differently sized batches
# agree to about 1e-6.
ATOL = 1e-5

pytestmark = pytest.mark.slow


def _good_and_bad(small_labels) -> tuple[list[str], list[str]]:
    good = sorted(label["track_id"] for label in small_labels if label["broken"] is None)
    return good, sorted(label["track_id"] for label in small_labels if label["broken"] is not None)


def _encode_victim(small_labels) -> str:
    """The good track whose encoder call raises in the main runs."""
    return _good_and_bad(small_labels)[0][2]


@pytest.fixture(scope="module")
def runs(small_catalog, small_labels, tmp_path_factory) -> dict[str, tuple[EmbedConfig, RunSummary]]:
    results = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(failpoints.ENV, f"encode=raise:{_encode_victim(small_labels)}")
        for runner in RUNNER_NAMES:
            config = EmbedConfig(
                catalog=str(small_catalog.manifest_path),
                out=str(tmp_path_factory.mktemp(f"tables-{runner}")),
                runner=runner,
                workers=2,
                shard_size=4,
                write_windows=True,
            )
            results[runner] = (config, run_embed(config, QUIET))
        monkeypatch.setattr(BeamRunner, "encoder_accelerator", lambda _: "type:nvidia-l4;count:1")
        config = replace(results["beam"][0], out=str(tmp_path_factory.mktemp("tables-beam-right-fitted")))
        results[RIGHT_FITTED] = (config, run_embed(config, QUIET))
    return results


@pytest.fixture(scope="module")
def nan_runs(small_catalog, tmp_path_factory) -> tuple[list[str], dict[str, EmbedConfig]]:
    """The louder half's track ids, and each runner's config of a run with an encoder that returns NaN on them."""
    folder = tmp_path_factory.mktemp("loud-nan")
    threshold, loud = loud_half(small_catalog.manifest_path, folder)
    encoder = EncoderConfig(model=str(loud_nan_encoder(folder, threshold)))
    configs = {}
    for runner in RUNNER_NAMES:
        configs[runner] = EmbedConfig(
            catalog=str(small_catalog.manifest_path),
            out=str(tmp_path_factory.mktemp(f"nan-{runner}")),
            encoder=encoder,
            runner=runner,
            workers=1,
            shard_size=4,
        )
        run_embed(configs[runner], QUIET)
    return loud, configs


def _table(config: EmbedConfig, spec) -> pa.Table:
    return TableStore(config.out).read(spec).sort_by("track_id")


def test_every_runner_writes_the_same_embeddings_failures_and_windows(runs, small_labels):
    good, bad = _good_and_bad(small_labels)
    victim = _encode_victim(small_labels)
    good.remove(victim)
    reference, _ = runs["local"]
    expected = {spec.name: _table(reference, spec) for spec in (EMBEDDINGS, FAILURES, WINDOWS)}
    assert expected["embeddings"]["track_id"].to_pylist() == good
    assert expected["failures"]["track_id"].to_pylist() == sorted([*bad, victim])
    failed = {row["track_id"]: (row["stage"], row["error_type"]) for row in expected["failures"].to_pylist()}
    assert failed[victim] == ("encode", "FailpointError")
    for runner in [*RUNNER_NAMES[1:], RIGHT_FITTED]:
        config, _ = runs[runner]
        embeddings = _table(config, EMBEDDINGS)
        assert embeddings["track_id"].to_pylist() == good, runner
        for column in ("n_windows", "duration_s", "source_fingerprint", "model_version", "feature_hash", "dim"):
            assert embeddings[column].to_pylist() == expected["embeddings"][column].to_pylist(), (runner, column)
        np.testing.assert_allclose(
            np.array(embeddings["embedding"].to_pylist()),
            np.array(expected["embeddings"]["embedding"].to_pylist()),
            atol=ATOL,
            err_msg=runner,
        )
        failures = _table(config, FAILURES)
        assert failures.select(["track_id", "stage", "error_type"]) == expected["failures"].select(
            ["track_id", "stage", "error_type"]
        ), runner
        windows = _table(config, WINDOWS)
        assert windows["track_id"].to_pylist() == good, runner
        assert windows["start_s"].to_pylist() == expected["windows"]["start_s"].to_pylist(), runner
        for got, want in zip(windows["embedding"].to_pylist(), expected["windows"]["embedding"].to_pylist(),
                             strict=True):
            np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, err_msg=runner)


def test_every_runner_commits_one_runs_row_with_the_counts_it_reports(runs, small_labels):
    n_good = sum(label["broken"] is None for label in small_labels) - 1  # the encode failpoint's victim
    for runner, (config, summary) in runs.items():
        # Beam's summary comes back through Beam metrics, Ray's through its Datasink: both must count right.
        assert (summary.status, summary.stats.n_embedded, summary.stats.n_failed) == (
            "succeeded",
            n_good,
            len(small_labels) - n_good,
        ), runner
        (row,) = TableStore(config.out).read(RUNS).to_pylist()
        assert (row["run_id"], row["status"], row["runner"]) == (summary.run_id, "succeeded", config.runner)
        assert (row["n_embedded"], row["n_failed"]) == (summary.stats.n_embedded, summary.stats.n_failed)
        assert row["audio_seconds"] == pytest.approx(summary.stats.audio_seconds, rel=1e-3)
        assert {"decode", "encode", "write"} <= set(json.loads(row["stage_seconds_json"])), runner
        assert json.loads(row["config_json"])["runner"] == config.runner
        store = TableStore(config.out)
        assert not store.fs.exists(f"{store.staging_dir(summary.run_id)}"), f"{runner} left {STAGING} behind"


def test_non_finite_embeddings_are_the_same_failures_rows_on_every_runner(nan_runs, small_labels):
    loud, configs = nan_runs
    good, bad = _good_and_bad(small_labels)
    assert loud and len(loud) < len(good)
    reference = {spec.name: _table(configs["local"], spec) for spec in (EMBEDDINGS, FAILURES)}
    assert reference["embeddings"]["track_id"].to_pylist() == sorted(set(good) - set(loud))
    assert np.isfinite(np.array(reference["embeddings"]["embedding"].to_pylist())).all()
    failed = {row["track_id"]: (row["stage"], row["error_type"]) for row in reference["failures"].to_pylist()}
    assert sorted(failed) == sorted([*bad, *loud])
    assert {failed[track_id] for track_id in loud} == {("encode", "NonFiniteEmbedding")}
    for runner in RUNNER_NAMES[1:]:
        embeddings = _table(configs[runner], EMBEDDINGS)
        assert embeddings["track_id"].to_pylist() == reference["embeddings"]["track_id"].to_pylist(), runner
        np.testing.assert_allclose(
            np.array(embeddings["embedding"].to_pylist()),
            np.array(reference["embeddings"]["embedding"].to_pylist()),
            atol=ATOL,
            err_msg=runner,
        )
        columns = ["track_id", "stage", "error_type", "message"]
        assert _table(configs[runner], FAILURES).select(columns) == reference["failures"].select(columns), runner


@pytest.fixture(scope="module")
def multi_runs(small_catalog, tmp_path_factory) -> tuple[list[str], EmbedConfig, dict[str, EmbedConfig]]:
    """Three encoders (each its own sample rate and front end; the third returns NaN on the louder half) run
    separately into one output root, and together (`--model a,b,c`) on every runner into one root each: the
    encoders' names, the separate runs' config and each runner's config."""
    folder = tmp_path_factory.mktemp("multi")
    threshold, _loud = loud_half(small_catalog.manifest_path, folder)
    models = ["mfcc-stats", "chroma-stats", str(loud_nan_encoder(folder, threshold))]
    base = EmbedConfig(
        catalog=str(small_catalog.manifest_path), out="", workers=2, shard_size=4, write_windows=True
    )
    separate = replace(base, out=str(tmp_path_factory.mktemp("multi-separate")))
    for model in models:
        run_embed(replace(separate, encoder=EncoderConfig(model=model)), QUIET)
    configs = {}
    for runner in RUNNER_NAMES:
        configs[runner] = replace(
            base, out=str(tmp_path_factory.mktemp(f"multi-{runner}")), runner=runner,
            encoder=EncoderConfig(model=",".join(models)),
        )
        run_embed(configs[runner], QUIET)
    return models, separate, configs


def _by_key(config: EmbedConfig, spec) -> pa.Table:
    return TableStore(config.out).read(spec).sort_by([("model", "ascending"), ("track_id", "ascending")])


def test_several_encoders_in_one_run_write_the_rows_of_separate_runs_on_every_runner(multi_runs, small_labels):
    _models, separate, configs = multi_runs
    expected = {spec.name: _by_key(separate, spec) for spec in (EMBEDDINGS, FAILURES, WINDOWS)}
    # The NaN encoder fails the louder half, the other two embed them: failures are per encoder.
    failed_by_model = {}
    for row in expected["failures"].to_pylist():
        failed_by_model.setdefault(row["model"], set()).add(row["track_id"])
    assert len({frozenset(tracks) for tracks in failed_by_model.values()}) == 2
    key_columns = ["model", "track_id", "n_windows", "duration_s", "source_fingerprint", "model_version",
                   "feature_hash", "dim"]  # fmt: skip
    for runner, config in configs.items():
        embeddings = _by_key(config, EMBEDDINGS)
        assert embeddings.select(key_columns) == expected["embeddings"].select(key_columns), runner
        np.testing.assert_allclose(
            np.concatenate([np.array(v) for v in embeddings["embedding"].to_pylist()]),
            np.concatenate([np.array(v) for v in expected["embeddings"]["embedding"].to_pylist()]),
            atol=ATOL, err_msg=runner,
        )
        failures = _by_key(config, FAILURES).select(["model", "track_id", "stage", "error_type"])
        assert failures == expected["failures"].select(["model", "track_id", "stage", "error_type"]), runner
        windows = _by_key(config, WINDOWS)
        assert windows.select(["model", "track_id", "start_s"]) == expected["windows"].select(
            ["model", "track_id", "start_s"]
        ), runner
        runs = TableStore(config.out).read(RUNS).sort_by("model")
        (run_id,) = set(runs["run_id"].to_pylist())  # one run, one runs row per encoder
        separate_runs = TableStore(separate.out).read(RUNS).sort_by("model")
        assert runs.select(["model", "model_version", "feature_hash", "n_embedded", "n_failed"]) == separate_runs.select(
            ["model", "model_version", "feature_hash", "n_embedded", "n_failed"]
        ), runner
        assert len(small_labels) * 3 == sum(runs["n_embedded"].to_pylist()) + sum(runs["n_failed"].to_pylist())
