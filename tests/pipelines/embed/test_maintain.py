"""`maintain` keeps file counts and log replay bounded, and racing an embed commit loses or duplicates nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.embed.maintain import maintain
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.tables import EMBEDDINGS, TABLES
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers.tables import commit, ids

ROOT = Path(__file__).resolve().parents[3]


def night(i: int) -> tuple[list[str], list[str], list[str]]:
    """Night i's (new, re-encoded, gone) tracks: 4 new ones, and every third night 2 earlier ones re-encoded (vector
    [i, i, i, i]) and one retired. New-only nights append a file without rewriting any, which gives compaction files
    to pack while the next night's merge rewrites the same files."""
    new = [f"t{4 * i + j:04d}" for j in range(4)]
    changes = i > 0 and i % 3 == 0
    old = [f"t{(7 * i + j) % (4 * i):04d}" for j in range(2)] if changes else []
    gone = [f"t{(5 * i + 3) % (4 * i):04d}"] if changes else []
    return new, [t for t in old if t not in gone], [t for t in gone if t not in old]


def expected(nights: int) -> dict[str, tuple[float, bool]]:
    """track id -> (the first value of its vector, deleted) after `nights` nights of SCHEDULE."""
    state: dict[str, tuple[float, bool]] = {}
    for i in range(nights):
        new, old, gone = night(i)
        for t in new + old:
            state[t] = (float(i), False)
        for t in gone:
            state[t] = (state[t][0], True)
    return state


def table_state(store: TableStore) -> dict[str, tuple[float, bool]]:
    rows = store.read(EMBEDDINGS, ["track_id", "embedding", "deleted"])
    assert pc.count_distinct(rows["track_id"]).as_py() == rows.num_rows, "a track appears twice"
    firsts = pc.list_element(rows["embedding"], 0).to_pylist()
    return dict(zip(rows["track_id"].to_pylist(), zip(firsts, rows["deleted"].to_pylist(), strict=True), strict=True))


def run_nights(store: TableStore, start: int, stop: int) -> None:
    for i in range(start, stop):
        new, old, gone = night(i)
        commit(store, f"night-{i}", "m", {t: np.full(4, i, np.float32) for t in new + old}, gone=gone)


def test_nights_with_maintain_keep_one_file_per_table_and_a_short_log(tmp_path):
    store = TableStore(str(tmp_path / "out"))
    store.ensure_tables()
    nights = 12
    for i in range(nights):
        run_nights(store, i, i + 1)
        maintain(store.root)
    # Every table here is far below --target-mb: compaction packs each into one file, whatever the nights wrote.
    files = {spec.name: len(store.table(spec).file_uris()) for spec in TABLES.values()}
    assert all(n <= 1 for n in files.values()), files
    log = tmp_path / "out" / "embeddings" / "_delta_log"
    last = json.loads((log / "_last_checkpoint").read_text())["version"]
    assert last == store.table(EMBEDDINGS).version()  # a reader replays no JSON commit after maintenance
    assert table_state(store) == expected(nights)


def test_a_night_writes_one_copy_of_the_files_it_touches(tmp_path):
    """Re-encoded and removed tracks in one night are a single embeddings commit: the file they share is rewritten
    once, not once for the upserts and again for the removals."""
    store = TableStore(str(tmp_path / "out"))
    store.ensure_tables()
    commit(store, "first", "m", {t: np.zeros(4, np.float32) for t in ids(100)})
    before = store.table(EMBEDDINGS).version()
    commit(store, "second", "m", {"t0001": np.ones(4, np.float32)}, gone=["t0002"])
    table = store.table(EMBEDDINGS)
    assert table.version() == before + 1
    assert table_state(store)["t0001"] == (1.0, False)
    assert table_state(store)["t0002"] == (0.0, True)


def test_maintain_while_an_embed_commits_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "out"
    store = TableStore(str(out))
    store.ensure_tables()
    run_nights(store, 0, 2)
    nights = 14
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, tests.pipelines.embed.test_maintain as t; "
         f"from catalog_embed.pipelines.io.store import TableStore; t.run_nights(TableStore(sys.argv[1]), 2, {nights})",
         str(out)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    rounds = 0
    while child.poll() is None or rounds == 0:
        assert main(["maintain", "--out", str(out)]) == 0
        rounds += 1
    assert child.wait() == 0, child.stderr.read()
    assert table_state(store) == expected(nights)
    operations = [entry["operation"] for entry in store.table(EMBEDDINGS).history()]
    assert "OPTIMIZE" in operations and operations.count("MERGE") == nights, operations
    # The rows every reader sees are those of the last commit: no track twice, every vector current.
    assert pa.table(store.table(EMBEDDINGS).to_pyarrow_table()).num_rows == len(expected(nights))


def test_an_embed_with_maintain_target_mb_leaves_its_tables_packed_and_checkpointed(small_catalog, tmp_path):
    out = tmp_path / "out"
    config = EmbedConfig(catalog=str(small_catalog.manifest_path), out=str(out),
                         encoder=EncoderConfig(model="chroma-stats"), workers=1, maintain_target_mb=100)
    run_embed(config, Console(quiet=True))
    store = TableStore(str(out))
    for spec in TABLES.values():
        table = store.table(spec)
        assert len(table.file_uris()) <= 1, spec.name
        checkpoint = out / spec.name / "_delta_log" / "_last_checkpoint"
        assert json.loads(checkpoint.read_text())["version"] == table.version(), spec.name
