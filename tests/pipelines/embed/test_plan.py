"""`plan_run`: the diff of a catalog against the tables' state, every kind of track in one catalog."""

from __future__ import annotations

import pyarrow as pa

from catalog_embed.pipelines.embed.plan import plan_run
from catalog_embed.schemas.records import MISSING_FINGERPRINT, REFUSED_FINGERPRINT, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES

VERSION, FEATURES = "v2", "f1"


def _embedded(rows: list[tuple[str, str, str, str, bool, bool]]) -> pa.Table:
    names = ["track_id", "source_fingerprint", "model_version", "feature_hash", "deleted"]
    schema = pa.schema([EMBEDDINGS.schema.field(c) for c in names] + [pa.field("covered", pa.bool_())])
    return pa.Table.from_pylist([dict(zip(schema.names, row, strict=True)) for row in rows], schema)


def _failed(rows: list[tuple[str, str, str, bool]]) -> pa.Table:
    names = ["track_id", "source_fingerprint", "stage"]
    schema = pa.schema([FAILURES.schema.field(c) for c in names] + [pa.field("limits_changed", pa.bool_())])
    return pa.Table.from_pylist([dict(zip(schema.names, row, strict=True)) for row in rows], schema)


# (track_id, fingerprint now, refused reason); the catalog's order is not the tables' order.
CATALOG = [
    ("new", "fp", None),
    ("unchanged", "fp", None),
    ("edited", "fp-new", None),
    ("old-model", "fp", None),
    ("old-front-end", "fp", None),
    ("uncovered", "fp", None),
    ("deleted-row", "fp", None),
    ("bad", "fp", None),
    ("bad-but-edited", "fp-new", None),
    ("read-error", "fp", None),
    ("still-missing", MISSING_FINGERPRINT, None),
    ("limits-changed", "fp", None),
    ("refused-again", REFUSED_FINGERPRINT, "outside"),
    ("refused-now", REFUSED_FINGERPRINT, "symlink"),
]
EMBEDDED = _embedded(
    [
        ("unchanged", "fp", VERSION, FEATURES, False, True),
        ("edited", "fp-old", VERSION, FEATURES, False, True),
        ("old-model", "fp", "v1", FEATURES, False, True),
        ("old-front-end", "fp", VERSION, "f0", False, True),
        ("uncovered", "fp", VERSION, FEATURES, False, False),
        ("deleted-row", "fp", VERSION, FEATURES, True, True),
        ("gone-embedded", "fp", VERSION, FEATURES, False, True),
        ("gone-deleted", "fp", VERSION, FEATURES, True, True),
    ]
)
FAILED = _failed(
    [
        ("bad", "fp", "decode", False),
        ("bad-but-edited", "fp-old", "frontend", False),
        ("read-error", "fp", "read", False),
        ("still-missing", MISSING_FINGERPRINT, "read", False),
        ("limits-changed", "fp", "decode", True),
        ("refused-again", REFUSED_FINGERPRINT, "plan", False),
        ("gone-failed", "fp", "decode", False),
    ]
)


def _plan(retry_failed: bool = False):
    ids, prints, reasons = zip(*CATALOG, strict=True)
    catalog = pa.table({"track_id": ids, "uri": [f"/c/{t}.mp3" for t in ids], "refused": pa.array(reasons, pa.string())})
    return plan_run(catalog, list(prints), EMBEDDED, FAILED, VERSION, FEATURES, retry_failed=retry_failed)


def test_every_kind_of_track_is_planned_in_catalog_order():
    plan = _plan()
    assert [item.track_id for item in plan.items] == [
        "new", "edited", "old-model", "old-front-end", "uncovered", "deleted-row", "bad-but-edited", "read-error",
        "limits-changed",
    ]  # fmt: skip
    assert plan.items[1] == WorkItem("edited", "/c/edited.mp3", "fp-new")
    assert plan.refused == ((WorkItem("refused-now", "/c/refused-now.mp3", REFUSED_FINGERPRINT), "symlink"),)
    assert plan.gone == ("gone-embedded", "gone-failed")
    counts = (plan.n_catalog, plan.n_new, plan.n_changed, plan.n_unchanged, plan.n_known_bad, plan.n_known)
    # known: the live embeddings and every failure, of tracks in the catalog or not
    assert counts == (14, 5, 4, 1, 3, 13)
    assert plan.listed_files()["edited"] == ("/c/edited.mp3", "fp-new")


def test_retry_failed_retries_known_bad_tracks_but_not_refused_ones():
    plan = _plan(retry_failed=True)
    assert [item.track_id for item in plan.items] == [
        "new", "edited", "old-model", "old-front-end", "uncovered", "deleted-row", "bad", "bad-but-edited",
        "read-error", "still-missing", "limits-changed",
    ]  # fmt: skip
    assert (plan.n_known_bad, len(plan.refused)) == (1, 1)
