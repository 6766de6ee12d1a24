"""An object store that fails: `embed`, `query`, `similar` and `probe` as processes of their own, reaching moto's
S3 server only through the fault-injecting proxy (`tests/helpers/fault_proxy.py`).

Transient faults (a share of requests answered 503 SlowDown, reset, cut after the server applied them, or stalled
past the client's timeout) are retried and cost nothing: every good track is embedded exactly once and only the
broken files have failures rows. A store that keeps failing ends the command with one line and exit 75; nothing
is half-committed, and the same command run once the store answers resumes and completes. The full matrix (1%,
10%, 50% of audio reads, staging writes, commits, table reads) is `bench/store_faults_bench.py`.
"""

from __future__ import annotations

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.schemas.errors import EX_TEMPFAIL
from tests.helpers.fault_proxy import AUDIO_READS, COMMITS, STAGING_WRITES, TABLE_READS, FaultProxy, FaultRule
from tests.helpers.faults import expected_tracks
from tests.helpers.store_faults import Finished, embed, run_cli, storage_flags
from tests.objectstore.conftest import BUCKET

# Short retry budgets, so that a store that keeps failing gives up in seconds (the defaults take minutes).
GIVE_UP_SOON = ["--storage-option", "max_retries=2", "--storage-option", "retry_timeout=10s"]


def _tables(endpoint: str, out: str) -> tuple[list[str], list[str], list[tuple]]:
    """(live embedded track ids, failed track ids, (run_id, status) of each runs row), read from the server itself."""
    con = connect(out, {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"})
    embedded = [r[0] for r in con.execute("SELECT track_id FROM embeddings WHERE NOT deleted ORDER BY 1").fetchall()]
    failed = [r[0] for r in con.execute("SELECT track_id FROM failures ORDER BY 1").fetchall()]
    runs = con.execute("SELECT run_id, status FROM runs ORDER BY started_at").fetchall()
    return embedded, failed, runs


def _resumable(finished: Finished) -> None:
    """Ended with exit 75 and one line naming the store, no traceback."""
    assert finished.code == EX_TEMPFAIL, finished.output[-3000:]
    assert "Traceback" not in finished.output, finished.output[-3000:]
    assert finished.last_line.startswith("catalog-embed: error: the object store kept failing"), finished.output[-3000:]


@pytest.fixture(scope="module")
def proxy(s3_catalog):
    with FaultProxy(s3_catalog.endpoint, seed=3, stall_s=5) as running:
        yield running


def test_transient_faults_in_every_phase_of_a_run_cost_nothing(s3_catalog, proxy, small_labels):
    out = f"s3://{BUCKET}/faults-transient"
    proxy.set_rules(*(FaultRule(0.1, **phase) for phase in (AUDIO_READS, STAGING_WRITES, COMMITS)))
    finished = embed(proxy.endpoint, s3_catalog.manifest, out)
    injected = dict(proxy.injected)
    proxy.set_rules()
    assert finished.code == 0, finished.output[-3000:]
    assert sum(injected.values()) > 0, injected
    good, bad = expected_tracks(small_labels)
    embedded, failed, runs = _tables(s3_catalog.endpoint, out)
    assert (embedded, failed) == (good, bad)
    assert [status for _, status in runs] == ["succeeded"]


@pytest.mark.slow  # three runs, two of them spending their retries: minutes on a loaded 2-core machine
def test_a_store_that_keeps_failing_ends_the_run_resumable_and_the_rerun_completes(s3_catalog, proxy, small_labels):
    out = f"s3://{BUCKET}/faults-persistent"
    good, bad = expected_tracks(small_labels)
    # Every read of audio bytes fails (their listing and HEADs, for the plan, do not): the run stops at its first
    # track, which is not recorded as a failure.
    proxy.set_rules(FaultRule(1.0, ("slowdown", "reset"), method="GET", path=AUDIO_READS["path"]))
    _resumable(embed(proxy.endpoint, s3_catalog.manifest, out, *GIVE_UP_SOON, s3fs_attempts=2))
    assert _tables(s3_catalog.endpoint, out) == ([], [], [])
    # Reads recover, every write of the Delta log stalls: the run stages every track, then its commit gives up.
    proxy.set_rules(FaultRule(1.0, ("stall",), method="PUT", path=COMMITS["path"]))
    _resumable(embed(proxy.endpoint, s3_catalog.manifest, out, *GIVE_UP_SOON, s3fs_attempts=2))
    assert _tables(s3_catalog.endpoint, out) == ([], [], [])
    proxy.set_rules()
    again = embed(proxy.endpoint, s3_catalog.manifest, out)
    assert again.code == 0, again.output[-3000:]
    assert f"{len(good) + len(bad)} planned tracks are already staged" in again.output
    embedded, failed, runs = _tables(s3_catalog.endpoint, out)
    assert (embedded, failed) == (good, bad)
    assert [status for _, status in runs] == ["succeeded"]


def test_readers_of_a_failing_store_end_with_one_line_and_exit_75(
    s3_catalog, proxy, small_catalog, small_labels, tmp_path
):
    out = f"s3://{BUCKET}/faults-transient"  # the tables the first test committed
    labels = tmp_path / "labels.csv"
    pacsv.write_csv(pq.read_table(small_catalog.labels_path).select(["track_id", "mode"]), labels)
    flags = [*storage_flags(proxy.endpoint), *GIVE_UP_SOON]
    commands = [
        ("query", "--out", out, "SELECT count(*) FROM embeddings"),
        ("similar", "--out", out, "--track", expected_tracks(small_labels)[0][0]),
        ("probe", "--embeddings", out, "--labels", str(labels), "--task", "mode", "--kind", "multiclass",
         "--out", str(tmp_path / "probe")),
    ]
    # Every table read fails (the Delta log is read through deltalake's client), then only the data files' (read
    # through Arrow's S3 client, and by `query` inside DuckDB's scan).
    for path in (TABLE_READS["path"], r"/embeddings/(?!_delta_log/)"):
        injected = sum(proxy.injected.values())
        proxy.set_rules(FaultRule(1.0, ("slowdown", "reset", "stall"), method="GET|HEAD", path=path))
        for argv in commands:
            _resumable(run_cli(proxy.endpoint, *argv, *flags))
        assert sum(proxy.injected.values()) > injected, f"no fault was injected on {path}"
    proxy.set_rules()
