"""Every runner writes the same tables: one catalog (every codec, every kind of broken file) through local, Beam's
DirectRunner and a local Ray instance, each into its own output root, compared row by row."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from rich.console import Console

from pipelines.embed import EmbedConfig, RunSummary, run_embed
from schemas.store import STAGING, TableStore
from schemas.tables import EMBEDDINGS, FAILURES, RUNS, WINDOWS

RUNNERS = ("local", "beam", "ray")
QUIET = Console(quiet=True)
# Encoder batches are assembled differently by each engine; float32 convolutions over differently sized batches
# agree to about 1e-6.
ATOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(small_catalog, tmp_path_factory) -> dict[str, tuple[EmbedConfig, RunSummary]]:
    results = {}
    for runner in RUNNERS:
        config = EmbedConfig(
            catalog=str(small_catalog.manifest_path),
            out=str(tmp_path_factory.mktemp(f"tables-{runner}")),
            runner=runner,
            workers=2,
            shard_size=4,
            write_windows=True,
        )
        results[runner] = (config, run_embed(config, QUIET))
    return results


def _table(config: EmbedConfig, spec) -> pa.Table:
    return TableStore(config.out).read(spec).sort_by("track_id")


def test_every_runner_writes_the_same_embeddings_failures_and_windows(runs, small_labels):
    good = sorted(label["track_id"] for label in small_labels if label["broken"] is None)
    bad = sorted(label["track_id"] for label in small_labels if label["broken"] is not None)
    reference, _ = runs["local"]
    expected = {spec.name: _table(reference, spec) for spec in (EMBEDDINGS, FAILURES, WINDOWS)}
    assert expected["embeddings"]["track_id"].to_pylist() == good
    assert expected["failures"]["track_id"].to_pylist() == bad
    for runner in RUNNERS[1:]:
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
    n_good = sum(label["broken"] is None for label in small_labels)
    for runner, (config, summary) in runs.items():
        # Beam's summary comes back through Beam metrics, Ray's through its Datasink: both must count right.
        assert (summary.status, summary.stats.n_embedded, summary.stats.n_failed) == (
            "succeeded",
            n_good,
            len(small_labels) - n_good,
        ), runner
        (row,) = TableStore(config.out).read(RUNS).to_pylist()
        assert (row["run_id"], row["status"], row["runner"]) == (summary.run_id, "succeeded", runner)
        assert (row["n_embedded"], row["n_failed"]) == (summary.stats.n_embedded, summary.stats.n_failed)
        assert row["audio_seconds"] == pytest.approx(summary.stats.audio_seconds, rel=1e-3)
        assert {"decode", "encode", "write"} <= set(json.loads(row["stage_seconds_json"])), runner
        assert json.loads(row["config_json"])["runner"] == runner
        store = TableStore(config.out)
        assert not store.fs.exists(f"{store.staging_dir(summary.run_id)}"), f"{runner} left {STAGING} behind"
