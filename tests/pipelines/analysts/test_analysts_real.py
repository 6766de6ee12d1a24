"""The analysts' commands on tracks embedded by the real embed job (real audio, two handcrafted encoders)."""

from __future__ import annotations

import json
import re

import matplotlib.image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers.cli import run_cli

# Enough tracks that k = 5 neighbourhoods can differ between models, with every split populated for probes.
CATALOG = DemoCatalogConfig(n_tracks=48, duration_s=3.0, n_broken=0, seed=5)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The catalog embedded with mfcc-stats and chroma-stats into one output root."""
    catalog = render_demo_catalog(tmp_path_factory.mktemp("catalog"), CATALOG)
    out = str(tmp_path_factory.mktemp("tables"))
    for model in ("mfcc-stats", "chroma-stats"):
        config = EmbedConfig(catalog=str(catalog.manifest_path), out=out, encoder=EncoderConfig(model=model), workers=1)
        assert run_embed(config, Console(quiet=True)).status == "succeeded"
    return out, catalog


def test_two_models_compare_in_between_and_a_model_with_itself_as_identical(embedded, capsys, tmp_path):
    out, catalog = embedded
    code, printed, _ = run_cli(capsys, "compare", "--out", out, "--a", "mfcc-stats", "--b", "chroma-stats", "--k", "5",
                               "--labels", str(catalog.labels_path), "--task", "instrument_family",
                               "--kind", "multiclass", "--report", str(tmp_path / "ab"))
    assert code == 0, printed
    report = json.loads((tmp_path / "ab" / "report.json").read_text())
    assert report["shared_tracks"] == CATALOG.n_tracks
    assert 0.0 < report["overlap"]["mean"] < 1.0
    assert 0.0 < report["cka"] < 1.0
    assert -1.0 <= report["rank_corr"]["median"] < 1.0
    (probe,) = report["probes"]
    assert probe["metric"] == "accuracy" and probe["delta"] == pytest.approx(probe["b"] - probe["a"])
    assert "instrument_family" in printed
    code, _, _ = run_cli(capsys, "compare", "--out", out, "--a", "mfcc-stats", "--b", "mfcc-stats", "--k", "5",
                         "--report", str(tmp_path / "aa"), "--fail-under", "overlap=1", "--fail-under", "cka=0.999")
    assert code == 0
    report = json.loads((tmp_path / "aa" / "report.json").read_text())
    assert report["overlap"]["mean"] == 1.0 and report["cka"] == pytest.approx(1.0)


def test_labels_that_do_not_join_are_refused_before_any_work(embedded, capsys, tmp_path):
    out, _ = embedded
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"track_id": ["x1", "x2"], "genre": ["a", "b"]}), labels)
    for argv in (
        ("compare", "--a", "mfcc-stats", "--b", "chroma-stats", "--labels", str(labels), "--task", "genre",
         "--kind", "multiclass", "--report", str(tmp_path / "r")),
        ("map", "--labels", str(labels), "--color-by", "genre", "--png", str(tmp_path / "m.png")),
    ):
        code, _, err = run_cli(capsys, argv[0], "--out", out, "--model", "mfcc-stats", *argv[1:]) if argv[0] == "map" \
            else run_cli(capsys, argv[0], "--out", out, *argv[1:])
        assert code == 2 and "must use the catalog's ids" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "r").exists()


def test_map_writes_a_titled_png_and_a_self_contained_html_with_track_ids(embedded, capsys, tmp_path):
    out, catalog = embedded
    png, page = tmp_path / "map.png", tmp_path / "map.html"
    code, _, err = run_cli(capsys, "map", "--out", out, "--model", "mfcc-stats", "--labels", str(catalog.labels_path),
                           "--color-by", "instrument_family", "--png", str(png), "--html", str(page), "--method", "pca")
    assert code == 0 and f"{CATALOG.n_tracks} tracks" in err
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 500 and image.shape[1] > 700
    text = page.read_text()
    assert "<svg" in text and "mfcc-stats / stats: 48 tracks (PCA" in text
    assert len(re.findall(r"<circle ", text)) == CATALOG.n_tracks
    labels = pq.read_table(catalog.labels_path).to_pylist()
    first = labels[0]
    assert f"<title>{first['track_id']} — instrument_family: {first['instrument_family']}</title>" in text
    # Self-contained: nothing fetched from elsewhere (the SVG namespace is an identifier, not a fetch).
    assert "<script" not in text and "<link" not in text
    assert set(re.findall(r"https?://[^\"' ]+", text)) == {"http://www.w3.org/2000/svg"}
