"""Engine- and storage-free math on embedding matrices: exact neighbours, recall, neighbour overlap, linear CKA and
per-track neighbour-rank correlation.

Similarity is cosine throughout: rows are L2-normalised once (`unit_rows`) and compared by inner product.
"""

from __future__ import annotations

import warnings

import numpy as np

# Queries and candidate rows scored per block: the (queries x rows) score matrix stays under 256 MiB.
_QUERY_ROWS = 1024
_BLOCK_ROWS = 65536


def unit_rows(x: np.ndarray) -> np.ndarray:
    """`x` as float32 with each row scaled to unit length (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def exact_neighbours(
    queries: np.ndarray, data: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` rows of `data` most similar to each query, best first, by exact search.

    Args:
        queries: (q, d) unit rows.
        data: (n, d) unit rows.
        k: neighbours per query (at most n, less one when excluding).
        exclude: (q,) row of `data` each query must not return (itself), or -1 for none.

    Returns:
        (indices, similarities), each (q, k'), k' = min(k, rows available).
    """
    k = min(k, len(data) - (1 if exclude is not None else 0))
    found = [
        _exact_block(queries[start : start + _QUERY_ROWS], data, k,
                     None if exclude is None else exclude[start : start + _QUERY_ROWS])
        for start in range(0, len(queries), _QUERY_ROWS)
    ]
    if not found:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _exact_block(
    queries: np.ndarray, data: np.ndarray, k: int, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """`exact_neighbours` for one block of queries, scanning `data` in blocks of rows."""
    q = len(queries)
    best_s = np.full((q, k), -np.inf, dtype=np.float32)
    best_i = np.zeros((q, k), dtype=np.int64)
    for start in range(0, len(data), _BLOCK_ROWS):
        scores = queries @ data[start : start + _BLOCK_ROWS].T
        if exclude is not None:
            inside = (exclude >= start) & (exclude < start + scores.shape[1])
            scores[np.flatnonzero(inside), exclude[inside] - start] = -np.inf
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i, best_s


def overlap_at_k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the fraction of the k neighbours in `a` that are also among the k in `b` (both (q, k) ids)."""
    k = a.shape[1]
    return np.array([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b, strict=True)], dtype=np.float64)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same rows (Kornblith et al., 2019).

    1.0 for representations equal up to rotation and isotropic scaling, near 0 for unrelated ones; computed in
    feature space, ||Y'X||^2 / (||X'X|| ||Y'Y||) on centred columns, so it is linear in the number of rows.
    """
    x = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64) - np.mean(y, axis=0, dtype=np.float64)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def neighbour_rank_correlation(
    a: np.ndarray, b: np.ndarray, rows: np.ndarray, a_neighbours: np.ndarray, b_neighbours: np.ndarray
) -> np.ndarray:
    """Per query track, Spearman's correlation of its similarities in space `a` and in space `b` over the union of
    its neighbours in both spaces: 1 when both spaces order that neighbourhood alike.

    Args:
        a: (n, da) unit rows of the shared tracks in the first space.
        b: (n, db) unit rows of the same tracks, same order, in the second space.
        rows: (q,) the query tracks' rows.
        a_neighbours: (q, k) their neighbours' rows in `a`.
        b_neighbours: (q, k) their neighbours' rows in `b`.

    Returns:
        (q,) correlations (NaN where a neighbourhood has constant similarities in one space). Unrelated spaces
        score below 0: each space's own neighbours are strangers in the other.
    """
    from scipy.stats import ConstantInputWarning, spearmanr  # scipy: the [analysts] extra; the rest needs numpy only

    out = np.empty(len(rows), dtype=np.float64)
    with warnings.catch_warnings():
        # A constant neighbourhood has no rank correlation: NaN, as documented, without a warning per track.
        warnings.simplefilter("ignore", ConstantInputWarning)
        for i, row in enumerate(rows):
            union = np.union1d(a_neighbours[i], b_neighbours[i])
            out[i] = spearmanr(a[union] @ a[row], b[union] @ b[row]).statistic
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of `truth` (exact neighbours) present in the same row of `found`."""
    return float(np.mean(overlap_at_k(found, truth))) if len(truth) else float("nan")


def distribution(values: np.ndarray) -> dict[str, float]:
    """Mean and quantiles of the finite values (count included), JSON-ready."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"count": 0}
    q = np.quantile(finite, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    names = ("min", "p10", "p25", "median", "p75", "p90", "max")
    quantiles = {name: float(value) for name, value in zip(names, q, strict=True)}
    return {"count": int(len(finite)), "mean": float(finite.mean()), **quantiles}
