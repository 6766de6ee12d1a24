"""Beam and Ray report progress per shard while they run, not once at the end (`ShardWatcher`).

Two decoders hang until their timeout, each in a shard of its own: whichever order the engine runs the shards in,
while the second hangs the first's shard and others are staged and at least one is not, so a report must come
before the run ends. The callback is the Python API's (`run_embed(..., progress=...)`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.workers.failpoints import ENV as FAILPOINTS
from catalog_embed.workers.stages import EncoderConfig

pytestmark = pytest.mark.slow
SHARD_SIZE = 2
# Seconds each of the two hung decoders holds its shard: several of the watcher's looks at the staging.
HOLD_S = 8.0


@pytest.mark.parametrize("runner", ["beam", "ray"])
def test_a_run_of_several_shards_reports_progress_while_it_runs(small_catalog, small_labels, tmp_path, monkeypatch,
                                                                 runner):
    manifest = pq.read_table(small_catalog.manifest_path)
    good = [label["track_id"] for label in small_labels if label["broken"] is None]
    uris = dict(zip(manifest["track_id"].to_pylist(), manifest["uri"].to_pylist(), strict=True))
    # The first and the last good track: two shards apart.
    hung = [Path(uris[good[0]]).name, Path(uris[good[-1]]).name]
    monkeypatch.setenv(FAILPOINTS, ";".join(f"decode=hang:{name}" for name in hung))
    config = EmbedConfig(
        catalog=str(small_catalog.manifest_path), out=str(tmp_path / "out"), encoder=EncoderConfig(model="mfcc-stats"),
        runner=runner, workers=1, shard_size=SHARD_SIZE, decode_timeout_s=HOLD_S,
    )
    calls: list[tuple[int, float]] = []
    summary = run_embed(config, Console(quiet=True), progress=lambda n, audio_s: calls.append((n, audio_s)))

    assert summary.status == "succeeded"
    assert len(calls) > 1, calls  # the last call reports what the watcher had not seen; one before it came mid-run
    assert sum(n for n, _ in calls) == manifest.num_rows
    assert sum(audio_s for _, audio_s in calls) == pytest.approx(summary.stats.audio_seconds)
