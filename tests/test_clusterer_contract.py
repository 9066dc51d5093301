"""The clusterer contract of scikit-learn: plain estimator classes by name, the seed as ``random_state``."""

from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering

from polypure import Experiment
from polypure.errors import ConfigError
from polypure.evaluation import clustering
from polypure.evaluation.clustering import make_clusterer
from polypure.registry import Registry

from .helpers import REPO, random_images
from .nets import tiny

PLUGIN_MODULE = REPO / "plugins" / "polypure-gmm" / "src" / "polypure_gmm" / "__init__.py"
BLOBS = np.r_[np.zeros((10, 3)), np.full((10, 3), 5.0)] + np.random.default_rng(0).normal(size=(20, 3)) * 0.1


@pytest.fixture
def registry(monkeypatch):
    """A fresh clusterer registry holding the built-ins, so that tests can register names of their own."""
    fresh = Registry("clusterer", group="polypure.clusterers")
    fresh.register("kmeans", clustering.kmeans)
    monkeypatch.setattr(clustering, "CLUSTERERS", fresh)
    return fresh


def test_an_entry_point_may_name_a_plain_scikit_learn_class(tmp_path, monkeypatch, registry):
    dist = tmp_path / "site" / "my_clusterers-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-clusterers\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[polypure.clusterers]\n"
                                           "agglo = sklearn.cluster:AgglomerativeClustering\n"
                                           "spectral = sklearn.cluster:SpectralClustering\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    agglo = make_clusterer("agglo", {"n_clusters": 2, "linkage": "average"}, seed=3)
    assert type(agglo) is AgglomerativeClustering and agglo.get_params()["linkage"] == "average"
    labels = agglo.fit_predict(BLOBS)
    assert len(set(labels[:10])) == 1 and labels[0] != labels[-1]
    spectral = make_clusterer("spectral", {"n_clusters": 2}, seed=3)
    assert type(spectral) is SpectralClustering and spectral.random_state == 3


def test_random_state_is_the_seed_only_where_taken_and_not_set():
    assert make_clusterer("sklearn.cluster:KMeans", {"n_clusters": 2}, seed=5).random_state == 5
    assert make_clusterer("sklearn.cluster:KMeans", {"n_clusters": 2, "random_state": 1}, seed=5).random_state == 1
    assert "random_state" not in make_clusterer("sklearn.cluster:AgglomerativeClustering", {}, seed=5).get_params()
    # the built-in k-means is scikit-learn's with n_init=10 and the seed, as before
    assert make_clusterer("kmeans", {}, seed=5).get_params() == KMeans(n_clusters=2, n_init=10,
                                                                       random_state=5).get_params()
    assert make_clusterer("kmeans", {"random_state": 2}, seed=5).random_state == 2


def test_seed_goes_only_to_factories_that_name_it(registry):
    calls = {}

    def with_seed(n_clusters=2, seed=None):
        calls["with_seed"] = seed
        return AgglomerativeClustering(n_clusters=n_clusters)

    def without_seed(n_clusters=2):
        calls["without_seed"] = n_clusters
        return AgglomerativeClustering(n_clusters=n_clusters)

    def open_ended(**params):
        calls["open_ended"] = params
        return AgglomerativeClustering(**params)

    for factory in (with_seed, without_seed, open_ended):
        registry.register(factory.__name__, factory)
    make_clusterer("without_seed", {"n_clusters": 3}, seed=7)
    make_clusterer("open_ended", {"n_clusters": 3}, seed=7)
    make_clusterer("with_seed", {"n_clusters": 3}, seed=7)
    assert calls == {"with_seed": 7, "without_seed": 3, "open_ended": {"n_clusters": 3}}
    make_clusterer("with_seed", {"seed": 1}, seed=7)
    assert calls["with_seed"] == 1


@pytest.mark.parametrize("name,params,message", [
    ("kmeans", {"n_cluster": 2}, "cluster.methods: kmeans takes no parameter 'n_cluster'"),
    ("sklearn.cluster:AgglomerativeClustering", {"n_cluster": 2},
     "cluster.methods: sklearn.cluster:AgglomerativeClustering takes no parameter 'n_cluster' (it takes "
     "n_clusters, "),
    ("no_such_module_here:Clusterer", {}, "cluster.methods: cannot import 'no_such_module_here'"),
    ("sklearn.cluster:NoSuchClusterer", {}, "cluster.methods: 'sklearn.cluster' has no class or function "
                                            "'NoSuchClusterer'"),
    ("sklearn.decomposition:PCA", {}, "cluster.methods: 'sklearn.decomposition:PCA' made a PCA without "
                                      "fit_predict(X)"),
])
def test_bad_clusterers_are_one_line_config_errors(name, params, message):
    with pytest.raises(ConfigError) as err:
        make_clusterer(name, params)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_module_class_name_runs_in_the_cluster_stage(tmp_path):
    exp = Experiment(model=tiny(seed=7), dataset=random_images(20, 24, seed=4), store=tmp_path / "s.h5",
                     progress=False, topk={"layers": ["c3"], "k": 8},
                     relevance={"target_layer": "c3", "neurons": [1, 2], "attribution_layers": ["c2"], "n_refs": 8},
                     cluster={"methods": [{"name": "sklearn.cluster:AgglomerativeClustering", "id": "agglo",
                                           "n_clusters": 3}]})
    exp.run(["topk", "relevance", "cluster"])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        labels = f["clusters/c3/c2/agglo"]
        assert labels.attrs["method"] == "sklearn.cluster:AgglomerativeClustering"
        assert json.loads(labels.attrs["params"]) == {"n_clusters": 3}
        expected = AgglomerativeClustering(n_clusters=3).fit_predict(f["relevance/c3/c2"][0].astype(np.float64))
        np.testing.assert_array_equal(labels[0], expected)


def test_the_gmm_plugin_takes_random_state_like_scikit_learn(registry):
    spec = importlib.util.spec_from_file_location("polypure_gmm_under_test", PLUGIN_MODULE)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    registry.register("gmm", plugin.GaussianMixtureClusterer)
    assert plugin.GaussianMixtureClusterer().get_params()["random_state"] is None
    est = make_clusterer("gmm", {"n_components": 2}, seed=4)
    assert est.random_state == 4
    assert make_clusterer("gmm", {"n_components": 2, "random_state": 9}, seed=4).random_state == 9
    labels = est.fit_predict(BLOBS)
    assert len(set(labels[:10])) == 1 and labels[0] != labels[-1]
    np.testing.assert_array_equal(labels, make_clusterer("gmm", {"n_components": 2}, seed=4).fit_predict(BLOBS))


class _Warns:
    """A clusterer that warns on every fit: the warning reaches the user once, with a count."""

    def fit_predict(self, x):
        import warnings
        warnings.warn("the graph is not fully connected", UserWarning, stacklevel=2)
        return np.zeros(len(x), np.int64)


def test_a_warning_per_neuron_is_given_once_with_its_count():
    import warnings

    from polypure.evaluation.clustering import cluster_rows

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cluster_rows(np.ones((5, 6, 3)), _Warns())
    assert [str(w.message) for w in caught] == ["_Warns: the graph is not fully connected (for 5 of 5 neurons)"]


def test_a_caller_can_collect_the_warnings_to_report_them_once():
    import warnings

    from polypure.evaluation.clustering import cluster_rows

    notes: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cluster_rows(np.ones((5, 6, 3)), _Warns(), notes)
        cluster_rows(np.ones((2, 6, 3)), _Warns(), notes)
    assert caught == [] and notes == {(UserWarning, "the graph is not fully connected"): 7}
