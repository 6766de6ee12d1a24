"""`catalog-embed demo-catalog` through the real command line."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from catalog_embed.pipelines.cli import main


def test_demo_catalog_writes_a_labeled_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo-catalog", str(out), "--tracks", "8", "--duration", "3"]) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "8 tracks (6 broken on purpose)" in summary
    manifest = pq.read_table(out / "manifest.parquet")
    labels = pq.read_table(out / "labels.parquet")
    assert manifest.num_rows == labels.num_rows == 8
    assert (out / "README.txt").is_file()
    broken = dict(zip(labels["track_id"].to_pylist(), labels["broken"].to_pylist(), strict=True))
    for track_id, uri in zip(manifest["track_id"].to_pylist(), manifest["uri"].to_pylist(), strict=True):
        # Every row has its file, except the one that is missing on purpose.
        assert Path(uri).exists() == (broken[track_id] != "missing")


def test_demo_catalog_reports_bad_arguments_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo-catalog", str(tmp_path / "demo"), "--tracks", "4"]) == 2
    assert "n_broken=6 must be between 0 and n_tracks=4" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
