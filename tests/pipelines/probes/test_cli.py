"""`catalog-embed probe`, `tag` and `probe-report` end to end through the CLI, on small generated tables."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.probes.cli import PRESET_NAMES
from catalog_embed.schemas.tables import EMBEDDINGS, PREDICTIONS
from catalog_embed.workers.probes.search import PRESETS
from tests.helpers.probe_fixtures import embeddings_rows, labels_for, latent, write_embeddings

N = 400
DELETED = 7
FAST = ["--max-epochs", "25", "--patience", "5", "--lr", "3e-3"]
# Comfortably above chance: multilabel AUC 0.5, 4 classes 0.25, R2 0, 24 keys ~0.1.
FLOORS = {
    "multilabel": ("roc_auc", 0.8),
    "multiclass": ("accuracy", 0.6),
    "regression": ("r2", 0.5),
    "key": ("key_weighted_score", 0.3),
}


def run(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    z = latent(N)
    uri = write_embeddings(root / "embeddings", embeddings_rows(z, dim=24, deleted=DELETED))
    labels = {}
    for kind in FLOORS:
        labels[kind] = str(root / f"{kind}.parquet")
        pq.write_table(labels_for(kind, z), labels[kind])
    return root, uri, labels


@pytest.fixture(scope="module")
def reports(tables):
    root, uri, labels = tables
    out = {}
    for kind in FLOORS:
        out[kind] = root / f"out-{kind}"
        assert (
            run(
                "probe",
                "--embeddings",
                uri,
                "--labels",
                labels[kind],
                "--task",
                kind,
                "--kind",
                kind,
                "--out",
                str(out[kind]),
                *FAST,
            )
            == 0
        )
    return out


@pytest.mark.parametrize("kind", list(FLOORS))
def test_probe_end_to_end(reports, kind):
    out = reports[kind]
    report = json.loads((out / "report.json").read_text())
    metric, floor = FLOORS[kind]
    assert report["test"][metric] > floor
    assert report["kind"] == kind and report["model"] == "toy" and report["layer"] == "pool"
    assert report["data"]["embedded"] == N - DELETED
    n_test = report["data"]["n_test"]
    assert n_test + report["data"]["n_train"] + report["data"]["n_valid"] == N - DELETED
    assert report["chosen"]["history"] and report["chosen"]["best_epoch"] >= 1
    assert report["per_label"]
    expected_plots = {"validation_curve"} | {
        "multilabel": {"per_label_auc", "pr_curves"},
        "multiclass": {"confusion_matrix"},
        "key": {"confusion_matrix"},
        "regression": set(),
    }[kind]
    assert set(report["plots"]) == expected_plots
    for name in [*report["plots"].values(), "report.md", "probe/probe.json", "probe/probe.safetensors"]:
        assert (out / name).stat().st_size > 0
    predictions = DeltaTable(str(out / "predictions")).to_pyarrow_table()
    assert predictions.schema == PREDICTIONS.schema
    assert predictions.num_rows == n_test
    assert set(predictions["split"].to_pylist()) == {"test"}
    assert set(predictions["probe_id"].to_pylist()) == {report["probe_id"]}
    if kind != "regression":
        assert all(len(t) == 3 for t in predictions["top_labels"].to_pylist())


def test_tag_covers_every_track_once(reports, tmp_path):
    # A copy of the module's embeddings table: this test re-embeds and deletes tracks in it.
    uri = write_embeddings(tmp_path / "embeddings", embeddings_rows(latent(N), dim=24, deleted=DELETED))
    out = str(tmp_path / "predictions")
    assert (
        run("tag", "--probe", str(reports["multilabel"]), "--embeddings", uri, "--out", out, "--batch-rows", "150") == 0
    )
    first = DeltaTable(out)
    rows = first.to_pyarrow_table()
    assert sorted(rows["track_id"].to_pylist()) == [f"t{i:05d}" for i in range(N - DELETED)]
    assert {len(s) for s in rows["scores"].to_pylist()} == {5}
    version = first.version()
    assert run("tag", "--probe", str(reports["multilabel"]), "--embeddings", uri, "--out", out) == 0
    assert DeltaTable(out).version() == version

    # Re-embed one track: the next run re-tags just that one, replacing its row.
    newer = embeddings_rows(latent(N), dim=24).slice(3, 1)
    stamp = pa.array([datetime(2026, 11, 20, tzinfo=UTC)], EMBEDDINGS.schema.field("embedded_at").type)
    newer = newer.set_column(newer.schema.get_field_index("embedded_at"), EMBEDDINGS.schema.field("embedded_at"), stamp)
    (
        DeltaTable(uri)
        .merge(newer, "t.model = s.model AND t.track_id = s.track_id", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .execute()
    )
    assert run("tag", "--probe", str(reports["multilabel"]), "--embeddings", uri, "--out", out) == 0
    rows = DeltaTable(out).to_pyarrow_table()
    assert rows.num_rows == N - DELETED
    assert DeltaTable(out).version() == version + 1
    retagged = rows.filter(pc.equal(rows["track_id"], "t00003"))["embedded_at"].to_pylist()
    assert retagged == [datetime(2026, 11, 20, tzinfo=UTC)]

    # Delete one track from the embeddings: the next run removes its prediction.
    DeltaTable(uri).update(updates={"deleted": "true"}, predicate="track_id = 't00005'")
    assert run("tag", "--probe", str(reports["multilabel"]), "--embeddings", uri, "--out", out) == 0
    rows = DeltaTable(out).to_pyarrow_table()
    assert rows.num_rows == N - DELETED - 1 and "t00005" not in set(rows["track_id"].to_pylist())


def test_probe_report_table(reports, tmp_path):
    out = tmp_path / "results.md"
    assert run("probe-report", *(str(p) for p in reports.values()), "--out", str(out)) == 0
    table = out.read_text()
    assert "| toy | pool |" in table
    for column in (
        "multilabel roc_auc",
        "multilabel pr_auc",
        "multiclass accuracy",
        "regression r2",
        "key key_weighted_score",
    ):
        assert column in table


def test_seeded_runs_are_identical(tables, reports, tmp_path):
    _, uri, labels = tables
    out = tmp_path / "again"
    rc = run(
        "probe",
        "--embeddings",
        uri,
        "--labels",
        labels["multiclass"],
        "--task",
        "multiclass",
        "--kind",
        "multiclass",
        "--out",
        str(out),
        *FAST,
    )
    assert rc == 0
    first = json.loads((reports["multiclass"] / "report.json").read_text())
    again = json.loads((out / "report.json").read_text())
    assert again["test"] == first["test"] and again["probe_id"] == first["probe_id"]


def test_grid_search_in_two_processes(tables, tmp_path):
    _, uri, labels = tables
    out = tmp_path / "grid"
    rc = run(
        "probe",
        "--embeddings",
        uri,
        "--labels",
        labels["multiclass"],
        "--task",
        "genre",
        "--kind",
        "multiclass",
        "--out",
        str(out),
        "--search",
        "grid",
        "--max-trials",
        "3",
        "--parallel",
        "2",
        "--max-epochs",
        "4",
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["trials"]) == 3 and report["search"]["parallel"] == 2
    best = max(t["best_valid"] for t in report["trials"])
    assert report["chosen"]["best_valid"] == best
    assert report["chosen"]["config"] in [t["config"] for t in report["trials"]]


@pytest.mark.slow
def test_grid_search_on_ray(tables, tmp_path):
    _, uri, labels = tables
    out = tmp_path / "ray"
    rc = run(
        "probe",
        "--embeddings",
        uri,
        "--labels",
        labels["regression"],
        "--task",
        "mood",
        "--kind",
        "regression",
        "--out",
        str(out),
        "--search",
        "grid",
        "--max-trials",
        "2",
        "--parallel",
        "2",
        "--runner",
        "ray",
        "--max-epochs",
        "3",
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["trials"]) == 2 and report["search"]["runner"] == "ray"


def test_bad_inputs_fail_before_training(tables, tmp_path, capsys):
    root, uri, labels = tables
    base = ["probe", "--embeddings", uri, "--task", "t", "--out", str(tmp_path / "never")]
    nobody = tmp_path / "nobody.csv"
    nobody.write_text("track_id,genre\nzz1,rock\nzz2,jazz\n")
    two = write_embeddings(
        root / "two-models", embeddings_rows(latent(10), model="a"), embeddings_rows(latent(10), model="b")
    )
    cases = [
        (
            ["--labels", str(nobody), "--kind", "multiclass"],
            "matches one of the 393 embedded tracks.*must use the catalog's ids",
        ),
        (
            ["--labels", labels["regression"], "--kind", "multiclass", "--label-column", "arousal"],
            "'arousal' has type double.*multiclass",
        ),
        (["--embeddings", two, "--labels", labels["multiclass"], "--kind", "multiclass"], "several models .*--model"),
        (["--labels", labels["multiclass"], "--kind", "multiclass", "--search", "grid", "--lr", "0.1"], "searches lr"),
    ]
    for extra, message in cases:
        assert run(*base, *extra) == 2
        assert re.search(f"catalog-embed: error: .*{message}", capsys.readouterr().err)
    assert not (tmp_path / "never").exists()


def test_cli_preset_names_match_the_presets():
    assert PRESET_NAMES == tuple(PRESETS)
