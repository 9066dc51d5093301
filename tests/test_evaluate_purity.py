"""The evaluate stage's purity scores: the right rows, activations and clusters, against plain numpy loops.

The scores themselves are checked against their definitions in test_purity.py; here the wiring is: which
embeddings, which top-K values (monosemanticity), which clusters (split gain), which neurons get NaN, and
what the summary and Results.metrics make of them.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from polypure.evaluation import purity, summary
from polypure.store.results import open_results

from .helpers import PURITY_NEURONS, PURITY_SEED, purity_experiment

NEURONS = PURITY_NEURONS
SEED = PURITY_SEED
experiment = purity_experiment


@pytest.fixture(scope="module")
def path(purity_store):
    return purity_store


def unit(x):
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norms > 0, x / np.where(norms > 0, norms, 1), 0.0)


def pairs_mean(v, weights=None):
    """Weighted mean cosine similarity over pairs i != j of one neuron's references (unit rows of ``v``)."""
    n = len(v)
    w = np.ones(n) if weights is None else weights
    num = den = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                num += w[i] * w[j] * float(v[i] @ v[j])
                den += w[i] * w[j]
    return num / den if den > 0 else np.nan


def read(path, target):
    with h5py.File(path, "r") as f:
        group = f[f"metrics/{target}"]
        neurons = f[f"relevance/{target}/neurons"][()]
        n_refs = f[f"relevance/{target}/activation"].shape[1]
        return {"embeddings": f[f"embeddings/labels/{target}"][()].astype(np.float64),
                "activations": f[f"topk/{target}/values"][()][neurons, :n_refs].astype(np.float64),
                "degenerate": group["degenerate/labels"].asstr()[()],
                "scores": {kind: group[f"{kind}/labels"][()] for kind in
                           ("clarity", "polysemanticity", "monosemanticity_topk", "nearest_similarity")},
                "redundancy": group["redundancy/labels"][()],
                "gain": {(space, method): ds[()] for space in group["split_gain/labels"]
                         for method, ds in group[f"split_gain/labels/{space}"].items()},
                "status": {(space, method): group[f"cluster_status/{space}/{method}"].asstr()[()]
                           for space in group["split_gain/labels"] for method in group[f"split_gain/labels/{space}"]},
                "space_degenerate": {space: group[f"degenerate/{space}"].asstr()[()]
                                     for space in group["split_gain/labels"]},
                "clusters": {(space, method): f[f"clusters/{target}/{space}/{method}"][()]
                             for space in group["split_gain/labels"] for method in group[f"split_gain/labels/{space}"]}}


@pytest.mark.parametrize("target", ["c3", "c3@planted"])
def test_purity_scores_are_those_of_each_neurons_embeddings_and_top_k_values(path, target):
    data = read(path, target)
    v = unit(data["embeddings"])
    skip = data["degenerate"] != ""
    clarity = [np.nan if s else pairs_mean(row) for row, s in zip(v, skip)]
    np.testing.assert_allclose(data["scores"]["clarity"], clarity, rtol=1e-10, atol=1e-12)
    # the neuron's own top-K statistic of each of its references, min-max normalised: Pach et al.'s weights
    mono = []
    for row, a, s in zip(v, data["activations"], skip):
        weights = (a - a.min()) / (a.max() - a.min()) if a.max() > a.min() else np.ones_like(a)
        mono.append(np.nan if s else pairs_mean(row, weights))
    np.testing.assert_allclose(data["scores"]["monosemanticity_topk"], mono, rtol=1e-10, atol=1e-12)
    poly = [np.nan if s else purity.polysemanticity(e, seed=SEED) for e, s in zip(data["embeddings"], skip)]
    np.testing.assert_allclose(data["scores"]["polysemanticity"], poly, rtol=1e-10, atol=1e-12)
    theta = unit(v.mean(axis=1))
    similarity = theta @ theta.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.max(axis=1)
    np.testing.assert_allclose(data["scores"]["nearest_similarity"], nearest, rtol=1e-10)
    assert data["redundancy"].shape == () and data["redundancy"] == pytest.approx(nearest.mean())


@pytest.mark.parametrize("target", ["c3", "c3@planted"])
def test_split_gain_is_of_each_stored_clustering(path, target):
    data = read(path, target)
    v = unit(data["embeddings"])
    assert set(data["gain"]) == set(data["clusters"]) and len(data["gain"]) >= 4
    for key, labels in data["clusters"].items():
        expected = []
        for m, (row, lab) in enumerate(zip(v, labels)):
            if data["status"][key][m] or data["degenerate"][m] or data["space_degenerate"][key[0]][m]:
                expected.append(np.nan)
                continue
            sizes = {c: int((lab == c).sum()) for c in set(lab.tolist()) if c >= 0}
            kept = [i for i, c in enumerate(lab) if c >= 0 and sizes[c] >= 2]
            weighted = sum(sizes[c] * pairs_mean(row[lab == c]) for c in sizes if sizes[c] >= 2) / len(kept)
            expected.append(weighted - pairs_mean(row[kept]))
        np.testing.assert_allclose(data["gain"][key], expected, rtol=1e-10, atol=1e-12, err_msg=str(key))
    # HDBSCAN calls every reference noise here: no split, no gain
    assert all(np.isnan(values).all() for (space, method), values in data["gain"].items() if method == "hdbscan")


def test_summary_and_long_form_show_the_purity_scores(path):
    with open_results(path) as results:
        frame = results.metrics()
        records = summary.read(results.store)
    purity_rows = frame[frame["metric"].isin(["clarity", "polysem", "mono-topK", "redundancy"])]
    # one value per neuron, in the reference space, with no cluster method
    assert set(purity_rows["space"]) == {"labels"} and set(purity_rows["method"]) == {""}
    assert len(purity_rows) == 4 * (len(NEURONS) + 4)
    gain = frame[frame["metric"] == "gain"]
    assert set(gain["space"]) == {"c1", "c2", "activation"} and set(gain["method"]) == {"kmeans", "hdbscan"}
    labels = [r["metric"] for r in records if r["group"] == "c3" and r["method"] in ("", "kmeans")]
    assert labels.index("corr labels") < labels.index("gain labels") < labels.index("clarity labels") \
        < labels.index("mono-topK labels") < labels.index("ARI class")
    with h5py.File(path, "r") as f:
        stored = f["metrics/c3/redundancy/labels"][()]
    # the mean of the per-neuron nearest similarity over a whole target is the target's redundancy
    whole = next(r for r in records if r["group"] == "c3" and r["metric"] == "redundancy labels")
    assert whole["mean"] == pytest.approx(stored) and whole["space"] == "labels"
    tables = summary.pivot(records, ["kmeans"])
    purity_table = next(t for t in tables if t.group == "c3" and "clarity labels" in t.metrics)
    assert purity_table.spaces == ["labels"] and purity_table.title == f"c3 ({len(NEURONS)} neurons)"  # no method
    assert purity_table.metrics == ["clarity labels", "polysem labels", "mono-topK labels", "redundancy labels"]
