"""The analysts' math against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest

from catalog_embed.workers import analysis
from catalog_embed.workers.analysis import (
    distribution,
    exact_neighbours,
    linear_cka,
    neighbour_rank_correlation,
    overlap_at_k,
    recall_at_k,
    unit_rows,
)


def test_blocked_exact_search_equals_a_full_sort(monkeypatch):
    # Blocks smaller than the inputs, so queries and rows both span several blocks.
    monkeypatch.setattr(analysis, "_QUERY_ROWS", 70)
    monkeypatch.setattr(analysis, "_BLOCK_ROWS", 100)
    data = unit_rows(np.random.default_rng(0).standard_normal((450, 12)))
    rows = np.arange(0, 450, 2)
    found, sims = exact_neighbours(data[rows], data, 7, exclude=rows)
    scores = data[rows] @ data.T
    scores[np.arange(len(rows)), rows] = -np.inf
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(scores, expected, 1), rtol=1e-6)
    assert not (found == rows[:, None]).any()


def test_cka_is_one_under_rotation_and_scaling_and_low_for_unrelated_matrices():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 20))
    rotation, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, rng.standard_normal((300, 40))) < 0.2
    assert 0.2 < linear_cka(x, x + rng.standard_normal((300, 20))) < 1.0


def test_overlap_recall_rank_correlation_and_distribution():
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = np.array([[4, 3, 9, 10], [5, 6, 7, 8]])
    np.testing.assert_allclose(overlap_at_k(a, b), [0.5, 1.0])
    assert recall_at_k(b, a) == pytest.approx(0.75)
    x = unit_rows(np.random.default_rng(2).standard_normal((50, 6)))
    rows = np.arange(10)
    nn, _ = exact_neighbours(x[rows], x, 5, exclude=rows)
    np.testing.assert_allclose(neighbour_rank_correlation(x, x, rows, nn, nn), 1.0)
    other = unit_rows(np.random.default_rng(3).standard_normal((50, 6)))
    other_nn, _ = exact_neighbours(other[rows], other, 5, exclude=rows)
    unrelated = neighbour_rank_correlation(x, other, rows, nn, other_nn)
    # Over the union, each space's own neighbours are strangers to the other: unrelated spaces correlate negatively.
    assert (unrelated < 0).all()
    d = distribution(np.array([0.0, 1.0, np.nan]))
    assert d["count"] == 2 and d["mean"] == 0.5 and d["min"] == 0.0 and d["max"] == 1.0
