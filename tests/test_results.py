"""The results API (polypure.store.results) and ``polypure export``.

DataFrames that equal what the store holds, comparisons that equal polypure.evaluation.statistics, tables that read back
as written, and the notebook guide's example.
"""

from __future__ import annotations

import re
import shutil
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

import polypure
from polypure import Experiment
from polypure.cli import main
from polypure.errors import ConfigError
from polypure.evaluation import statistics as stats
from polypure.evaluation import summary
from polypure.store.hdf5_store import Store
from polypure.store.results import COMPARISON_COLUMNS, METRIC_COLUMNS, Results, export, open_results

from .helpers import doc_page, random_images
from .nets import tiny

NEURONS = [0, 2, 4, 6, 8, 10, 12, 14]
READ_BACK = {"keep_default_na": False, "na_values": ["NaN"]}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """Eight c3 channels and planted neurons in sum and max mode, clustered by k-means and by HDBSCAN.

    HDBSCAN calls all 10 references noise; a labels reference space, ground truth against the planted split
    and the class, and the neurons polysemantic by class as a group of their own.
    """
    path = tmp_path_factory.mktemp("results") / "r.h5"
    Experiment(model=tiny(seed=2), dataset=random_images(40, 32, seed=3), store=path, progress=False,
               topk={"layers": ["c3"], "k": 10},
               relevance={"targets": [{"layer": "c3", "neurons": NEURONS, "attribution_layers": ["c1", "c2"]}],
                          "n_refs": 10, "planted": {"pairs": 2, "layer": "c3", "mode": ["sum", "max"],
                                                    "max_overlap": 1.0}},
               cluster={"methods": [{"name": "kmeans", "n_clusters": 2}, {"name": "hdbscan", "min_cluster_size": 6}]},
               evaluate={"references": ["labels"], "ground_truth": ["planted", "class"], "polysemantic_by": "class"},
               ).run(["topk", "relevance", "embed", "cluster", "evaluate"])
    return path


@pytest.fixture(scope="module")
def results(path):
    with open_results(path) as opened:
        yield opened


def stored_metrics(path) -> dict[tuple, np.ndarray]:
    """(target, metric, of, space, method) -> per-neuron values, read with plain h5py."""
    out = {}
    with h5py.File(path, "r") as f:
        for target in f["metrics"]:
            if target == "summary":
                continue
            group = f[f"metrics/{target}"]
            for kind in ("ari", "nmi"):
                for of in group.get(kind, {}):
                    for space in group[f"{kind}/{of}"]:
                        for method, ds in group[f"{kind}/{of}/{space}"].items():
                            out[target, kind.upper(), of, space, method] = ds[()]
            for of in group.get("distance_correlation", {}):
                for space, ds in group[f"distance_correlation/{of}"].items():
                    out[target, "corr", of, space, ""] = ds[()]
            for of in group.get("cluster_distances", {}):
                for space in group[f"cluster_distances/{of}"]:
                    for method, ds in group[f"cluster_distances/{of}/{space}"].items():
                        out[target, "inner", of, space, method] = ds[()][:, 0]
                        out[target, "inter", of, space, method] = ds[()][:, 1]
            for of in group.get("split_gain", {}):
                for space in group[f"split_gain/{of}"]:
                    for method, ds in group[f"split_gain/{of}/{space}"].items():
                        out[target, "gain", of, space, method] = ds[()]
            for kind, label in (("clarity", "clarity"), ("polysemanticity", "polysem"),
                                ("monosemanticity_topk", "mono-topK"), ("nearest_similarity", "redundancy")):
                for of, ds in group.get(kind, {}).items():
                    out[target, label, of, of, ""] = ds[()]
    return out


def test_long_form_metrics_are_the_stored_arrays(results, path):
    frame = results.metrics()
    assert tuple(frame.columns) == METRIC_COLUMNS
    assert frame["value"].dtype == np.float64 and frame["neuron"].dtype == np.int64
    stored = stored_metrics(path)
    keys = ["target", "metric", "of", "space", "method"]
    assert set(frame.groupby(keys).groups) == set(stored)
    assert {"corr", "inner", "inter", "gain", "clarity", "polysem", "mono-topK", "redundancy", "ARI", "NMI"} == set(
        frame["metric"])
    with h5py.File(path, "r") as f:
        neurons = {t: f[f"relevance/{t}/neurons"][()] for t in ("c3", "c3@planted")}
        modes = list(f["planted/c3/modes"].asstr()[()])
    for key, rows in frame.groupby(keys):
        np.testing.assert_array_equal(rows["value"].to_numpy(), stored[key])
        np.testing.assert_array_equal(rows["row"].to_numpy(), np.arange(len(stored[key])))
        np.testing.assert_array_equal(rows["neuron"].to_numpy(), neurons[key[0]])
        assert rows["mode"].tolist() == (modes if key[0] == "c3@planted" else [""] * len(rows))
    # non-results stay NaN, with their reason: HDBSCAN calls every reference noise here
    noise = frame[frame["method"] == "hdbscan"]
    assert len(noise) and noise["value"].isna().all() and (noise["skipped"].str.contains("all-noise")).all()
    assert (frame.loc[frame["value"].notna(), "skipped"] == "").all()
    assert (frame.loc[frame["value"].isna(), "skipped"] != "").all()
    assert set(frame[frame["metric"] == "corr"]["method"]) == {""}
    one = results.metrics("c3@planted")
    assert set(one["target"]) == {"c3@planted"} and len(one) == (frame["target"] == "c3@planted").sum()


def test_metrics_agree_with_the_summary_group_by_group(results):
    frame = results.metrics()
    records = summary.read(results.store)
    assert {r["metric"] for r in records} == set(frame["metric"] + " " + frame["of"])
    polysemantic_by = results.config()["evaluate"]["polysemantic_by"]
    masks = {g: (t, m) for t in results.targets for g, m in summary.groups(results.store, t, polysemantic_by)}
    assert "c3 [polysemantic by class]" in masks and "c3@planted (max)" in masks
    for r in records:
        target, mask = masks[r["group"]]
        metric, _, of = r["metric"].partition(" ")
        rows = frame[(frame["target"] == target) & (frame["space"] == r["space"]) & (frame["method"] == r["method"])
                     & (frame["metric"] == metric) & (frame["of"] == of)]
        rows = rows[mask[rows["row"].to_numpy()]]
        values = rows["value"].dropna()
        assert (len(rows), len(values)) == (r["neurons"], r["n"])
        if r["n"]:
            assert values.mean() == pytest.approx(r["mean"]) and values.std(ddof=0) == pytest.approx(r["std"])
        counted = rows["skipped"].str.split(", ").explode()
        assert counted[counted != ""].value_counts().to_dict() == summary.parse_skipped(r["skipped"])


def test_summary_is_the_stored_table(results):
    frame = results.summary()
    assert tuple(frame.columns) == summary.FIELDS
    records = summary.read(results.store)
    assert len(records) == len(frame) > 0
    pd.testing.assert_frame_equal(frame, pd.DataFrame(records, columns=list(summary.FIELDS)), check_exact=True)
    assert frame["n"].dtype == np.int64 and frame["mean"].dtype == np.float64


def test_compare_is_stats_paired_with_holm_over_the_table(results, path):
    table = results.compare("ARI class", baseline="activation")
    assert tuple(table.columns) == COMPARISON_COLUMNS
    assert set(table["space_a"]) == {"activation"} and set(table["space_b"]) == {"c1", "c2"}
    assert set(table["method"]) == {"kmeans", "hdbscan"} and set(table["metric"]) == {"ARI class"}
    assert set(table["group"]) == {"c3", "c3 [polysemantic by class]", "c3@planted (sum)", "c3@planted (max)"}
    np.testing.assert_array_equal(table["p_holm"].to_numpy(), stats.holm(table["p_value"].to_numpy()))
    with Store(path) as store:
        groups = {g: m for t in store.relevance_targets() for g, m in summary.groups(store, t, "class")}
        checked = 0
        for row in table.itertuples():
            target = row.target
            a = store.metric(target, "ari", "class", "activation", row.method)[groups[row.group]]
            b = store.metric(target, "ari", "class", row.space_b, row.method)[groups[row.group]]
            expected = stats.paired(a, b).as_dict()
            for name in ("n", "dropped", "zeros", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value",
                         "effect", "reason"):
                assert getattr(row, name) == pytest.approx(expected[name], nan_ok=True), name
            checked += 1
    assert checked == len(table) == 4 * 2 * 2
    # every neuron of a clustering that is all noise is dropped: no statistic
    noise = table[table["method"] == "hdbscan"]
    assert (noise["n"] == 0).all() and noise["mean_diff"].isna().all() and (noise["reason"] != "").all()


def test_compare_defaults_filters_and_errors(results):
    every = results.compare()
    assert set(every["space_a"]) == {"c2"}              # the last attribution layer of every target
    assert {"corr labels", "inner labels", "inter labels", "ARI class", "NMI class", "ARI planted"} <= set(
        every["metric"])
    assert "c2" not in set(every["space_b"])
    np.testing.assert_array_equal(every["p_holm"].to_numpy(), stats.holm(every["p_value"].to_numpy()))
    one = results.compare("ARI planted", target="c3@planted", group="c3@planted (max)", method="kmeans")
    assert len(one) == 2 and set(one["group"]) == {"c3@planted (max)"}
    same = every[(every["metric"] == "ARI planted") & (every["group"] == "c3@planted (max)")
                 & (every["method"] == "kmeans")]
    np.testing.assert_array_equal(one["mean_diff"].to_numpy(), same["mean_diff"].to_numpy())
    for kwargs, message in (({"metric": "ARI shape"}, "no metric 'ARI shape'.*'ARI class'"),
                            ({"metric": "ARI class", "baseline": "block_9"}, "baseline 'block_9'.*'activation'"),
                            ({"group": "nobody"}, "no group of neurons 'nobody'.*'c3@planted \\(sum\\)'"),
                            ({"method": "agglo"}, "no cluster method 'agglo'.*'kmeans'"),
                            ({"target": "c4"}, "no target 'c4'; targets: c3, c3@planted")):
        with pytest.raises(ConfigError, match=message):
            results.compare(**kwargs)


def test_arrays_by_target_and_space(results, path):
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(results.relevance("c3", "c1"), f["relevance/c3/c1"][()])
        np.testing.assert_array_equal(results.relevance("c3@planted", "activation"),
                                      f["relevance/c3@planted/activation"][()])
        np.testing.assert_array_equal(results.embeddings("labels", "c3"), f["embeddings/labels/c3"][()])
        np.testing.assert_array_equal(results.features("c3", "labels"), f["embeddings/labels/c3"][()])
        np.testing.assert_array_equal(results.neurons("c3"), NEURONS)
    assert results.targets == ["c3", "c3@planted"]
    assert results.attribution_layers("c3") == ["c1", "c2"]
    assert results.spaces("c3") == ["c1", "c2", "activation"]
    assert results.embedding_spaces("c3") == ["labels"]
    with pytest.raises(ConfigError, match="has no space 'clip'; its spaces: c1, c2, activation, labels"):
        results.features("c3", "clip")
    with pytest.raises(ConfigError, match="no relevance at 'labels'; its spaces: c1, c2, activation"):
        results.relevance("c3", "labels")
    with pytest.raises(ConfigError, match="no 'clip' embeddings of target 'c3'.*: labels"):
        results.embeddings("clip", "c3")
    with pytest.raises(ConfigError, match="no target 'logits'"):
        results.neurons("logits")


def test_results_and_store_name_the_same_things_alike(results):
    """A read method of Results gives what the Store method of the same name gives (the target checked first)."""
    store = results.store
    assert results.targets == store.relevance_targets() == ["c3", "c3@planted"]
    for target in results.targets:
        for name in ("neurons", "attribution_layers", "spaces", "embedding_spaces"):
            np.testing.assert_array_equal(getattr(results, name)(target), getattr(store, name)(target))
        assert [entry[:4] for entry in results.metric_values(target)] == [
            tuple(row) for row in results.metrics(target)[["metric", "of", "space", "method"]]
            .drop_duplicates().itertuples(index=False)]
    stored, _ = store.comparisons("c3")
    assert stored.dtype.names == COMPARISON_COLUMNS == tuple(results.comparisons().columns)
    with pytest.raises(ConfigError, match="no target 'logits'"):
        results.attribution_layers("logits")


def test_open_results_is_exported_and_closes(path):
    assert polypure.open_results is open_results and polypure.Results is Results
    with polypure.open_results(path) as opened:
        file = opened.store.file
        assert file.mode == "r"
    assert not file.id.valid


def test_a_store_without_metrics_gives_empty_tables(path, tmp_path):
    copy = tmp_path / "bare.h5"
    shutil.copy(path, copy)
    with h5py.File(copy, "a") as f:
        del f["metrics"]
    with open_results(copy) as bare:
        metrics, table, comparisons = bare.metrics(), bare.summary(), bare.compare()
        with pytest.raises(ConfigError, match="no metric 'ARI class' in the store; metrics: none"):
            bare.compare("ARI class")
    assert tuple(metrics.columns) == METRIC_COLUMNS and metrics.empty and metrics["value"].dtype == np.float64
    assert tuple(table.columns) == summary.FIELDS and table.empty
    assert tuple(comparisons.columns) == COMPARISON_COLUMNS and comparisons.empty


def expected_tables(path) -> dict[str, pd.DataFrame]:
    with open_results(path) as opened:
        return {"metrics": opened.metrics(), "summary": opened.summary(), "comparisons": opened.compare()}


def test_csv_export_reads_back_equal(path, tmp_path):
    written = export(path, tmp_path / "out")
    assert written == [tmp_path / "out" / f"{name}.csv" for name in ("metrics", "summary", "comparisons")]
    for file, (name, frame) in zip(written, expected_tables(path).items(), strict=True):
        back = pd.read_csv(file, **READ_BACK)
        pd.testing.assert_frame_equal(back, frame, check_dtype=False, check_exact=False, rtol=1e-12, obj=name)
        assert len(back) > 0


def test_parquet_export_reads_back_equal(path, tmp_path):
    pytest.importorskip("pyarrow")
    written = export(path, tmp_path, format="parquet")
    assert [p.name for p in written] == ["metrics.parquet", "summary.parquet", "comparisons.parquet"]
    for file, (name, frame) in zip(written, expected_tables(path).items(), strict=True):
        pd.testing.assert_frame_equal(pd.read_parquet(file), frame, obj=name)


def test_parquet_without_pyarrow_names_the_extra(path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)   # import pyarrow raises ImportError
    assert main(["export", str(path), str(tmp_path / "out"), "--format", "parquet"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'polypure[parquet]'" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_export_command_prints_the_paths_and_exit_codes(path, tmp_path, capsys):
    assert main(["export", str(path), str(tmp_path / "csv")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "csv" / f"{n}.csv") for n in ("metrics", "summary", "comparisons")]
    assert main(["export", str(path), str(tmp_path / "act"), "--baseline", "activation"]) == 0
    capsys.readouterr()
    comparisons = pd.read_csv(tmp_path / "act" / "comparisons.csv", **READ_BACK)
    assert set(comparisons["space_a"]) == {"activation"}
    assert main(["export", str(path), str(tmp_path / "x"), "--baseline", "block_9"]) == 2
    assert "polypure: config error: baseline 'block_9'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.h5"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", str(path), str(tmp_path / "x"), "--format", "xlsx"])
    assert exc.value.code == 2


def test_the_notebook_guide_example_plots_one_comparison(path, monkeypatch):
    """The notebook guide's example, run on this store: its label set is ``class``, not the demo's ``shape``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section = doc_page("how-to/notebooks.md")
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    assert len(code.strip().splitlines()) <= 6 and "storage/demo.h5" in code
    code = (code.replace("storage/demo.h5", str(path)).replace("ARI shape", "ARI class")
            .replace("block_3 [polysemantic by shape]", "c3 [polysemantic by class]"))
    plt.close("all")
    namespace: dict = {}
    exec(code, namespace)
    table = next(v for v in namespace.values() if isinstance(v, pd.DataFrame))
    assert len(table) == 2 * 2 and set(table["space_a"]) == {"activation"}   # two spaces, two methods
    axes = plt.gca()
    points = axes.lines[0].get_xydata()
    np.testing.assert_allclose(points[:, 0], table["mean_diff"].to_numpy())   # NaN where nothing was scored
    assert np.isfinite(points[:, 0]).any()
    plt.close("all")
