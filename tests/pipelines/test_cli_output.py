"""Output for scripts: nothing cut when not on a terminal, `--json` on `models`, `plan` and `query`, defaults in
`--help`, and `query` reaching only the tables unless told otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_embed.pipelines.cli import main
from catalog_embed.workers.encoders import encoder_names
from tests.helpers.cli import run_cli
from tests.helpers.probe_fixtures import embeddings_rows, labels_for, latent, write_embeddings

MODEL = "mfcc-stats"  # no weights to fetch: the fastest real encoder


@pytest.fixture(scope="module")
def tables(small_catalog, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cli-output") / "tables")
    assert main(["embed", "--catalog", str(small_catalog.manifest_path), "--out", out, "--model", MODEL]) == 0
    return out


def test_models_output_is_whole_when_piped(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    # Piped, Rich used to lay the table out 80 columns wide and cut names: `mule-sfnfnet…`.
    for name in encoder_names():
        assert name in out
    assert "…" not in out
    # The MULE row used to carry its 400-character "needs weights" text in the version column (2,000-character
    # lines): versions stay in the table, what a model needs is a wrapped note under it.
    assert max(len(line) for line in out.splitlines()) <= 200
    assert "mule-sfnfnet-f0: needs weights:" in out
    code, out, _ = run_cli(capsys, "models", "--json")
    listed = json.loads(out)
    assert [m["name"] for m in listed] == list(encoder_names())
    mule = next(m for m in listed if m["name"] == "mule-sfnfnet-f0")
    assert mule["version"] is None and "--weights" in mule["needs"]
    stats = next(m for m in listed if m["name"] == MODEL)
    assert stats["layers"] == [{"name": "stats", "dim": 120, "default": True}] and stats["version"]


def test_plan_json_lists_every_track(small_catalog, small_labels, tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "plan", "--catalog", str(small_catalog.manifest_path), "--out", str(tmp_path / "t"), "--model", MODEL,
        "--json",
    )
    assert code == 0
    plan = json.loads(out)
    assert plan["model"] == MODEL and plan["counts"]["new"] == len(small_labels)
    assert sorted(t["track_id"] for t in plan["embed"]) == sorted(la["track_id"] for la in small_labels)
    assert plan["refuse"] == [] and plan["delete"] == []


def test_plan_prints_brackets_and_long_uris_whole(small_catalog, tmp_path, capsys):
    manifest = pq.read_table(small_catalog.manifest_path)
    long_id = "a [live] take " + "x" * 120
    ids = [long_id if i == 0 else t for i, t in enumerate(manifest["track_id"].to_pylist())]
    catalog = small_catalog.root / "bracketed.parquet"
    pq.write_table(manifest.set_column(0, "track_id", pa.array(ids)), catalog)
    code, out, _ = run_cli(capsys, "plan", "--catalog", str(catalog), "--out", str(tmp_path / "t"), "--model", MODEL)
    assert code == 0
    # One line per track, the id as given: Rich took `[live]` for markup and wrapped at 80 columns.
    assert any(line.startswith(f"  embed  {long_id}  ") for line in out.splitlines())


def test_query_json_and_whole_values(tables, small_labels, capsys):
    good = sorted(la["track_id"] for la in small_labels if la["broken"] is None)
    sql = "SELECT track_id, embedding, embedded_at FROM embeddings ORDER BY track_id"
    code, out, _ = run_cli(capsys, "query", "--out", tables, "--json", "--limit", "0", sql)
    assert code == 0
    rows = json.loads(out)
    assert [r["track_id"] for r in rows] == good
    assert len(rows[0]["embedding"]) == 120 and isinstance(rows[0]["embedded_at"], str)
    code, out, _ = run_cli(capsys, "query", "--out", tables, "SELECT embedding FROM embeddings LIMIT 1")
    # Piped, the whole embedding is printed; only a terminal gets the 60-character preview.
    assert out.count(",") >= 119 and "..." not in out


def test_query_reads_only_the_tables_by_default(tables, small_catalog, tmp_path, capsys):
    labels = str(small_catalog.labels_path)
    join = f"SELECT count(*) AS n FROM embeddings e JOIN '{labels}' l USING (track_id)"
    code, _, err = run_cli(capsys, "query", "--out", tables, join)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("catalog-embed: error: ") and "--allow-files" in err
    written = tmp_path / "copy.csv"
    for sql in (
        "SELECT * FROM read_csv('/etc/passwd')",
        f"COPY embeddings TO '{written}'",
        "SELECT * FROM glob('/*')",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    ):
        code, out, err = run_cli(capsys, "query", "--out", tables, sql)
        assert code == 2 and out == "" and err.count("\n") == 1, (sql, err)
    assert not written.exists()
    code, out, _ = run_cli(capsys, "query", "--out", tables, "--allow-files", "--json", join)
    assert code == 0 and json.loads(out)[0]["n"] > 0


@pytest.mark.parametrize(
    ("sql", "message"),
    [("", "the SQL statement is empty"), (" ; ", "the SQL statement is empty"), ("SELEC 1", "the SQL failed")],
)
def test_bad_sql_is_one_line(tables, capsys, sql, message):
    code, out, err = run_cli(capsys, "query", "--out", tables, sql)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"catalog-embed: error: {message}")


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("embed", ["(default: 2)", "(default: musicnn-msd)", "(default: 1800.0)"]),
        ("query", ["(default: 50)"]),
        ("vacuum", ["(default: 24.0)"]),
        ("tag", ["(default: 65536)"]),
    ],
)
def test_help_shows_defaults(capsys, command, shown):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in shown:
        assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_probe_and_tag_read_the_tables_folder_like_every_other_command(tmp_path, capsys):
    z = latent(120)
    root = tmp_path / "tables"
    write_embeddings(root / "embeddings", embeddings_rows(z, dim=8))
    labels = tmp_path / "labels.parquet"
    pq.write_table(labels_for("multiclass", z), labels)
    base = ["--labels", str(labels), "--task", "genre", "--kind", "multiclass", "--max-epochs", "2"]
    reports = []
    for i, embeddings in enumerate((str(root), str(root / "embeddings"))):
        code, _, err = run_cli(capsys, "probe", "--embeddings", embeddings, "--out", str(tmp_path / f"p{i}"), *base)
        assert code == 0, err
        reports.append(json.loads((tmp_path / f"p{i}" / "report.json").read_text()))
    assert reports[0]["probe_id"] == reports[1]["probe_id"]
    code, _, err = run_cli(
        capsys, "tag", "--probe", str(tmp_path / "p0"), "--embeddings", str(root), "--out", str(tmp_path / "pred")
    )
    assert code == 0 and "120 tagged" in err


def test_a_reader_that_stops_early_is_no_error(tables):
    # `catalog-embed query --json ... | head -c 100`: the reader leaves; the command ends quietly, no traceback.
    root = Path(__file__).resolve().parents[2]
    sql = "SELECT * FROM range(300000)"  # megabytes: far more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "catalog_embed.pipelines.cli", "query", "--out", tables, "--json", "--limit", "0", sql],
        env=dict(os.environ, PYTHONPATH=str(root)), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
