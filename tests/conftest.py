"""Shared fixtures: a small demo catalog rendered once per test session (real codecs, real broken files)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from catalog_embed.workers.demo_catalog import DemoCatalog, DemoCatalogConfig, render_demo_catalog

# Every codec twice plus one file of each broken kind (truncated mp3 and flac, empty, not audio, corrupt header,
# missing): 18 rows, 4 s each.
SMALL_CATALOG = DemoCatalogConfig(n_tracks=18, duration_s=4.0, n_broken=6, seed=7)


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory) -> DemoCatalog:
    """The rendered catalog; treat it as read-only."""
    return render_demo_catalog(tmp_path_factory.mktemp("catalog"), SMALL_CATALOG)


@pytest.fixture(scope="session")
def small_labels(small_catalog) -> list[dict]:
    """Ground truth per track (`broken` names the bad ones)."""
    return pq.read_table(small_catalog.labels_path).to_pylist()
