"""On Beam and on Ray a decoder that crashes its process or hangs costs one `failures` row, as on the local runner;
the bundle, the task and the run go on. Beam routes it through its dead-letter output (the decode runs in Beam's
exception-handling subprocess), Ray through the supervised child each decode task runs the decoder in. The crash
and the hang are injected where a decoder would fail (`schemas.failpoints`), inside those processes."""

from __future__ import annotations

import pytest
from rich.console import Console

from pipelines.embed import EmbedConfig, run_embed
from schemas import failpoints
from schemas.store import TableStore
from schemas.tables import EMBEDDINGS, FAILURES

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("runner", ["beam", "ray"])
@pytest.mark.parametrize(("action", "error_type"), [("segfault", "DecoderCrashed"), ("hang", "DecodeTimeout")])
def test_a_decoder_crash_or_hang_is_one_failure_row(runner, action, error_type, small_catalog, small_labels,
                                                     tmp_path, monkeypatch):
    good = sorted(label["track_id"] for label in small_labels if label["broken"] is None)
    victim = good[1]
    monkeypatch.setenv(failpoints.ENV, f"decode={action}:{victim}")
    config = EmbedConfig(catalog=str(small_catalog.manifest_path), out=str(tmp_path), runner=runner, workers=1,
                         shard_size=8, decode_timeout_s=10)
    summary = run_embed(config, Console(quiet=True))

    store = TableStore(config.out)
    assert sorted(store.read(EMBEDDINGS, ["track_id"])["track_id"].to_pylist()) == [t for t in good if t != victim]
    failures = {row["track_id"]: row for row in store.read(FAILURES).to_pylist()}
    assert (failures[victim]["stage"], failures[victim]["error_type"]) == ("decode", error_type)
    assert len(failures) == len(small_labels) - len(good) + 1
    assert (summary.status, summary.stats.n_failed) == ("succeeded", len(failures))
