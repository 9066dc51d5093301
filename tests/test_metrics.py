"""Metrics against independent computations (scipy, brute-force loops, scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform
from scipy.stats import pearsonr

from polypure.evaluation.metrics import cluster_distances, distance_correlation, mixture, pairwise_distances


@pytest.mark.parametrize("seed", range(4))
def test_distance_correlation_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(50, 512))
    b = a[:, :30] @ rng.normal(size=(30, 64)) + rng.normal(size=(50, 64)) * (seed + 1)
    expected = pearsonr(pdist(a), pdist(b)).statistic
    assert distance_correlation(a, b) == pytest.approx(expected, abs=1e-10)


def test_distances_are_euclidean():
    x = np.random.default_rng(0).normal(size=(20, 7)) * 100
    np.testing.assert_allclose(pairwise_distances(x), squareform(pdist(x)), atol=1e-9)


def test_constant_distances_give_nan():
    assert np.isnan(distance_correlation(np.zeros((5, 3)), np.random.default_rng(0).normal(size=(5, 3))))


def brute_cluster_distances(x, labels):
    inner, inter = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i == j or labels[i] < 0 or labels[j] < 0:
                continue
            d = np.linalg.norm(x[i] - x[j])
            (inner if labels[i] == labels[j] else inter).append(d)
    inter = inter or inner
    inner = inner or inter
    return np.mean(inner), np.mean(inter)


@pytest.mark.parametrize("labels", [
    [0, 0, 1, 1, 1, 0, 1, 0, 0, 1],
    [0, 1, 2, 0, 1, 2, 3, 3, 0, 0],
    [0] * 10,                               # one cluster: inter falls back to inner (PURE)
    [-1, 0, 0, 1, -1, 1, 1, 0, -1, 0],      # HDBSCAN noise is left out
])
def test_cluster_distances_equal_brute_force(labels):
    x = np.random.default_rng(3).normal(size=(10, 6))
    np.testing.assert_allclose(cluster_distances(x, np.array(labels)), brute_cluster_distances(x, labels))


def test_mixture_counts_values_with_enough_share():
    assert mixture(np.array([0] * 30 + [1] * 15 + [2] * 5)) == 2
    assert mixture(np.array([0] * 50)) == 1
    assert mixture(np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 10 + [4] * 10)) == 5


def test_degenerate_spaces_are_named():
    from polypure.evaluation.metrics import degenerate

    rng = np.random.default_rng(0)
    varied = rng.normal(size=(6, 5))
    one_hot = np.zeros((6, 5))
    one_hot[:, 2] = rng.uniform(0.5, 2, size=6)          # one channel, varying strength
    labels_like = np.eye(5)[[0, 1, 2, 0, 1, 2]]          # one-hot on different channels: a real split
    identical = np.tile(rng.normal(size=5), (6, 1))
    assert degenerate(np.stack([varied, one_hot, labels_like, identical, np.zeros((6, 5))])).tolist() == \
        ["", "one-hot", "", "constant", "constant"]
    assert degenerate(identical + rng.normal(size=(6, 5)) * 1e-9 * np.abs(identical).max()) == "constant"
    assert degenerate(np.tile(np.eye(5)[3], (6, 1))) == "one-hot"


def test_clusterings_that_split_nothing_are_named():
    from polypure.evaluation.metrics import clustering_status, single_label

    labels = np.array([[-1, -1, -1, -1], [0, 0, -1, 0], [2, 2, 2, 2], [0, 1, -1, 1], [0, 1, 1, 0]])
    assert clustering_status(labels).tolist() == ["all-noise", "one-cluster", "one-cluster", "", ""]
    assert single_label(np.array([[3, 3, 3], [3, 1, 3]])).tolist() == [True, False]
