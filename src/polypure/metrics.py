"""Metrics of disentanglement, one neuron at a time (METHOD.md section 4).

* :func:`distance_correlation` -- the seed paper's metric: Pearson correlation between the strictly
  lower triangles of two Euclidean distance matrices of the same references (reference space, e.g.
  CLIP, against a feature space, e.g. relevance at one layer);
* :func:`cluster_distances` -- PURE's metric: mean reference-space distance between references in the
  same cluster (inner) and in different clusters (inter), with PURE's fallback when one side is empty;
* :func:`agreement` -- adjusted Rand index and normalised mutual information of a clustering against
  known labels (scikit-learn's implementations);
* :func:`mixture` -- how many label values make up at least a share of a neuron's references.

Example
-------
>>> import numpy as np
>>> from polypure.metrics import distance_correlation
>>> x = np.random.default_rng(0).normal(size=(10, 4))
>>> round(distance_correlation(x, x), 6)
1.0
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix of the rows of ``x`` (float64, exact zeros on the diagonal)."""
    x = np.asarray(x, np.float64)
    squared = np.einsum("ij,ij->i", x, x)
    d2 = squared[:, None] + squared[None, :] - 2 * x @ x.T
    np.maximum(d2, 0, out=d2)
    np.fill_diagonal(d2, 0)
    return np.sqrt(d2)


def distance_correlation(reference: np.ndarray, features: np.ndarray) -> float:
    """Pearson correlation of the strictly-lower-triangle distances of two embeddings of the same items.

    Parameters
    ----------
    reference, features : ndarray, shape (K, D1) and (K, D2)

    Returns
    -------
    float
        NaN when either set of distances is constant (for instance all-zero relevance vectors).
    """
    rows, cols = np.tril_indices(len(reference), k=-1)
    a = pairwise_distances(reference)[rows, cols]
    b = pairwise_distances(features)[rows, cols]
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def cluster_distances(reference: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean reference-space distance within clusters and between clusters (PURE).

    Pairs involving noise (label -1) are left out. As in PURE's evaluation, if there is no pair in
    different clusters the inter distance equals the inner one, and vice versa.

    Returns
    -------
    (inner, inter) : tuple of float
    """
    labels = np.asarray(labels)
    distances = pairwise_distances(reference)
    valid = labels >= 0
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    np.fill_diagonal(same, False)
    different = (labels[:, None] != labels[None, :]) & valid[:, None] & valid[None, :]
    inner = distances[same]
    inter = distances[different]
    if inter.size == 0:
        inter = inner
    if inner.size == 0:
        inner = inter
    if inner.size == 0:
        return float("nan"), float("nan")
    return float(inner.mean()), float(inter.mean())


def agreement(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[float, float]:
    """(adjusted Rand index, normalised mutual information) of a clustering against known labels."""
    return (float(adjusted_rand_score(labels_true, labels_pred)),
            float(normalized_mutual_info_score(labels_true, labels_pred)))


def mixture(values: np.ndarray, share: float = 0.2) -> int:
    """How many distinct values each make up at least ``share`` of ``values``."""
    _, counts = np.unique(np.asarray(values), return_counts=True)
    return int((counts >= share * len(values)).sum())
