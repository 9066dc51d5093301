"""Clusterers: built-ins, any fit_predict object from Python, and the separately installable plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from polypure import Experiment
from polypure.errors import ConfigError
from polypure.evaluation.clustering import CLUSTERERS, make_clusterer

from .helpers import REPO, doc_page, random_images
from .nets import tiny

PLUGIN = REPO / "plugins" / "polypure-gmm"


def small(path, **sections):
    return Experiment(model=tiny(seed=7), dataset=random_images(20, 24, seed=4), store=path, progress=False,
                      topk={"layers": ["c3"], "k": 8},
                      relevance={"target_layer": "c3", "neurons": [1, 2, 3], "attribution_layers": ["c1", "c2"],
                                 "n_refs": 8}, **sections)


def test_builtin_clusterers_are_stored_with_their_parameters(tmp_path):
    exp = small(tmp_path / "s.h5", cluster={"methods": [{"name": "kmeans", "n_clusters": 3},
                                                        {"name": "hdbscan", "min_cluster_size": 3}]})
    exp.run(["topk", "relevance", "cluster"])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        km = f["clusters/c3/c2/kmeans"]
        assert km.shape == (3, 8) and km.dtype == np.int64
        assert json.loads(km.attrs["params"]) == {"n_clusters": 3} and km.attrs["method"] == "kmeans"
        assert set(np.unique(km[()])) <= {0, 1, 2}
        assert set(np.unique(f["clusters/c3/activation/hdbscan"][()])) <= {-1, 0, 1, 2, 3}
        # k-means as PURE ran it: the same labels as scikit-learn with n_init=10, random_state=seed
        from sklearn.cluster import KMeans
        features = f["relevance/c3/c2"][()]
        for m in range(3):
            expected = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(features[m].astype(np.float64))
            np.testing.assert_array_equal(km[m], expected)


def test_any_fit_predict_object_works_from_python(tmp_path):
    class Halves:
        """Not a scikit-learn estimator at all: first half vs second half."""

        def fit_predict(self, X):
            return (np.arange(len(X)) >= len(X) // 2).astype(int)

    from sklearn.cluster import AgglomerativeClustering
    exp = small(tmp_path / "s.h5")
    exp.run(["topk", "relevance"])
    exp.cluster(methods={"halves": Halves(), "agglo": AgglomerativeClustering(n_clusters=2)})
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["clusters/c3/c1/halves"][0], [0, 0, 0, 0, 1, 1, 1, 1])
        assert f["clusters/c3/c1/agglo"].attrs["method"] == "AgglomerativeClustering"


def test_unknown_clusterer_and_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="unknown clusterer 'kmeanz'; known: .*kmeans"):
        make_clusterer("kmeanz")
    with pytest.raises(ConfigError, match="cluster.methods: kmeans"):
        make_clusterer("kmeans", {"n_clustrs": 2})


def test_duplicate_method_ids_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="two methods would be stored as 'kmeans'; give each an 'id'"):
        small(tmp_path / "s.h5", cluster={"methods": [{"name": "kmeans"}, {"name": "kmeans", "n_clusters": 3}]})


def plugin_environment(tmp_path):
    """PYTHONPATH under which the plugin is importable and its entry point visible, installed or not."""
    dist = tmp_path / "site" / "polypure_gmm-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: polypure-gmm\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[polypure.clusterers]\ngmm = polypure_gmm:GaussianMixtureClusterer\n")
    paths = [str(tmp_path / "site"), str(PLUGIN / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def test_the_plugin_runs_by_name_through_the_command_line(tmp_path):
    store = tmp_path / "demo.h5"
    env = plugin_environment(tmp_path)
    listed = subprocess.run([sys.executable, "-m", "polypure", "list", "clusterers"], env=env, capture_output=True,
                            text=True)
    assert "gmm" in listed.stdout.split(": ", 1)[1].split(", ")
    out = subprocess.run(
        [sys.executable, "-m", "polypure", "run", "demo", "-q", "--stages", "topk,relevance,cluster", "--set",
         f"store={store}", "data.synthetic.n=120", "topk.k=10", "relevance.n_refs=10", "relevance.planted=null",
         "relevance.targets=[{layer: logits, attribution_layers: [block_1, block_2]}]",
         "cluster.methods=[{name: gmm, n_components: 2, n_dims: 3}]"],
        env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    with h5py.File(store, "r") as f:
        labels = f["clusters/logits/block_2/gmm"]
        assert labels.shape == (4, 10) and labels.attrs["method"] == "gmm"
        assert json.loads(labels.attrs["params"]) == {"n_components": 2, "n_dims": 3}
        assert set(np.unique(labels[()])) <= {0, 1}


def test_the_clusterer_guide_shows_the_plugin_files_themselves():
    # the page includes the files at build time (a snippet line per file), so it cannot drift from them
    guide = doc_page("how-to/clusterer.md")
    for path in (PLUGIN / "pyproject.toml", PLUGIN / "src" / "polypure_gmm" / "__init__.py"):
        assert path.is_file()
        assert f'--8<-- "{path.relative_to(REPO).as_posix()}"' in guide, f"the guide does not include {path}"


def test_installed_plugin_is_found_through_its_entry_point():
    from importlib.metadata import entry_points
    if not any(e.name == "gmm" for e in entry_points(group="polypure.clusterers")):
        pytest.skip("polypure-gmm is not installed here (the README's test command installs it)")
    assert "gmm" in CLUSTERERS.names()
    est = make_clusterer("gmm", {"n_components": 2})
    labels = est.fit_predict(np.r_[np.zeros((10, 4)), np.ones((10, 4)) * 5] + np.random.default_rng(0).normal(
        size=(20, 4)) * 0.1)
    assert len(set(labels[:10])) == 1 and len(set(labels[10:])) == 1 and labels[0] != labels[-1]
