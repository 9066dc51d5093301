"""Figures: every function writes PNG and SVG with the panels it promises, read from a small real store."""

from __future__ import annotations

import re
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from polypure.evaluation import comparisons
from polypure.store.hdf5_store import Store
from polypure.viz import figure_data, figures

from .helpers import FIGURE_K

K = FIGURE_K


@pytest.fixture(scope="module")
def built(figure_store):
    return figure_store


def panels(svg_path) -> list[str]:
    """The named panels (axes) of a figure, from its SVG."""
    return re.findall(r'id="panel-([^"]+)"', svg_path.read_text())


def check_written(paths, stem):
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert all(p.is_file() and p.stem == stem for p in paths)
    with Image.open(paths[0]) as img:
        assert img.size[0] > 200 and img.size[1] > 150
        assert len(img.convert("RGB").getcolors(1 << 20)) > 20      # drawn, not blank
    return paths[1]


def test_distance_matrices_show_reference_and_every_space_with_its_stored_correlation(built, tmp_path):
    path, _ = built
    with Store(path) as store:
        paths = figures.distance_matrices(store, "c3", 1, "labels", tmp_path)
        corr = store.read("metrics/c3/distance_correlation/labels/c2")[1]
    svg = check_written(paths, "distances_c3_2_labels")
    assert panels(svg) == ["labels", "c1", "c2", "activation"]
    assert f"r = {corr:.2f}" in svg.read_text()


def test_correlation_scatter_labels_the_neuron_an_earlier_layer_splits_best(built, tmp_path):
    path, _ = built
    paths = figures.correlation_scatter(str(path), "c3", "labels", tmp_path, n_labels=1)
    svg = check_written(paths, "scatter_c3_labels")
    assert panels(svg) == ["scatter"]
    with h5py.File(path, "r") as f:
        gap = f["metrics/c3/distance_correlation/labels/c1"][()] - f["metrics/c3/distance_correlation/labels/c2"][()]
        neurons = f["relevance/c3/neurons"][()]
    text = svg.read_text()
    if np.nanmax(gap) > 0:
        assert f"#{neurons[np.nanargmax(gap)]}" in text
    assert "c1" in text and "y = x" in text


def test_scatter_needs_two_attribution_layers(built, tmp_path):
    path, _ = built
    copy = tmp_path / "one_layer.h5"
    shutil.copy(path, copy)
    with h5py.File(copy, "a") as f:
        f["relevance/c3"].attrs["attribution_layers"] = ["c2"]
    with pytest.raises(ValueError, match="two or more attribution layers"):
        figures.correlation_scatter(copy, "c3", "labels", tmp_path)


def test_space_bars_have_a_bar_per_space_and_other_references(built, tmp_path):
    path, _ = built
    paths = figures.space_bars(path, "logits", "labels", tmp_path)
    svg = check_written(paths, "bars_logits_labels")
    assert panels(svg) == ["bars"]
    text = svg.read_text()
    for name in ("c1", "c2", "activation", "classes"):
        assert f">{name}<" in text
    with h5py.File(path, "r") as f:
        mean = np.nanmean(f["metrics/logits/distance_correlation/labels/c2"][()])
    assert f"{mean:.2f}" in text


def test_neuron_umap_has_a_umap_per_space_and_a_grid_per_cluster(built, tmp_path):
    path, dataset = built
    paths = figures.neuron_umap(path, dataset, "c3@planted", 0, tmp_path)
    svg = check_written(paths, "umap_c3-planted_0_kmeans")
    expected = []
    with h5py.File(path, "r") as f:
        for space in ("c1", "c2", "activation"):
            expected.append(f"umap-{space}")
            expected += [f"grid-{space}-{c}" for c in sorted(set(f[f"clusters/c3@planted/{space}/kmeans"][0]))]
    assert panels(svg) == expected
    with Image.open(paths[0]) as img:
        assert len(img.convert("RGB").getcolors(1 << 20)) > 2000     # the random-pixel thumbnails are there

    points_only = figures.neuron_umap(path, None, "logits", 1, tmp_path, formats=("svg",), stem="plain")
    assert [p.name for p in points_only] == ["plain.svg"]
    assert panels(points_only[0]) == ["umap-c1", "umap-c2", "umap-activation"]


def test_ground_truth_table_has_a_panel_per_label_set(built, tmp_path):
    path, _ = built
    svg = check_written(figures.ground_truth_table(path, tmp_path), "ground_truth")
    assert sorted(panels(svg)) == ["ARI-class", "ARI-planted"]
    assert "c3@planted (max)" in svg.read_text()
    copy = tmp_path / "no_summary.h5"
    shutil.copy(path, copy)
    with h5py.File(copy, "a") as f:
        del f["metrics/summary"]
    with pytest.raises(ValueError, match="no ground-truth"):
        figures.ground_truth_table(copy, tmp_path)


def test_umap_embedding_copes_with_few_and_identical_references():
    rng = np.random.default_rng(0)
    assert figures.umap_embedding(rng.normal(size=(6, 5))).shape == (6, 2)
    assert figures.umap_embedding(rng.normal(size=(3, 5))).shape == (3, 2)
    np.testing.assert_array_equal(figures.umap_embedding(np.ones((7, 4))), np.zeros((7, 2)))


def test_safe_names_for_files():
    assert figures.safe_name("block_3@planted") == "block_3-planted"
    assert figures.safe_name("a/b c") == "a-b-c"


def test_comparison_figures_show_the_stored_comparisons_of_one_metric(built, tmp_path):
    path, _ = built
    with Store(path) as store:
        rows = [r for r in comparisons.read(store)[0] if r["metric"] == "gain labels"]
    forest = figures.comparison_forest(path, "gain labels", tmp_path)
    assert [p.suffix for p in forest] == [".png", ".svg"] and panels(forest[1]) == ["forest"]
    # the paired scatter: one panel per comparison of the first group and method, no more
    first = rows[0]
    shown = [r for r in rows if (r["target"], r["group"], r["method"]) == (first["target"], first["group"],
                                                                         first["method"])]
    assert 1 < len(shown) < len(rows)
    paired = figures.paired_scatter(path, "gain labels", tmp_path)
    assert panels(paired[1]) == [figures.safe_name(f"{r['space_b']}-{r['space_a']}") for r in shown]
    with pytest.raises(ValueError, match="no stored comparisons of 'ARI shape'"):
        figures.comparison_forest(path, "ARI shape", tmp_path)


def test_inputs_are_what_a_figure_reads_named_by_the_function_or_its_name(built):
    path, _ = built
    by_function = figure_data.inputs(figures.space_bars, path, "logits", "labels")
    by_name = figure_data.inputs("space_bars", path, "logits", "labels")
    with Store(path) as store:
        assert by_function["layers"] == by_name["layers"] == store.relevance_spaces("logits") == ["c1", "c2"]
        np.testing.assert_array_equal(by_name["corr"]["c2"],
                                      store.metric("logits", "distance_correlation", "labels", "c2"))
    umap = figure_data.inputs(figures.neuron_umap, path, "c3", 1, method="kmeans", spaces=["c2"])
    assert list(umap["features"]) == list(umap["labels"]) == ["c2"] and umap["boxes"] is None
    with pytest.raises(ValueError, match="'umap_embedding' is not a figure"):
        figure_data.inputs(figures.umap_embedding, path)


def test_selectivity_bars_show_each_space_tested_with_its_stored_score(built, tmp_path):
    path, _ = built
    with Store(path) as store:
        tested = store.metric_keys("c3", "selectivity")
        row = int(np.flatnonzero(np.isfinite(store.metric("c3", "selectivity", "c2", "kmeans")))[0])
        value = store.metric("c3", "selectivity", "c2", "kmeans")[row]
        drops = store.metric("c3", "selectivity_drops", "c2", "kmeans")[row]
        neuron = int(store.neurons("c3")[row])
        paths = figures.selectivity_bars(store, "c3", row, tmp_path)
    svg = check_written(paths, f"{neuron}_selectivity")
    assert tested == ["c1", "c2"] and panels(svg) == ["c1", "c2"]
    text = svg.read_text()
    assert f"c2: s = {value:.2f}" in text
    # two bars (own, other) per scored cluster, each with its null line
    scored = [c for c in range(len(drops)) if np.isfinite(drops[c]).all()]
    assert all(f"cluster {c}" in text for c in scored)
    with pytest.raises(ValueError, match="no selectivity"):
        figures.selectivity_bars(path, "c3", row, tmp_path, method="hdbscan")
