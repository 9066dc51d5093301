"""Purity scores against direct double loops over pairs, hand cases, and their edge cases."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from polypure.evaluation.purity import (
    clarity,
    clarity_batch,
    monosemanticity_topk,
    monosemanticity_topk_batch,
    nearest_similarity,
    neuron_embedding,
    neuron_scores,
    polysemanticity,
    polysemanticity_batch,
    redundancy,
    split_gain,
    split_gain_batch,
    unit_normalise,
)

# --- direct implementations: one pair at a time -------------------------------------------------------------


def _has_direction(x):
    return bool(np.all(np.isfinite(x)) and np.linalg.norm(x) > 0)


def _cos(x, y):
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def brute_clarity(e):
    """Mean cosine over ordered pairs i != j of the references with a direction."""
    rows = [x for x in e if _has_direction(x)]
    sims = [_cos(rows[i], rows[j]) for i in range(len(rows)) for j in range(len(rows)) if i != j]
    return float(np.mean(sims)) if sims else float("nan")


def brute_split_gain(e, labels):
    """Weighted clarity of the clusters of two or more minus the clarity of their union, by loops."""
    kept = {}
    for x, label in zip(e, labels, strict=True):
        if label >= 0 and _has_direction(x):
            kept.setdefault(int(label), []).append(x)
    kept = {c: rows for c, rows in kept.items() if len(rows) >= 2}
    total = sum(len(rows) for rows in kept.values())
    if total < 2:
        return float("nan")
    weighted = sum(len(rows) / total * brute_clarity(np.array(rows)) for rows in kept.values())
    return weighted - brute_clarity(np.array([x for rows in kept.values() for x in rows]))


def brute_monosemanticity(e, acts):
    """Pach et al.'s weighted pair sum over n < m, one pair at a time."""
    keep = [i for i in range(len(e)) if _has_direction(e[i]) and np.isfinite(acts[i])]
    a = np.array([acts[i] for i in keep], float)
    a = (a - a.min()) / (a.max() - a.min()) if a.size and a.max() > a.min() else np.ones(a.size)
    num = den = 0.0
    for p, q in itertools.combinations(range(len(keep)), 2):  # pairs n < m
        num += a[p] * a[q] * _cos(e[keep[p]], e[keep[q]])
        den += a[p] * a[q]
    return num / den if den > 0 else float("nan")


def brute_nearest(layer):
    """Largest cosine of each neuron's mean unit embedding with another neuron's, by loops."""
    means = []
    for e in layer:
        rows = [x / np.linalg.norm(x) for x in e if _has_direction(x)]
        means.append(np.mean(rows, axis=0) if rows else None)
    out = []
    for k, mk in enumerate(means):
        sims = [_cos(mk, mj) for j, mj in enumerate(means) if j != k and mj is not None and mk is not None]
        out.append(max(sims) if sims else float("nan"))
    return np.array(out)


def _embeddings(seed, m=6, n=12, d=16):
    rng = np.random.default_rng(seed)
    # a shared direction per neuron plus noise, so that the scores are not all near 0
    return rng.normal(size=(m, 1, d)) + rng.normal(size=(m, n, d)) * rng.uniform(0.3, 2.0, size=(m, 1, 1))


def _orthogonal_groups(h=5, d=8):
    e = np.zeros((2 * h, d))
    e[:h, 0] = np.arange(1, h + 1)  # norms differ, directions do not
    e[h:, 1] = 3.0
    return e


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    # every edge case is meant to give NaN quietly, without a division warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- clarity -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_clarity_equals_mean_pairwise_cosine(seed):
    """Clarity is the mean pairwise cosine and the formula of SemanticLens."""
    e = _embeddings(seed)
    batch = clarity_batch(e)
    for k in range(len(e)):
        assert batch[k] == pytest.approx(brute_clarity(e[k]), abs=1e-12)
        assert clarity(e[k]) == batch[k]
        v = unit_normalise(e[k])
        n = len(v)
        assert batch[k] == pytest.approx((n * np.sum(v.mean(axis=0) ** 2) - 1) / (n - 1), abs=1e-12)


def test_clarity_hand_cases():
    """Two orthogonal groups, one direction, two opposite vectors."""
    h = 5
    # two orthogonal groups of 5: 2 * 5 * 4 ordered pairs of cosine 1 among 10 * 9 -> 4 / 9
    assert clarity(_orthogonal_groups(h)) == pytest.approx((h - 1) / (2 * h - 1))
    assert clarity(np.tile([[0.3, -2.0, 1.0]], (7, 1))) == pytest.approx(1.0)
    assert clarity([[1.0, 0.0], [-1.0, 0.0]]) == pytest.approx(-1.0)  # the lower bound -1 / (n - 1)


def test_clarity_edge_cases():
    """Fewer than two references give NaN; references without a direction are absent."""
    assert math.isnan(clarity([[1.0, 2.0]]))  # n = 1
    assert math.isnan(clarity([[1.0, 2.0], [0.0, 0.0]]))  # one reference with a direction left
    # zero and NaN rows are absent references: the same as leaving them out
    e = _embeddings(4)[0]
    padded = np.concatenate([e, np.zeros((2, e.shape[1])), np.full((1, e.shape[1]), np.nan)])
    assert clarity(padded) == pytest.approx(clarity(e), abs=1e-12)
    assert np.isnan(clarity_batch(np.zeros((2, 3, 4)))).all()
    with pytest.raises(ValueError, match="n_refs, D"):
        clarity(np.zeros((2, 3, 4)))


def test_unit_normalise_gives_nan_rows_without_warning():
    """Zero and non-finite rows become NaN rows, quietly."""
    v = unit_normalise([[3.0, 4.0], [0.0, 0.0], [np.inf, 1.0], [np.nan, 1.0]])
    np.testing.assert_allclose(v[0], [0.6, 0.8])
    assert np.isnan(v[1:]).all()
    np.testing.assert_allclose(neuron_embedding([[[2.0, 0.0], [0.0, 0.0], [0.0, 5.0]]]), [[0.5, 0.5]])


# --- polysemanticity -----------------------------------------------------------------------------------------

def test_polysemanticity_hand_cases():
    """Orthogonal groups give 1, one direction 0, too few references NaN."""
    assert polysemanticity(_orthogonal_groups(), seed=0) == pytest.approx(1.0)
    assert polysemanticity(np.tile([[0.3, -2.0, 1.0]], (7, 1))) == 0.0  # one direction, no k-means warning
    assert polysemanticity(np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(polysemanticity([[1.0, 0.0]]))
    assert math.isnan(polysemanticity([[1.0, 0.0], [0.0, 0.0]]))


def test_polysemanticity_is_kmeans_on_unit_vectors():
    """The score is 1 - cos of the centres of seeded k-means on unit vectors."""
    e = _embeddings(5, m=4, n=20)
    batch = polysemanticity_batch(e, seed=3)
    for k in range(len(e)):
        v = e[k] / np.linalg.norm(e[k], axis=1, keepdims=True)
        with threadpool_limits(limits=1, user_api="openmp"):  # only speed: one thread is faster on 20 points
            c = KMeans(n_clusters=2, n_init=10, random_state=3).fit(v).cluster_centers_
        assert batch[k] == pytest.approx(1 - _cos(c[0], c[1]), abs=1e-9)
        assert polysemanticity(e[k], seed=3) == pytest.approx(batch[k], abs=1e-12)
    # positive rescaling of a reference does not change its direction, so not the score
    scaled = e[0] * np.random.default_rng(0).uniform(0.1, 10.0, size=(20, 1))
    assert polysemanticity(scaled, seed=3) == pytest.approx(batch[0], abs=1e-9)


# --- split gain ----------------------------------------------------------------------------------------------

def test_split_gain_hand_cases():
    """The right split of two orthogonal groups gains 1 - 4/9; one cluster gains nothing."""
    e = _orthogonal_groups(h=5)
    correct = [0] * 5 + [1] * 5
    assert split_gain(e, correct) == pytest.approx(1 - 4 / 9)  # both clusters have clarity 1
    assert split_gain(e, [0] * 10) == pytest.approx(0.0, abs=1e-12)  # one cluster: nothing gained
    mixed = [0, 1] * 5  # each cluster mixes the groups 3 + 2 and 2 + 3
    assert split_gain(e, mixed) == pytest.approx(brute_split_gain(e, mixed), abs=1e-12)
    assert split_gain(e, mixed) < 0.1


def test_split_gain_noise_and_singletons_leave_both_terms():
    """Noise and singletons leave both terms; too few left gives NaN."""
    e = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    # the odd reference as noise or as a cluster of one: the gain compares the same three references
    for labels in ([0, 0, 0, -1], [0, 0, 0, 1]):
        assert split_gain(e, labels) == pytest.approx(0.0, abs=1e-12)
    assert split_gain(e, [0, 0, 1, 1]) == pytest.approx(brute_split_gain(e, [0, 0, 1, 1]))
    assert math.isnan(split_gain(e, [-1, -1, -1, 0]))  # one reference left
    assert math.isnan(split_gain(e, [0, 1, 2, 3]))  # all singletons
    assert math.isnan(split_gain(np.zeros((4, 2)), [0, 0, 1, 1]))  # no direction


@pytest.mark.parametrize("seed", range(3))
def test_split_gain_batch_equals_direct_loops(seed):
    """The batch version equals the loops, with noise, singletons, sparse ids."""
    rng = np.random.default_rng(seed)
    e = _embeddings(seed, m=8, n=15)
    e[0, 3] = 0.0  # a reference without a direction
    labels = rng.integers(-1, 4, size=(8, 15)) * 7  # noise (-7 counts as noise too) and sparse ids
    labels[1] = rng.integers(0, 2, size=15)
    labels[2, :] = -1
    labels[3, :14] = np.arange(14)  # singletons; the last reference keeps its random label
    batch = split_gain_batch(e, labels)
    for k in range(8):
        expected = brute_split_gain(e[k], labels[k])
        if math.isnan(expected):
            assert math.isnan(batch[k])
        else:
            assert batch[k] == pytest.approx(expected, abs=1e-12)
            assert split_gain(e[k], labels[k]) == pytest.approx(batch[k], abs=1e-12)
    with pytest.raises(ValueError, match="labels"):
        split_gain_batch(e, labels[:, :3])


# --- monosemanticity (top-K) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_monosemanticity_equals_direct_pair_loop(seed):
    """The batch version equals the pair loop, with absent references."""
    rng = np.random.default_rng(seed)
    e = _embeddings(seed, m=5, n=10)
    acts = rng.gamma(2.0, size=(5, 10))
    e[1, 2] = 0.0
    acts[2, 4] = np.nan
    batch = monosemanticity_topk_batch(e, acts)
    for k in range(5):
        assert batch[k] == pytest.approx(brute_monosemanticity(e[k], acts[k]), abs=1e-12)
        assert monosemanticity_topk(e[k], acts[k]) == pytest.approx(batch[k], abs=1e-12)


def test_monosemanticity_edge_cases():
    """Equal activations, a single weighted reference, the zero-weight reference."""
    e = _embeddings(7)[0]
    # equal activations: equal weights, the score is the clarity
    assert monosemanticity_topk(e, np.full(len(e), 2.5)) == pytest.approx(clarity(e), abs=1e-12)
    # one reference with a positive weight (the others at the minimum): no pair left
    acts = np.zeros(len(e))
    acts[0] = 1.0
    assert math.isnan(monosemanticity_topk(e, acts))
    assert math.isnan(monosemanticity_topk(e[:1], [1.0]))
    # the least activating reference has weight 0: changing its embedding changes nothing
    acts = np.arange(len(e), dtype=float)
    other = e.copy()
    other[0] = -e[0] * 3
    assert monosemanticity_topk(other, acts) == pytest.approx(monosemanticity_topk(e, acts), abs=1e-12)
    # orthogonal groups weighted towards one: between clarity of the mix (4 / 9) and 1
    score = monosemanticity_topk(_orthogonal_groups(), [9, 9, 9, 9, 9, 1, 1, 1, 1, 0])
    assert 4 / 9 < score < 1
    with pytest.raises(ValueError, match="activations"):
        monosemanticity_topk_batch(e[None], np.ones((1, 3)))


# --- redundancy ----------------------------------------------------------------------------------------------

def test_redundancy_equals_direct_loops():
    """Nearest similarity and redundancy equal the loops, with empty neurons."""
    layer = _embeddings(8, m=9, n=7)
    layer[2] = 0.0  # a neuron without any reference with a direction
    layer[4, :3] = np.nan
    expected = brute_nearest(layer)
    got = nearest_similarity(layer)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()
    assert redundancy(layer) == pytest.approx(np.nanmean(expected), abs=1e-12)


def test_redundancy_hand_and_edge_cases():
    """Pairs of duplicates give 1; one neuron or none with a direction gives NaN."""
    duplicates = np.array([[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.5]]])
    assert redundancy(duplicates) == pytest.approx(1.0)
    assert np.isnan(nearest_similarity(duplicates[:1])).all() and math.isnan(redundancy(duplicates[:1]))
    assert math.isnan(redundancy(np.zeros((3, 2, 2))))


def test_neuron_scores_bundles_the_batch_functions():
    """neuron_scores returns the batch functions' results by name."""
    e = _embeddings(9, m=3, n=8)
    acts = np.random.default_rng(0).uniform(size=(3, 8))
    scores = neuron_scores(e, acts, seed=1)
    assert sorted(scores) == ["clarity", "monosemanticity_topk", "nearest_similarity", "polysemanticity"]
    np.testing.assert_array_equal(scores["clarity"], clarity_batch(e))
    np.testing.assert_array_equal(scores["polysemanticity"], polysemanticity_batch(e, seed=1))
    assert "monosemanticity_topk" not in neuron_scores(e)
