"""Paired and unpaired comparisons against scipy, hand-computed cases and a coverage simulation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from polypure.evaluation.statistics import (
    PairedResult,
    UnpairedResult,
    holm,
    holm_rows,
    mann_whitney_rank_biserial,
    matched_pairs_rank_biserial,
    paired,
    unpaired,
)


def _pairs(seed, n=30, shift=0.3, zeros=0, ties=False):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = a + shift + rng.normal(size=n)
    if ties:
        b = a + np.round(b - a, 1)  # many equal absolute differences
    b[:zeros] = a[:zeros]
    return a, b


# --- paired -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "zeros", "ties"), [(8, 0, False), (30, 0, False), (9, 2, False), (10, 0, True),
                                                  (9, 1, True), (40, 4, True), (120, 0, False), (120, 10, True)])
def test_paired_matches_scipy_wilcoxon(n, zeros, ties):
    """Mean difference and p-value agree with numpy and scipy.stats.wilcoxon."""
    # covers each of scipy's paths: exact (<= 50, no ties or zeros), permutation (<= 13 with ties or zeros,
    # which paired() enumerates itself), normal approximation (ties or zeros above 13, everything above 50)
    a, b = _pairs(n, n=n, zeros=zeros, ties=ties)
    r = paired(a, b, n_resamples=200)
    d = b - a
    assert r.n == n and r.dropped == 0 and r.zeros == int((d == 0).sum()) >= zeros
    assert r.mean_diff == pytest.approx(d.mean(), abs=1e-12)
    assert r.mean_diff == pytest.approx(r.mean_b - r.mean_a, abs=1e-12)
    expected = sps.wilcoxon(b, a, zero_method="zsplit", alternative="two-sided").pvalue
    assert r.p_value == pytest.approx(expected, rel=1e-12)
    assert r.reason == ""


def test_paired_sign_is_b_minus_a():
    """Swapping the sides flips the signs and keeps the p-value."""
    a, b = _pairs(1, shift=2.0)
    forward, backward = paired(a, b), paired(b, a)
    assert forward.mean_diff > 0 and forward.effect > 0 and forward.ci_low > 0
    assert backward.mean_diff == pytest.approx(-forward.mean_diff)
    assert backward.effect == pytest.approx(-forward.effect)
    assert backward.p_value == pytest.approx(forward.p_value)


def test_matched_pairs_rank_biserial_by_hand():
    """Rank-biserial on hand-ranked cases, with a zero and with ties."""
    # |d| = 1, 2, 3, 4 -> ranks 1..4; R+ = 1 + 2 + 4 = 7, R- = 3; (7 - 3) / 10
    assert matched_pairs_rank_biserial([1.0, 2.0, -3.0, 4.0]) == pytest.approx(0.4)
    # a zero difference: |d| = 1, 2, 3, 0, 4 -> ranks 2, 3, 4, 1, 5; the zero's rank 1 goes half to each
    # side: R+ = 2 + 4 + 5 + 0.5 = 11.5, R- = 3 + 0.5 = 3.5, total 15 -> 8 / 15
    assert matched_pairs_rank_biserial([1.0, -2.0, 3.0, 0.0, 4.0]) == pytest.approx(8 / 15)
    # ties: |d| = 1, 1, 2 -> average ranks 1.5, 1.5, 3; R+ = 1.5 + 3 = 4.5, R- = 1.5; (4.5 - 1.5) / 6
    assert matched_pairs_rank_biserial([1.0, -1.0, 2.0]) == pytest.approx(0.5)
    assert matched_pairs_rank_biserial([0.0, 0.0]) == 0.0
    assert math.isnan(matched_pairs_rank_biserial([]))


def test_effect_agrees_with_scipy_rank_sums():
    """The effect follows from scipy's rank sum statistic."""
    # without zeros, scipy's two-sided statistic is min(R+, R-), and R+ + R- = n (n + 1) / 2
    a, b = _pairs(3, n=25)
    d = b - a
    total = 25 * 26 / 2
    r_minus_or_plus = sps.wilcoxon(d).statistic
    assert abs(paired(a, b).effect) == pytest.approx((total - 2 * r_minus_or_plus) / total)


def test_interval_matches_scipy_percentile_bootstrap():
    """The interval agrees with scipy.stats.bootstrap (percentile)."""
    a, b = _pairs(5, n=60)
    ours = paired(a, b, n_resamples=20000, seed=1)
    theirs = sps.bootstrap((b - a,), np.mean, n_resamples=20000, method="percentile",
                           rng=np.random.default_rng(2)).confidence_interval
    width = theirs.high - theirs.low
    # different random streams: agreement to Monte Carlo error, a few per cent of the width
    assert ours.ci_low == pytest.approx(theirs.low, abs=0.03 * width)
    assert ours.ci_high == pytest.approx(theirs.high, abs=0.03 * width)


def test_interval_is_seeded():
    """The same seed gives the same interval; the confidence widens it."""
    a, b = _pairs(6)
    assert paired(a, b, seed=3) == paired(a, b, seed=3)
    assert paired(a, b, seed=3).ci_low != paired(a, b, seed=4).ci_low
    narrow = paired(a, b, confidence=0.5)
    wide = paired(a, b, confidence=0.99)
    assert wide.ci_low < narrow.ci_low < narrow.ci_high < wide.ci_high


def test_interval_covers_known_difference_at_nominal_rate():
    """The 95 % interval covers a known difference in 93-97 % of 400 draws."""
    # 400 seeded draws of n = 100 normal pairs, true mean difference 0.5. At n = 100 the percentile
    # interval's own coverage is about 94.5-95 % (simulations of 2000-3000 draws); at n = 40 it is about
    # 93 %, the known narrowness of the percentile bootstrap for small n (z instead of t, sd with 1 / n),
    # which would leave a 400-draw estimate below 93 % about half the time: no stable test.
    covered = 0
    for draw in range(400):
        rng = np.random.default_rng(draw)
        a = rng.normal(size=100)
        b = a + 0.5 + rng.normal(size=100)
        r = paired(a, b, seed=draw)
        covered += r.ci_low <= 0.5 <= r.ci_high
    assert 0.93 <= covered / 400 <= 0.97


def test_nan_pairs_are_dropped_pairwise_and_counted():
    """A pair with a NaN or infinite value on either side is dropped and counted."""
    a, b = _pairs(7, n=20)
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[[0, 3]] = np.nan
    b_nan[[3, 5]] = np.nan
    b_nan[8] = np.inf
    r = paired(a_nan, b_nan, seed=0)
    keep = np.ones(20, bool)
    keep[[0, 3, 5, 8]] = False
    assert (r.n, r.dropped) == (16, 4)
    assert r.as_dict() == paired(a[keep], b[keep], seed=0).as_dict() | {"dropped": 4}


def test_paired_edge_cases_give_nan_with_reason():
    """No pair, too few pairs and all-zero differences give NaN fields and a reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = paired([np.nan, 1.0], [2.0, np.nan])
        assert (empty.n, empty.dropped) == (0, 2) and math.isnan(empty.mean_diff) and empty.reason
        few = paired([1.0, 2.0, 3.0], [2.0, 2.5, 5.0])
        assert few.n == 3 and math.isnan(few.p_value) and math.isnan(few.ci_low) and "fewer" in few.reason
        assert few.mean_diff == pytest.approx(3.5 / 3) and few.effect == 1.0
        # the floor of six pairs: all six differences positive give the exact p = 2 / 2**6 (hand value)
        assert math.isnan(paired(np.zeros(5), np.arange(1.0, 6.0)).p_value)
        assert paired(np.zeros(6), np.arange(1.0, 7.0)).p_value == pytest.approx(2 / 64)
        same = paired(np.arange(10.0), np.arange(10.0))
        assert math.isnan(same.p_value) and same.effect == 0.0 and same.zeros == 10
        assert same.mean_diff == same.ci_low == same.ci_high == 0.0 and "zero" in same.reason
    with pytest.raises(ValueError, match="same length"):
        paired([1.0, 2.0], [1.0])


def test_result_converts_to_a_row():
    """as_dict gives the fields in order, ready for a table."""
    row = paired(*_pairs(8)).as_dict()
    assert list(row) == [f.name for f in PairedResult.__dataclass_fields__.values()]
    assert row["test"] == "wilcoxon" and isinstance(row["n"], int)
    assert unpaired(*_pairs(8)).as_dict()["test"] == "mann-whitney"


# --- unpaired ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_a", "n_b", "ties"), [(7, 9, False), (30, 45, False), (40, 25, True)])
def test_unpaired_matches_scipy_mannwhitneyu(n_a, n_b, ties):
    """p-value and effect agree with scipy.stats.mannwhitneyu."""
    rng = np.random.default_rng(n_a)
    a, b = rng.normal(size=n_a), rng.normal(0.4, size=n_b)
    if ties:
        a, b = np.round(a), np.round(b)
    r = unpaired(a, b, n_resamples=200)
    test = sps.mannwhitneyu(b, a, alternative="two-sided")
    assert r.p_value == pytest.approx(test.pvalue, rel=1e-12)
    assert r.effect == pytest.approx(2 * test.statistic / (n_a * n_b) - 1, abs=1e-12)
    assert r.mean_diff == pytest.approx(b.mean() - a.mean(), abs=1e-12)
    assert (r.n_a, r.n_b, r.dropped_a, r.dropped_b) == (n_a, n_b, 0, 0)


def test_mann_whitney_rank_biserial_by_hand_and_by_pairs():
    """Rank-biserial by hand and as favourable minus unfavourable pairs."""
    # b = 2 beats a = 1, ties a = 2, loses to a = 3; b = 4 and b = 5 beat all three:
    # 7 favourable, 1 unfavourable, 1 tie of 9 pairs -> (7 - 1) / 9
    assert mann_whitney_rank_biserial([1, 2, 3], [2, 4, 5]) == pytest.approx(6 / 9)
    rng = np.random.default_rng(0)
    a, b = np.round(rng.normal(size=15), 1), np.round(rng.normal(size=11), 1)
    share = np.mean(np.sign(b[None, :] - a[:, None]))  # P(b > a) - P(b < a) over all pairs
    assert mann_whitney_rank_biserial(a, b) == pytest.approx(share, abs=1e-12)


def test_unpaired_interval_matches_scipy_bootstrap():
    """The two-sample interval agrees with scipy.stats.bootstrap (percentile)."""
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=50), rng.normal(0.5, 2.0, size=70)
    ours = unpaired(a, b, n_resamples=20000, seed=1)
    theirs = sps.bootstrap((a, b), lambda x, y, axis: y.mean(axis) - x.mean(axis), n_resamples=20000,
                           method="percentile", rng=np.random.default_rng(2)).confidence_interval
    width = theirs.high - theirs.low
    assert ours.ci_low == pytest.approx(theirs.low, abs=0.03 * width)
    assert ours.ci_high == pytest.approx(theirs.high, abs=0.03 * width)


def test_unpaired_drops_nan_per_side_and_edge_cases():
    """NaN are dropped per side; empty, small and constant samples."""
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=12), rng.normal(size=9)
    a[[1, 2]] = np.nan
    b[0] = np.nan
    r = unpaired(a, b)
    assert (r.n_a, r.n_b, r.dropped_a, r.dropped_b) == (10, 8, 2, 1)
    assert r.p_value == pytest.approx(sps.mannwhitneyu(b[1:], a[~np.isnan(a)]).pvalue)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(unpaired([np.nan], [1.0, 2.0]).mean_diff)
        few = unpaired([1.0, 2.0], np.arange(10.0))
        assert math.isnan(few.p_value) and math.isnan(few.ci_high) and not math.isnan(few.effect)
        equal = unpaired(np.ones(6), np.ones(8))
        assert math.isnan(equal.p_value) and equal.effect == 0.0 and "equal" in equal.reason
    assert isinstance(r, UnpairedResult)


# --- Holm -------------------------------------------------------------------------------------------------

def test_holm_textbook_example():
    """Holm on the worked example of p = 0.01, 0.04, 0.03, 0.005."""
    # Worked example of the Wikipedia article "Holm-Bonferroni method" (section Example): four hypotheses
    # with p = 0.01, 0.04, 0.03, 0.005 at alpha = 0.05. By hand, sorted p and multipliers m - j + 1:
    #   0.005 * 4 = 0.02;  0.01 * 3 = 0.03;  0.03 * 2 = 0.06;  0.04 * 1 = 0.04 -> max(0.06, 0.04) = 0.06.
    # Holm rejects H4 (0.005) and H1 (0.01) and stops at H3 (0.03 > 0.05 / 2), as the adjusted values say.
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    assert (adjusted <= 0.05).tolist() == [True, False, False, True]


def _holm_by_definition(p):
    # adjusted p_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)), with i, j counted from 1 in ascending order
    m = len(p)
    order = sorted(range(m), key=lambda k: p[k])
    out = [0.0] * m
    for i in range(m):
        out[order[i]] = min(1.0, max((m - j) * p[order[j]] for j in range(i + 1)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_holm_matches_definition(seed):
    """Holm equals its definition computed by loops, with ties."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 0.3, size=17) ** 2
    p[:3] = p[3]  # ties
    np.testing.assert_allclose(holm(p), _holm_by_definition(p.tolist()), rtol=1e-12)


def test_holm_is_monotone_capped_and_nan_aware():
    """NaN stays NaN and is not counted; monotone; capped at 1; any shape."""
    p = np.array([0.2, np.nan, 0.01, 0.6, np.nan, 0.02])
    adjusted = holm(p)
    assert np.isnan(adjusted[[1, 4]]).all()
    finite = ~np.isnan(p)
    np.testing.assert_allclose(adjusted[finite], _holm_by_definition(p[finite].tolist()))  # m = 4, not 6
    order = np.argsort(p[finite])
    assert np.all(np.diff(adjusted[finite][order]) >= 0)
    assert np.nanmax(adjusted) <= 1.0 and holm([0.9, 0.8]).tolist() == [1.0, 1.0]
    assert holm(p.reshape(2, 3)).shape == (2, 3)
    assert holm([]).shape == (0,) and np.isnan(holm([np.nan])).all()


def test_holm_rows_adds_a_column():
    """holm_rows adds p_holm over all rows without changing the input."""
    rows = [paired(*_pairs(s, shift=0.1 * s)).as_dict() | {"space": f"s{s}"} for s in range(4)]
    adjusted = holm_rows(rows)
    np.testing.assert_allclose([row["p_holm"] for row in adjusted], holm([row["p_value"] for row in rows]))
    assert all(row["space"] == f"s{s}" for s, row in enumerate(adjusted)) and "p_holm" not in rows[0]
