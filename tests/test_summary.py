"""The summary table shows every cluster method, and non-results as counted reasons.

All noise, degenerate spaces and references of one label are never shown as a score of 0.
"""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from polypure import Experiment
from polypure.viz.report import write_report

from .helpers import random_images
from .nets import tiny

NEURONS = [0, 3, 5]


def experiment(path, progress=False) -> Experiment:
    """Three neurons with 8 references each, clustered by k-means and by HDBSCAN.

    With 8 references and its default minimum cluster size of 5, HDBSCAN calls every reference noise.
    """
    return Experiment(model=tiny(seed=5), dataset=random_images(24, 32, seed=11), store=path, progress=progress,
                      topk={"layers": ["c3"], "k": 8},
                      relevance={"targets": [{"layer": "c3", "neurons": NEURONS, "attribution_layers": ["c1", "c2"]}],
                                 "n_refs": 8},
                      cluster={"methods": [{"name": "kmeans", "n_clusters": 2},
                                           {"name": "hdbscan", "min_cluster_size": 5}]},
                      evaluate={"ground_truth": ["class"]})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    path = tmp_path_factory.mktemp("summary") / "s.h5"
    experiment(path).run(["topk", "relevance", "cluster", "evaluate"])
    return path


def block(text: str, title: str) -> str:
    """The block of the printed table under a title line."""
    start = text.index(title)
    end = text.find("\n\n", start)
    return text[start:end if end >= 0 else None]


def test_every_method_is_printed_and_all_noise_is_not_a_zero(evaluated, tmp_path, capsys):
    path = tmp_path / "s.h5"
    path.write_bytes(evaluated.read_bytes())
    experiment(path, progress=True).evaluate()
    text = capsys.readouterr().out
    assert "c3 (3 neurons), clusters: kmeans" in text
    hdbscan = block(text, "c3 (3 neurons), clusters: hdbscan")
    with h5py.File(path, "r") as f:
        assert (f["clusters/c3/c2/hdbscan"][()] == -1).all()
        assert np.isnan(f["metrics/c3/ari/class/c2/hdbscan"][()]).all()
        assert [s.decode() for s in f["metrics/c3/cluster_status/c2/hdbscan"][()]] == ["all-noise"] * 3
    rows = {line.split()[0]: line for line in hdbscan.splitlines()[2:] if not line.startswith("not scored")}
    assert set(rows) == {"c1", "c2", "activation"}
    assert all(row.split()[1:] == ["n/a", "n/a"] for row in rows.values())
    assert "0.000" not in hdbscan
    assert "not scored: every space: 3 all-noise" in hdbscan


def test_one_hot_relevance_is_reported_degenerate(evaluated, tmp_path, capsys):
    path = tmp_path / "s.h5"
    path.write_bytes(evaluated.read_bytes())
    with h5py.File(path, "a") as f:
        # relevance passed straight through one channel, as from a DenseNet concatenation
        c1 = f["relevance/c3/c1"]
        one_hot = np.zeros(c1.shape, np.float32)
        one_hot[..., 4] = 1.0
        c1[...] = one_hot
        del f["clusters/c3/c1"]
    experiment(path, progress=True).run(["cluster", "evaluate"])
    text = capsys.readouterr().out
    kmeans = block(text, "c3 (3 neurons), clusters: kmeans")
    row = next(line for line in kmeans.splitlines() if line.startswith("c1 "))
    assert row.split()[1:] == ["n/a", "n/a"]
    assert re.search(r"not scored: .*c1: 3 one-hot", kmeans)
    with h5py.File(path, "r") as f:
        assert [s.decode() for s in f["metrics/c3/degenerate/c1"][()]] == ["one-hot"] * 3
        assert [s.decode() for s in f["metrics/c3/degenerate/c2"][()]] == [""] * 3
        assert np.isnan(f["metrics/c3/ari/class/c1/kmeans"][()]).all()
        assert np.isfinite(f["metrics/c3/ari/class/c2/kmeans"][()]).any()


def test_records_say_over_how_many_neurons_and_why(evaluated):
    from polypure.evaluation import summary
    from polypure.store.hdf5_store import Store

    with Store(evaluated) as store:
        records = summary.read(store)
    ari = {(r["space"], r["method"]): r for r in records if r["metric"] == "ARI class"}
    noise = ari["c2", "hdbscan"]
    assert (noise["n"], noise["neurons"], noise["skipped"]) == (0, 3, "3 all-noise")
    assert np.isnan(noise["mean"])
    kmeans = ari["c2", "kmeans"]
    assert kmeans["neurons"] == 3 and kmeans["n"] + sum(summary.parse_skipped(kmeans["skipped"]).values()) >= 3


def test_a_neuron_whose_references_share_one_label_gets_no_score(evaluated, tmp_path):
    from polypure.evaluation import summary
    from polypure.store.hdf5_store import Store

    path = tmp_path / "s.h5"
    path.write_bytes(evaluated.read_bytes())
    with h5py.File(path, "r") as f:
        refs = f["topk/c3/indices"][NEURONS[0], :8]
    with h5py.File(path, "a") as f:
        labels = f["samples/labels"][()]
        labels[refs] = 1                     # the first neuron's references: all one class
        f["samples/labels"][...] = labels
    experiment(path).evaluate()
    with Store(path) as store:
        records = summary.read(store)
        assert store.read("metrics/c3/single_label/class").tolist() == [True, False, False]
        assert np.isnan(store.read("metrics/c3/ari/class/c2/kmeans")[0])
    kmeans = next(r for r in records if r["metric"] == "ARI class" and r["space"] == "c2" and r["method"] == "kmeans")
    assert "1 one-label" in kmeans["skipped"] and kmeans["n"] <= 2


def test_the_report_shows_every_method_and_the_reasons(evaluated, tmp_path):
    index = write_report(evaluated, out=tmp_path / "r", max_neurons=0, progress=False)
    text = index.read_text()
    assert "c3 (3 neurons), clusters: hdbscan" in text and "c3 (3 neurons), clusters: kmeans" in text
    assert "3 all-noise" in text and "<td>n/a</td>" in text


def test_labels_unique_to_every_reference_are_not_scored_and_say_why(tmp_path, capsys):
    # one photo per class: every reference its own label, so no clustering can recover anything
    from polypure.data.datasets import ArrayDataset
    from polypure.store.results import open_results

    pixels = np.random.default_rng(2).integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    dataset = ArrayDataset(pixels, labels=np.arange(24), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = tmp_path / "u.h5"
    Experiment(model=tiny(seed=5), dataset=dataset, store=path, progress=True,
               topk={"layers": ["c3"], "k": 8},
               relevance={"targets": [{"layer": "c3", "neurons": NEURONS, "attribution_layers": ["c2"]}], "n_refs": 8},
               cluster={"methods": [{"name": "kmeans", "n_clusters": 2}]},
               evaluate={"ground_truth": ["class"]}).run(["topk", "relevance", "cluster", "evaluate"])
    text = capsys.readouterr().out
    assert "unique-labels" in text and "0.000 ±" not in block(text, "c3 (3 neurons), clusters: kmeans")
    with h5py.File(path, "r") as f:
        assert f["metrics/c3/unique_labels/class"][()].all()
        assert np.isnan(f["metrics/c3/ari/class/c2/kmeans"][()]).all()
    with open_results(path) as results:
        ari = results.metrics("c3").query("metric == 'ARI' and of == 'class'")
    assert len(ari) == 3 * 2 and set(ari["skipped"]) == {"unique-labels"}       # c2 and activation
