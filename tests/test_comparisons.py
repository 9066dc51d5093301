"""Comparisons the evaluate stage stores (polypure.evaluation.comparisons).

What the config asks for, equal to Results.compare and to an independent computation, refused names,
printed and saved beside the store.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from polypure.errors import ConfigError
from polypure.evaluation import comparisons, summary
from polypure.evaluation import statistics as stats
from polypure.store.hdf5_store import Store
from polypure.store.results import COMPARISON_COLUMNS, open_results

from .helpers import PURITY_SEED as SEED
from .helpers import purity_experiment as experiment

READ_BACK = {"keep_default_na": False, "na_values": ["NaN"]}


@pytest.fixture(scope="module")
def path(purity_store):
    return purity_store


def test_stored_comparisons_equal_results_compare_with_the_same_settings(path):
    with open_results(path) as results:
        stored = results.comparisons()
        settings = results.comparison_settings
        computed = results.compare(n_resamples=1000, seed=SEED)
    assert settings == {"seed": SEED, "n_resamples": 1000, "confidence": 0.95, "baseline": "", "baseline_method": "",
                        "holm": "whole run"}
    assert tuple(stored.columns) == COMPARISON_COLUMNS and len(stored) > 0
    pd.testing.assert_frame_equal(stored, computed, check_exact=True)
    # every space against each target's last attribution layer, Holm over the whole run (both targets)
    assert set(stored["space_a"]) == {"c2"} and set(stored["target"]) == {"c3", "c3@planted"}
    np.testing.assert_array_equal(stored["p_holm"].to_numpy(), stats.holm(stored["p_value"].to_numpy()))
    assert {"gain labels", "corr labels", "ARI class", "ARI planted"} <= set(stored["metric"])
    # one value per neuron whatever the space: nothing to compare with the baseline
    assert not set(stored["metric"]) & {"clarity labels", "polysem labels", "mono-topK labels", "redundancy labels"}


def test_one_stored_row_recomputed_independently(path):
    with open_results(path) as results:
        stored = results.comparisons()
        masks = dict(summary.groups(results.store, "c3", "class"))
    row = stored[(stored["group"] == "c3 [polysemantic by class]") & (stored["metric"] == "gain labels")
                 & (stored["method"] == "kmeans") & (stored["space_b"] == "activation")].iloc[0]
    with h5py.File(path, "r") as f:
        a = f["metrics/c3/split_gain/labels/c2/kmeans"][()]
        b = f["metrics/c3/split_gain/labels/activation/kmeans"][()]
    mask = masks["c3 [polysemantic by class]"]
    a, b = a[mask], b[mask]
    keep = np.isfinite(a) & np.isfinite(b)
    d = b[keep] - a[keep]
    assert (row["n"], row["dropped"]) == (keep.sum(), (~keep).sum()) and row["n"] >= 6
    assert row["mean_diff"] == pytest.approx(d.mean()) and row["mean_a"] == pytest.approx(a[keep].mean())
    assert row["p_value"] == pytest.approx(sps.wilcoxon(d, zero_method="zsplit").pvalue)
    # the percentile bootstrap, seeded with the run's seed
    rng = np.random.default_rng(SEED)
    means = d[rng.integers(0, d.size, size=(1000, d.size))].mean(axis=1)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def test_config_pairs_and_metrics_give_exactly_those_comparisons(path, tmp_path):
    copy = tmp_path / "pairs.h5"
    shutil.copy(path, copy)
    # another compare and evaluate section: the store is not stale, only the comparisons change
    experiment(copy, compare={"pairs": [["c1", "activation"], ["activation", "c2"]],
                              "metrics": ["ARI class", "gain labels"], "n_resamples": 1000, "confidence": 0.9},
               evaluate={**experiment(copy).config.evaluate.model_dump(), "mixture_share": 0.3}).run(["evaluate"])
    with open_results(copy) as results:
        table = results.comparisons()
        assert results.comparison_settings["confidence"] == 0.9
    assert set(zip(table["space_a"], table["space_b"])) == {("c1", "activation"), ("activation", "c2")}
    assert set(table["metric"]) == {"ARI class", "gain labels"}
    per_pair = table.groupby(["target", "group", "metric", "method"]).size()
    assert (per_pair == 2).all()


def test_reopening_with_another_compare_or_evaluate_section_keeps_the_store(path, tmp_path):
    copy = tmp_path / "same.h5"
    shutil.copy(path, copy)
    with Store(copy) as store:
        config = store.config()
    config["compare"] = {**config["compare"], "baseline": "activation", "n_resamples": 5000}
    config["evaluate"] = {**config["evaluate"], "polysemantic_by": None}
    Store.open_for_run(copy, yaml.safe_dump(config)).close()
    with Store(copy) as store:
        assert "relevance/c3/c1" in store and store.comparison_targets() == ["c3", "c3@planted"]


@pytest.mark.parametrize(("section", "message"), [
    ({"metrics": ["ARI clas"]}, "compare.metrics: 'ARI clas' is not a metric this run gives"),
    ({"metrics": ["purity labels"]}, "compare.metrics: 'purity labels' is not a metric this run gives"),
])
def test_a_metric_no_run_can_give_is_refused_before_the_first_stage(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message) as caught:
        experiment(tmp_path / "x.h5", compare=section).validate()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("section", "message"), [
    ({"pairs": [["c1", "c9"]]}, r"compare.pairs\[0\]: 'c9' is not a space of any target; spaces: c1, c2, activation"),
    ({"baseline": "c7"}, "compare.baseline: 'c7' is not a space of any target"),
    ({"metrics": ["ARI planted", "gain clip"]}, "not a metric this run gives"),
])
def test_a_space_or_metric_the_store_lacks_is_refused_by_the_stage(path, tmp_path, section, message):
    copy = tmp_path / "bad.h5"
    shutil.copy(path, copy)
    with pytest.raises(ConfigError, match=message) as caught:
        experiment(copy, compare=section).run(["evaluate"])
    assert "\n" not in str(caught.value)


def test_a_metric_the_store_lacks_is_named(path):
    with Store(path) as store:
        with pytest.raises(ConfigError, match="compare.metrics: 'NMI shape' is not a metric of the store; metrics: "
                                              "corr labels"):
            comparisons.check(store, metrics=["NMI shape"])


def test_compare_config_section_is_checked():
    from polypure.config.settings import config_from_dict

    with pytest.raises(ConfigError, match="compare.n_resamples"):
        config_from_dict({"compare": {"n_resamples": 10}})
    with pytest.raises(ConfigError, match="compare.baseline_space"):
        config_from_dict({"compare": {"baseline_space": "c2"}})
    with pytest.raises(ConfigError, match="compare.pairs"):
        config_from_dict({"compare": {"pairs": [["c1", "c2", "c3"]]}})


def test_the_stage_prints_the_comparisons_and_saves_them_beside_the_store(path, tmp_path, capsys):
    copy = tmp_path / "printed.h5"
    shutil.copy(path, copy)
    exp = experiment(copy, compare={"metrics": ["ARI planted"], "n_resamples": 1000})
    exp.progress = True
    exp.run(["evaluate"])
    out = capsys.readouterr().out
    head, _, printed = out.partition("comparisons with the baseline, paired over neurons")
    assert "c3@planted (max) (2 neurons), clusters: kmeans" in head
    table, _, found = printed.partition("what was found")
    lines = table.strip().splitlines()[1:]
    assert lines[0].split() == ["group", "metric", "method", "space", "vs", "baseline", "n", "difference", "[CI]",
                                "p_holm", "effect"]
    saved = pd.read_csv(copy.with_suffix(".comparisons.csv"), **READ_BACK)
    with open_results(copy) as results:
        stored = results.comparisons()
    assert len(lines) - 1 == len(saved) == len(stored) > 0
    assert tuple(saved.columns) == COMPARISON_COLUMNS
    np.testing.assert_allclose(saved["p_holm"], stored["p_holm"])
    assert lines[1].startswith("c3@planted (sum)") and "c1 vs c2" in lines[1]
    # the headline: one line per planted group and clusterer, judged by the planted truth
    headline = [line.strip() for line in found.strip().splitlines()[1:] if line.startswith("  ")]
    assert headline and all(line.startswith("c3@planted (") and ", ARI planted (" in line for line in headline)
    assert len(headline) == len({(r.group, r.method) for r in stored.itertuples() if r.metric == "ARI planted"
                                 and np.isfinite(r.mean_b)})


def test_a_run_shows_a_screenful_of_comparisons_and_points_to_the_csv_for_the_rest():
    from polypure.evaluation.comparisons import SCREENFUL, format_table

    row = {"target": "c3", "group": "c3", "metric": "ARI class", "method": "kmeans", "space_a": "c2", "space_b": "c1",
           "n": 8, "mean_diff": 0.25, "ci_low": 0.1, "ci_high": 0.4, "p_holm": 0.0078, "effect": 1.0}
    text = format_table([row] * (SCREENFUL + 5), top=SCREENFUL).splitlines()
    assert len(text) == 2 + SCREENFUL + 1 and text[-1] == "... 5 more lines in the comparisons CSV"


def test_a_leaderboard_compares_every_space_and_method_with_the_baseline_clustering(path, tmp_path, capsys):
    """``compare.baseline_method``: each (space, method) against one clustering, Holm over all, ranked on screen."""
    copy = tmp_path / "board.h5"
    shutil.copy(path, copy)
    section = {"baseline": "c2", "baseline_method": "kmeans", "metrics": ["ARI planted"], "n_resamples": 1000,
               "top": 3}
    exp = experiment(copy, compare=section)
    exp.progress = True
    exp.run(["evaluate"])
    out = capsys.readouterr().out
    with open_results(copy) as results:
        table = results.comparisons()
        masks = dict(summary.groups(results.store, "c3@planted", None))
        methods = results.store.cluster_methods("c3@planted")
        spaces = results.store.spaces("c3@planted")
    assert set(table["method_a"]) == {"kmeans"} and set(table["space_a"]) == {"c2"}
    assert len(methods) == 2
    for group in masks:
        rows = table[table["group"] == group]
        # every other (space, method) once: the baseline clustering itself is not compared with itself
        assert sorted(zip(rows["space_b"], rows["method"])) == sorted(
            (s, m) for s in spaces for m in methods if (s, m) != ("c2", "kmeans"))
    # one row recomputed: hdbscan at c1 against k-means at c2, paired over the group's neurons
    row = table[(table["space_b"] == "c1") & (table["method"] == "hdbscan")].iloc[0]
    with h5py.File(copy, "r") as f:
        a = f["metrics/c3@planted/ari/planted/c2/kmeans"][()][masks[row["group"]]]
        b = f["metrics/c3@planted/ari/planted/c1/hdbscan"][()][masks[row["group"]]]
    expected = stats.paired(a, b, n_resamples=1000, seed=SEED)
    assert row["n"] == expected.n and row["p_value"] == expected.p_value or (
        np.isnan(row["p_value"]) and np.isnan(expected.p_value))
    np.testing.assert_array_equal(table["p_holm"].to_numpy(), stats.holm(table["p_value"].to_numpy()))
    # on screen: a ranked table per group instead of the summary, the baseline's line always shown
    assert "ARI planted (95 % bootstrap interval of the difference from the baseline, c2 with kmeans)" in out
    block = out.split("\n\n")[0].splitlines()
    assert block[1].split()[:4] == ["rank", "space", "method", "mean"]
    assert any(line.split()[1:3] == ["c2", "kmeans"] and "baseline" in line for line in block)
    assert "more lines in the comparisons CSV" in block[-1]
    assert "clusters: kmeans" not in out                     # the summary is saved, not printed


def test_a_leaderboard_with_an_unknown_method_stops_before_the_first_stage(tmp_path):
    exp = experiment(tmp_path / "s.h5", compare={"baseline_method": "kmean"})
    with pytest.raises(ConfigError, match=r"compare.baseline_method: 'kmean' is not a method id of cluster.methods"):
        exp.validate()
