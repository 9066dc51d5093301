"""Stores compared with each other (polypure.evaluation.store_comparison, ``polypure compare``).

Paired comparisons that equal polypure.evaluation.statistics.paired on the stored per-neuron metrics, unpaired ones that
equal polypure.evaluation.statistics.unpaired, refusals with one line and exit status 2, and the files written.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from polypure import Experiment
from polypure.cli import main
from polypure.errors import ConfigError
from polypure.evaluation import statistics as stats
from polypure.evaluation.store_comparison import COMPARISON_COLUMNS, PAIRED, UNPAIRED, compare_stores, write_comparison

from .helpers import random_images
from .nets import tiny

NEURONS = [0, 2, 4, 6, 8, 10, 12, 14]
READ_BACK = {"keep_default_na": False, "na_values": ["NaN"]}


def build(path, *, composite="gradient", images=40, seed=3, ground_truth=("class",), crop_composite=None):
    labels = {"of": "class"} if crop_composite is None else {"of": "class", "crop_composite": crop_composite}
    Experiment(model=tiny(seed=2), dataset=random_images(images, 32, seed=seed), store=path, progress=False,
               topk={"layers": ["c3"], "k": 10},
               relevance={"composite": composite, "n_refs": 10,
                          "targets": [{"layer": "c3", "neurons": NEURONS, "attribution_layers": ["c2"]}]},
               cluster={"methods": [{"name": "kmeans", "n_clusters": 2}]},
               evaluate={"references": ["labels"], "ground_truth": list(ground_truth), "labels": labels},
               ).run(["topk", "relevance", "embed", "cluster", "evaluate"])
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Five tiny stores of one model.

    a: gradient; b: epsilon_plus on the same data (the same top-K and references: paired); c: other images of
    the same count (same sample ids, other references); d: more images (other samples); e: the labels
    evaluator with another crop composite and no ground truth.
    """
    root = tmp_path_factory.mktemp("compare")
    return {"a": build(root / "a.h5"), "b": build(root / "b.h5", composite="epsilon_plus"),
            "c": build(root / "c.h5", seed=4), "d": build(root / "d.h5", images=48),
            "e": build(root / "e.h5", ground_truth=(), crop_composite="epsilon_plus")}


def stored(path, metric: str, space: str) -> np.ndarray:
    """A per-neuron metric of target c3 read with plain h5py."""
    with h5py.File(path, "r") as f:
        if metric == "corr labels":
            return f[f"metrics/c3/distance_correlation/labels/{space}"][()]
        if metric in ("inner labels", "inter labels"):
            return f[f"metrics/c3/cluster_distances/labels/{space}/kmeans"][()][:, int(metric.startswith("inter"))]
        kind, of = metric.split()
        return f[f"metrics/c3/{kind.lower()}/{of}/{space}/kmeans"][()]


#: Metrics of the spaces and clusterings, read from the store by :func:`stored`.
CLUSTER_METRICS = {"corr labels", "inner labels", "inter labels", "ARI class", "NMI class"}
#: Metrics with one value per neuron (their space is the reference space), and the split gain.
PURITY_METRICS = {"clarity labels", "polysem labels", "mono-topK labels", "redundancy labels"}


@pytest.fixture(scope="module")
def paired_result(stores):
    return compare_stores([stores["a"], stores["b"]], n_resamples=500)


def test_same_samples_neurons_and_references_give_paired_tests(paired_result, stores):
    table = paired_result.comparison
    assert list(table.columns) == list(COMPARISON_COLUMNS)
    assert set(table.test) == {PAIRED} and set(table.why) == {""}
    assert set(table.metric) == {*CLUSTER_METRICS, *PURITY_METRICS, "gain labels"}
    assert set(table.space) == {"c2", "activation", "labels"} and set(table.store_b) == {"b.h5"}
    assert set(table[table.space == "labels"].metric) == PURITY_METRICS
    for row in table[table.metric.isin(CLUSTER_METRICS)].itertuples():
        expected = stats.paired(stored(stores["a"], row.metric, row.space), stored(stores["b"], row.metric, row.space),
                                n_resamples=500).as_dict()
        for key in ("mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "effect", "n", "dropped", "zeros"):
            np.testing.assert_equal(float(getattr(row, key)), float(expected[key]), err_msg=f"{row.metric} {key}")
    np.testing.assert_allclose(table.p_holm, stats.holm(table.p_value.to_numpy(np.float64)))
    # the activation space does not depend on the rule: the same values, all differences zero
    same = table[table.space == "activation"]
    assert (same.mean_diff == 0).all() and (same.reason == "all differences are zero").all()


def test_summaries_side_by_side(paired_result):
    frame = paired_result.summaries
    assert list(frame.columns[:5]) == ["target", "group", "space", "method", "metric"]
    assert {"mean [a.h5]", "std [b.h5]", "n [b.h5]", "skipped [a.h5]"} <= set(frame.columns)
    # five metrics and the split gain in two spaces, and the four purity scores in the reference space
    assert len(frame) == 6 * 2 + 4 and frame.space.iloc[0] == "c2"
    merged = frame.merge(paired_result.comparison, on=["target", "group", "space", "method", "metric"])
    np.testing.assert_allclose(merged["mean [a.h5]"], merged.mean_a)
    np.testing.assert_allclose(merged["mean [b.h5]"], merged.mean_b)


def test_other_references_or_samples_give_unpaired_tests(stores):
    result = compare_stores([stores["a"], stores["c"], stores["d"]], metric="corr labels", n_resamples=500)
    table = result.comparison
    assert set(table.test) == {UNPAIRED}
    assert dict(zip(table.store_b, table.why, strict=True)) == {"c.h5": "other references", "d.h5": "other samples"}
    for row in table.itertuples():
        other = stores[row.store_b[0]]
        expected = stats.unpaired(stored(stores["a"], row.metric, row.space), stored(other, row.metric, row.space),
                                  n_resamples=500).as_dict()
        for key in ("mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "effect", "n_a", "n_b"):
            np.testing.assert_equal(float(getattr(row, key)), float(expected[key]), err_msg=f"{row.store_b} {key}")
        assert pd.isna(row.n) and pd.isna(row.zeros)
    np.testing.assert_allclose(table.p_holm, stats.holm(table.p_value.to_numpy(np.float64)))
    # unpaired on request too; paired on request is refused where the stores do not allow it
    forced = compare_stores([stores["a"], stores["b"]], metric="ARI class", paired=False, n_resamples=100)
    assert set(forced.comparison.test) == {UNPAIRED} and set(forced.comparison.why) == {"unpaired by request"}
    with pytest.raises(ConfigError, match=r"^a\.h5 and c\.h5: no paired test of target 'c3': other references$"):
        compare_stores([stores["a"], stores["c"]], paired=True, n_resamples=100)


def test_refusals(stores):
    with pytest.raises(ConfigError, match=r"^a\.h5 and e\.h5: reference evaluator 'labels' differs "
                                          r"\(crop_composite: 'epsilon_plus_flat' vs 'epsilon_plus'\)"):
        compare_stores([stores["a"], stores["e"]], n_resamples=100)
    with pytest.raises(ConfigError, match=r"^a\.h5 and e\.h5: no metric 'ARI class' in common"):
        compare_stores([stores["a"], stores["e"]], metric="ARI class", n_resamples=100)
    with pytest.raises(ConfigError, match="at least two stores"):
        compare_stores([stores["a"]])


def test_cli_writes_the_files_and_exit_codes(stores, tmp_path, capsys):
    named = tmp_path / "x<b>y.h5"
    shutil.copy(stores["a"], named)
    out = tmp_path / "out"
    assert main(["compare", str(named), str(stores["b"]), "--out", str(out), "--metric", "corr labels"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == [str(out / "comparison.csv"), str(out / "summaries.csv"), str(out / "index.html")]
    # and one line on what was found
    assert len(printed) == 4 and printed[3].startswith("x<b>y.h5 against b.h5: 2 comparisons, ")
    table = pd.read_csv(out / "comparison.csv", **READ_BACK)
    assert list(table.columns) == list(COMPARISON_COLUMNS) and len(table) == 2
    assert set(table.store_a) == {"x<b>y.h5"} and set(table.test) == {PAIRED}
    summaries = pd.read_csv(out / "summaries.csv", **READ_BACK)
    assert "mean [x<b>y.h5]" in summaries.columns
    html = (out / "index.html").read_text()
    assert "x&lt;b&gt;y.h5" in html and "<b>" not in html and "paired (wilcoxon)" in html

    assert main(["compare", str(stores["a"]), str(stores["e"]), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reference evaluator 'labels' differs" in err
    assert not (tmp_path / "no").exists()
    assert main(["compare", str(stores["a"]), str(stores["c"]), "--test", "paired", "--out", str(tmp_path / "no")]) == 2
    assert "other references" in capsys.readouterr().err
    # a missing store is a StoreError, as for `polypure report STORE`: bad input, exit status 2
    assert main(["compare", str(stores["a"]), str(tmp_path / "missing.h5"), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.h5" in err and "does not exist" in err


def test_write_comparison_reads_back(paired_result, tmp_path):
    paths = write_comparison(paired_result, tmp_path)
    table = pd.read_csv(paths[0], **READ_BACK)
    np.testing.assert_allclose(table.mean_diff, paired_result.comparison.mean_diff)
    np.testing.assert_array_equal(table.p_holm.isna(), paired_result.comparison.p_holm.isna())
