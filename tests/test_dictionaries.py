"""Dictionary spaces: sparse autoencoders and NMF learned on a layer's activations, beside relevance clustering.

A small store holds a TopK SAE and an NMF of the tiny net's ``c3``, with real and planted neurons on that
layer. The tests hold that training is deterministic and resumable, that a space is what the stored
dictionary and the model's activations give, that ``dominant`` is the plain rule it claims, that a planted
neuron's space never reads the planted truth, and that a missing ``overcomplete`` is one line naming the
extra.
"""

from __future__ import annotations

import itertools
import re
import shutil
import sys

import h5py
import numpy as np
import pytest
import torch

from polypure import Experiment
from polypure.dictionaries import kinds
from polypure.errors import ConfigError
from polypure.evaluation.clustering import make_clusterer
from polypure.evaluation.metrics import degenerate
from polypure.store import schema
from polypure.store.hdf5_store import Store

from .crash_harness import differences
from .helpers import random_images
from .nets import tiny

TOP_K = 3
SAE = {"id": "sae", "layer": "c3", "kind": "topk_sae", "n_concepts": 24, "top_k": TOP_K, "epochs": 3,
       "batch_size": 128, "lr": 0.01, "max_samples": 800, "store_top": 8}
NMF = {"id": "nmf", "layer": "c3", "kind": "nmf", "n_concepts": 6, "epochs": 3, "max_samples": 800, "store_top": 6}
NEURONS = [0, 3, 5, 9]
N_REFS = 8
PLANTED = schema.planted_target("c3")


def experiment(path, **changes) -> Experiment:
    settings = {"topk": {"layers": ["c3"], "k": N_REFS},
                "relevance": {"targets": [{"layer": "c3", "neurons": NEURONS, "attribution_layers": ["c1", "c2"]}],
                              "n_refs": N_REFS, "planted": {"pairs": 2, "layer": "c3", "mode": ["sum", "max"],
                                                            "max_overlap": 1.0}},
                "dictionaries": [SAE, NMF], "seed": 4}
    return Experiment(model=tiny(seed=2), dataset=random_images(40, 32, seed=3), store=path, progress=False,
                      **{**settings, **changes})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Where the stores that are compared are written: at one path, since a store keeps its config (its path)."""
    return tmp_path_factory.mktemp("dictionaries")


def run_at(workdir, name: str, fail: type[BaseException] | None = None, **changes):
    """Top-K and dictionaries written at ``workdir/store.h5``, then moved to ``workdir/name``.

    With ``fail``, the run must raise it; the store stays at ``workdir/store.h5`` for the next run.
    """
    path = workdir / "store.h5"
    if fail is not None:
        with pytest.raises(fail):
            experiment(path, **changes).run(["topk", "dictionary"])
        return path
    experiment(path, **changes).run(["topk", "dictionary"])
    return path.rename(workdir / name)


@pytest.fixture(scope="module")
def base(workdir):
    """Top-K and both dictionaries with their spaces, trained without interruption."""
    return run_at(workdir, "base.h5")


def test_the_same_seed_gives_the_same_store(base, workdir):
    again = run_at(workdir, "again.h5")
    assert differences(base, again) == []
    with Store(again) as store:
        assert store.dictionary_ids() == ["nmf", "sae"]
        for dictionary_id in ("sae", "nmf"):
            attrs = store.dictionary_attrs(dictionary_id)
            assert attrs["complete"] and attrs["epochs_done"] == 3
            assert attrs["n_train"] + attrs["n_heldout"] == 800 and attrs["n_heldout"] == 80
            assert 0 <= attrs["dead_share"] <= 1 and attrs["r2"] <= 1
            # training state is gone once a dictionary is finished; what encodes stays
            assert store.dictionary_checkpoint(dictionary_id) == {}
        assert store.dictionary_attrs("sae")["mean_active"] <= TOP_K
        assert store.dictionary_attrs("nmf")["r2"] > 0.5


def test_another_seed_gives_another_dictionary(base, workdir):
    other = run_at(workdir, "other.h5", seed=5)
    with Store(base) as a, Store(other) as b:
        assert not np.array_equal(a.dictionary_arrays("sae")[0], b.dictionary_arrays("sae")[0])


class Interrupted(Exception):
    pass


def test_an_interrupted_training_resumes_to_the_same_store(base, workdir, monkeypatch, caplog):
    for kind in (kinds.TopKSAEKind, kinds.NMFKind):
        original = kind.fit_epoch

        def stop_at_epoch_two(self, train, epoch, seed, original=original):
            if epoch == 2:
                raise Interrupted
            original(self, train, epoch, seed)

        # the first run stops in the SAE's third epoch, the second in the NMF's (the SAE resumes and finishes)
        monkeypatch.setattr(kind, "fit_epoch", stop_at_epoch_two)
        path = run_at(workdir, "", fail=Interrupted)
        monkeypatch.setattr(kind, "fit_epoch", original)
        with Store(path) as store:
            attrs = store.dictionary_attrs(SAE["id"] if kind is kinds.TopKSAEKind else NMF["id"])
            assert attrs["epochs_done"] == 2 and not attrs["complete"]
    with caplog.at_level("INFO", logger="polypure"):
        resumed = run_at(workdir, "resumed.h5")
    assert "dictionary nmf: resuming after epoch 2 of 3" in caplog.text
    assert differences(base, resumed) == []


def _activations(exp: Experiment, samples: np.ndarray) -> np.ndarray:
    """The c3 output (n, C, P) of samples, as the model computes it."""
    from polypure.attribution.hooks import forward_to, tap_layers

    x = torch.stack([exp.dataset[int(i)][0] for i in samples])
    with torch.no_grad(), tap_layers({"c3": exp.model.submodule("c3")}) as out:
        forward_to(exp.model.module, x, out)
    return out["c3"].flatten(2).numpy().astype(np.float64)


def _sae_codes(vectors: np.ndarray, bias: np.ndarray, state: dict) -> np.ndarray:
    """The encoder of overcomplete's TopKSAE written out: the top-k of ReLU(W (a - bias) + b)."""
    pre = (vectors - bias) @ state["encoder.final_block.0.weight"].astype(np.float64).T
    codes = np.maximum(pre + state["encoder.final_block.0.bias"], 0)
    out = np.zeros_like(codes)
    top = np.argsort(-codes, axis=-1, kind="stable")[..., :TOP_K]
    np.put_along_axis(out, top, np.take_along_axis(codes, top, axis=-1), axis=-1)
    return out


def test_a_dictionary_space_is_its_recomputation_from_the_stored_dictionary(base):
    exp = experiment(base)
    with Store(base) as store:
        dictionary, bias, state = store.dictionary_arrays("sae")
        dictionary = dictionary.astype(np.float64)
        pairs, scales = store.planted_pairs("c3")
        modes = store.planted_modes("c3")
        for target in ("c3", PLANTED):
            neurons, concepts, contributions = store.dictionary_space("sae", target)
            refs = store.read_topk(target)[1][neurons, :N_REFS]
            assert contributions.shape == (len(neurons), N_REFS, SAE["store_top"])
            for row, neuron in enumerate(neurons):
                maps = _activations(exp, refs[row])                      # (n_refs, C, P)
                if target == "c3":
                    own, loading = maps[:, neuron], dictionary[:, neuron]
                else:
                    (a, b), (s_a, s_b) = pairs[neuron % len(pairs)], scales[neuron % len(pairs)]
                    scaled_a, scaled_b = maps[:, a] / s_a, maps[:, b] / s_b
                    own = np.maximum(scaled_a, scaled_b) if modes[neuron] == "max" else scaled_a + scaled_b
                    loading = dictionary[:, a] / s_a + dictionary[:, b] / s_b
                position = own.argmax(axis=1)                               # the first largest, as top-K 'max'
                vectors = maps[np.arange(N_REFS), :, position]             # (n_refs, C)
                every = _sae_codes(vectors, bias, state) * loading         # (n_refs, n_concepts)
                np.testing.assert_allclose(contributions[row], every[:, concepts[row]], atol=1e-5)
                # the kept concepts are the ones with the largest mean contribution, by decreasing mean
                means = every.mean(axis=0)
                kept = means[concepts[row]]
                assert np.all(np.diff(kept) <= 1e-6)
                assert kept.min() >= np.delete(means, concepts[row]).max() - 1e-6
        # the space as the clusterers read it: the target's rows (here, before relevance, the stored ones)
        assert np.array_equal(store.features("c3", "sae"), store.dictionary_space("sae", "c3")[2])


def test_an_nmf_space_decomposes_by_non_negative_codes(base):
    from scipy.optimize import nnls

    exp = experiment(base)
    with Store(base) as store:
        dictionary, _, _ = store.dictionary_arrays("nmf")
        neurons, concepts, contributions = store.dictionary_space("nmf", "c3")
        refs = store.read_topk("c3")[1][neurons, :N_REFS]
        assert (dictionary >= 0).all() and (contributions >= 0).all()
        for row, neuron in enumerate(neurons[:2]):
            maps = _activations(exp, refs[row])
            vectors = maps[np.arange(N_REFS), :, maps[:, neuron].argmax(axis=1)]
            codes = np.stack([nnls(dictionary.T.astype(np.float64), v)[0] for v in vectors])
            expected = codes * dictionary[:, neuron]
            np.testing.assert_allclose(contributions[row], expected[:, concepts[row]], atol=1e-5)


#: Circuit size and null draws of the selectivity tests (the NMF keeps 6 concepts, the SAE 8).
SEL_M, SEL_DRAWS = 3, 4


@pytest.fixture(scope="module")
def selective(base, workdir):
    """The base store clustered in the dictionary spaces and causally tested there."""
    path = workdir / "selective.h5"
    shutil.copy(base, path)
    cluster = {"spaces": ["sae", "nmf"],
               "methods": [{"name": "kmeans", "n_clusters": 2}, {"name": "dominant", "n_clusters": 2}]}
    experiment(path, cluster=cluster, selectivity={"enabled": True, "m": SEL_M, "null_draws": SEL_DRAWS}).run(
        ["topk", "dictionary", "relevance", "cluster", "selectivity"])
    return path


def _neuron_activation(maps: np.ndarray, target: str, neuron: int, pairs, scales, modes) -> np.ndarray:
    """A neuron's activation on each reference from c3 maps (n, C, P): the max over positions, clamped at 0."""
    if target == "c3":
        own = maps[:, neuron]
    else:
        (a, b), (s_a, s_b) = pairs[neuron % len(pairs)], scales[neuron % len(pairs)]
        own = np.maximum(maps[:, a] / s_a, maps[:, b] / s_b) if modes[neuron] == "max" \
            else maps[:, a] / s_a + maps[:, b] / s_b
    return np.maximum(own.max(axis=1), 0)


def _sides(activation, maps, codes, dictionary, chosen, labels, cluster) -> tuple[float, float]:
    """Own and other mean relative drop with concepts ``chosen`` subtracted at every position (NaN: no one there)."""
    removed = np.einsum("npk,kc->ncp", codes[:, :, chosen], dictionary[chosen])
    base, after = activation(maps), activation(maps - removed)
    active = base > 0
    drop = (base - after) / np.where(active, base, 1)
    own = drop[(labels == cluster) & active]
    other = drop[(labels >= 0) & (labels != cluster) & active]
    return (own.mean() if own.size else np.nan), (other.mean() if other.size else np.nan)


def test_dictionary_selectivity_is_its_recomputation_with_numpy(selective):
    """Encode the model's c3 maps with the stored dictionary in numpy, subtract each circuit, recompute the neuron."""
    from functools import partial

    from scipy.optimize import nnls

    exp = experiment(selective)
    checked = 0
    with Store(selective) as store:
        pairs, scales = store.planted_pairs("c3")
        modes = store.planted_modes("c3")
        for space, target, method in itertools.product(("sae", "nmf"), ("c3", PLANTED), ("kmeans", "dominant")):
            dictionary, bias, state = store.dictionary_arrays(space)
            dictionary = dictionary.astype(np.float64)
            features = store.features(target, space).astype(np.float64)
            concepts = store.dictionary_concepts(space, target)
            stored = {kind: store.metric(target, kind, space, method) for kind in schema.SELECTIVITY_KINDS}
            for row, neuron in enumerate(store.neurons(target)):
                labels = store.cluster_labels(target, space, method, row)
                if degenerate(features[row]) != "" or len(set(labels.tolist()) - {-1}) < 2:
                    # a degenerate space or no split: no score, no ablation
                    assert np.isnan(stored["selectivity"][row]) and (stored["selectivity_circuits"][row] == -1).all()
                    continue
                maps = _activations(exp, store.reference_indices(target)[row])              # (n, C, P)
                vectors = maps.transpose(0, 2, 1)                                           # (n, P, C)
                codes = (_sae_codes(vectors, bias, state) if space == "sae" else
                         np.stack([[nnls(dictionary.T, v)[0] for v in image] for image in vectors]))
                sides = partial(_sides, partial(_neuron_activation, target=target, neuron=neuron, pairs=pairs,
                                                scales=scales, modes=modes), maps, codes, dictionary, labels=labels)
                # the null's random sets of kept concepts: drawn cluster by cluster in label order
                rng = np.random.default_rng([4, int(neuron)])
                own_other, null_own_other = [], []
                for cluster in sorted(set(labels.tolist()) - {-1}):
                    circuit = np.argsort(-features[row][labels == cluster].mean(axis=0), kind="stable")[:SEL_M]
                    assert stored["selectivity_circuits"][row, cluster].tolist() == concepts[row][circuit].tolist()
                    own, other = sides(concepts[row][circuit], cluster=cluster)
                    nulls = np.array([sides(concepts[row][rng.choice(features.shape[2], SEL_M, replace=False)],
                                            cluster=cluster) for _ in range(SEL_DRAWS)])
                    if not (np.isfinite(own) and np.isfinite(other)):
                        # no active reference on one side: the cluster is left out
                        assert np.isnan(stored["selectivity_drops"][row, cluster]).all()
                        continue
                    expected = [own, other, *nulls.mean(axis=0)]
                    np.testing.assert_allclose(stored["selectivity_drops"][row, cluster], expected, atol=1e-4)
                    own_other.append(own - other)
                    null_own_other.append(expected[2] - expected[3])
                if not own_other:
                    assert np.isnan(stored["selectivity"][row])
                    continue
                assert stored["selectivity"][row] == pytest.approx(np.mean(own_other), abs=1e-4)
                assert stored["selectivity_null"][row] == pytest.approx(np.mean(null_own_other), abs=1e-4)
                checked += 1
    assert checked >= 16


def test_dictionary_selectivity_in_small_chunks_of_images_is_the_same(selective, tmp_path, monkeypatch):
    """Outputs and codes held for a few images at a time (many chunks, several passes): the same results."""
    from polypure.dictionaries import space

    path = tmp_path / "chunked.h5"
    shutil.copy(selective, path)
    with h5py.File(path, "a") as f:
        for target in ("c3", PLANTED):
            for kind in schema.SELECTIVITY_KINDS:
                del f[schema.metrics_path(target, kind)]
    # the SAE's outputs and codes of 10 images (64 positions x (16 channels + 24 concepts)): a row or two a chunk
    monkeypatch.setattr(space, "CHUNK_VALUES", 10 * 64 * 40)
    loads = []
    original = space.encoded_outputs

    def counted(*args, **kwargs):
        loads.append(kwargs.get("outputs") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(space, "encoded_outputs", counted)
    experiment(path, cluster={"spaces": ["sae", "nmf"], "methods": [{"name": "kmeans", "n_clusters": 2},
                                                                   {"name": "dominant", "n_clusters": 2}]},
               selectivity={"enabled": True, "m": SEL_M, "null_draws": SEL_DRAWS, "batch_size": 64}).selectivity()
    assert len(loads) > 8           # many chunks (one per dictionary and target would be 4)
    with Store(selective) as whole, Store(path) as chunked:
        for target, space_id, method, kind in itertools.product(("c3", PLANTED), ("sae", "nmf"), ("kmeans", "dominant"),
                                                                schema.SELECTIVITY_KINDS):
            np.testing.assert_allclose(chunked.metric(target, kind, space_id, method),
                                       whole.metric(target, kind, space_id, method), atol=1e-6)
    # in one chunk, the second dictionary of the layer reuses the first one's forward pass, target by target
    loads.clear()
    monkeypatch.setattr(space, "CHUNK_VALUES", 2**25)
    experiment(path, selectivity={"enabled": True, "m": SEL_M + 1, "null_draws": SEL_DRAWS}).selectivity()
    assert loads == [False, True, False, True]


def test_the_report_index_shows_each_dictionary_s_quality_from_the_store(selective, tmp_path):
    from polypure.viz.report import write_report

    index = write_report(selective, out=tmp_path / "report", dataset=random_images(40, 32, seed=3), max_neurons=1,
                         progress=False)
    html = index.read_text(encoding="utf-8")
    assert '<a href="#dictionaries">dictionaries</a>' in html
    table = html[html.index('<table id="dictionary-table">'):]
    table = table[:table.index("</table>")]
    rows = [re.findall(r"<td>(.*?)</td>", row, flags=re.S) for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)]
    rows = [row for row in rows if row]
    with Store(selective) as store:
        expected = []
        for dictionary_id in store.dictionary_ids():
            attrs = store.dictionary_attrs(dictionary_id)
            n_concepts = len(store.dictionary_arrays(dictionary_id)[0])
            expected.append([dictionary_id, attrs["kind"], "c3", str(n_concepts), f"{attrs['r2']:.3f}",
                             f"{100 * attrs['dead_share']:.1f} %", f"{attrs['mean_active']:.1f}",
                             str(attrs["n_heldout"])])
    assert rows == expected and len(rows) == 2
    # the figures are the dictionaries' own: the SAE keeps at most top_k concepts per position
    assert float(rows[[r[0] for r in rows].index("sae")][6]) <= TOP_K


def dominant_loop(features: np.ndarray, n_clusters: int) -> np.ndarray:
    """The rule of ``dominant``, one reference at a time."""
    means = [float(np.mean([row[j] for row in features])) for j in range(features.shape[1])]
    candidates = []
    for _ in range(n_clusters):
        best = None
        for j, mean in enumerate(means):
            if j not in candidates and (best is None or mean > means[best]):
                best = j
        candidates.append(best)
    labels = []
    for row in features:
        best = 0
        for rank, j in enumerate(candidates):
            if row[j] > row[candidates[best]]:
                best = rank
        labels.append(best)
    return np.array(labels)


def test_dominant_is_the_plain_rule():
    rng = np.random.default_rng(0)
    dominant = make_clusterer("dominant", {"n_clusters": 3}, seed=0)
    for _ in range(20):
        features = rng.exponential(size=(12, 7)) * (rng.random((12, 7)) < 0.5)
        assert np.array_equal(dominant.fit_predict(features), dominant_loop(features, 3))
    # ties go to the earlier concept, then to the better ranked one
    assert dominant.fit_predict(np.ones((4, 5))).tolist() == [0, 0, 0, 0]


def test_dominant_clusters_the_dictionary_spaces_only(base, tmp_path):
    path = tmp_path / "clustered.h5"
    shutil.copy(base, path)
    cluster = {"spaces": ["c2", "activation", "sae", "nmf"],
               "methods": [{"name": "kmeans", "n_clusters": 2}, {"name": "dominant", "n_clusters": 2}]}
    experiment(path, cluster=cluster).run(["topk", "dictionary", "relevance", "cluster"])
    with Store(path) as store:
        assert sorted(store.clusterings("c3")) == [("activation", "kmeans"), ("c2", "kmeans"), ("nmf", "dominant"),
                                                   ("nmf", "kmeans"), ("sae", "dominant"), ("sae", "kmeans")]
        for target in ("c3", PLANTED):
            for space in ("sae", "nmf"):
                features = store.features(target, space)
                stored = store.cluster_labels(target, space, "dominant")
                for row in range(len(features)):
                    assert np.array_equal(stored[row], dominant_loop(features[row], 2))
    refused = {"methods": [{"name": "kmeans"}, {"name": "dominant", "spaces": ["sae", "c2"]}]}
    with pytest.raises(ConfigError) as caught:
        experiment(tmp_path / "refused.h5", cluster=refused).validate()
    assert str(caught.value) == ("cluster.methods[1] (dominant).spaces: 'c2' is no dictionary space; dominant "
                                 "clusters dictionary spaces only (dictionaries: sae, nmf)")


def test_a_planted_space_does_not_read_the_planted_truth(base, tmp_path):
    path = tmp_path / "truth.h5"
    shutil.copy(base, path)
    with Store(path) as store:
        before = {d: store.features(PLANTED, d) for d in ("sae", "nmf")}
    truths = [schema.join(schema.topk_path(PLANTED), schema.TRUTH), schema.join(schema.planted_path("c3"),
                                                                                 schema.TRUTH)]
    with h5py.File(path, "a") as f:
        for name in truths:
            f[name][...] = 1 - f[name][()]
        flipped = f[truths[0]][()]
        for dictionary_id in ("sae", "nmf"):
            del f[schema.dictionary_space_path(dictionary_id, PLANTED)]
    experiment(path).run(["topk", "dictionary"])
    with Store(path) as store, Store(base) as original:
        # the truth did change, and the spaces were made again from the store that holds it
        assert np.array_equal(store.topk_payload(PLANTED, schema.TRUTH), flipped)
        assert not np.array_equal(flipped, original.topk_payload(PLANTED, schema.TRUTH))
        for dictionary_id, features in before.items():
            assert store.dictionary_space_attrs(dictionary_id, PLANTED)
            assert np.array_equal(store.features(PLANTED, dictionary_id), features)


def test_without_overcomplete_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    from polypure.cli import main

    monkeypatch.setitem(sys.modules, "overcomplete", None)
    path = tmp_path / "none.h5"
    with pytest.raises(ConfigError) as caught:
        experiment(path).run(["topk", "dictionary"])
    assert str(caught.value) == ("dictionaries[0] (sae): kind 'topk_sae' needs the overcomplete package: "
                                 "pip install 'polypure[dict]'")
    assert not path.exists()
    status = main(["run", "demo", "-q", "--set", f"store={path}", "--set",
                   "dictionaries=[{id: nmf, layer: block_3, kind: nmf, n_concepts: 8}]"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "pip install 'polypure[dict]'" in err and "dictionaries[0] (nmf)" in err
    assert not path.exists()


def test_the_colormap_alias_is_installed_only_where_matplotlib_lacks_it(monkeypatch):
    import matplotlib
    import matplotlib.cm

    own = object()
    monkeypatch.setattr(matplotlib.cm, "get_cmap", own, raising=False)
    kinds.import_overcomplete()
    assert matplotlib.cm.get_cmap is own
    monkeypatch.delattr(matplotlib.cm, "get_cmap")
    kinds.import_overcomplete()
    assert matplotlib.cm.get_cmap("viridis").name == "viridis"
    assert matplotlib.cm.get_cmap("viridis", 7).N == 7


def test_dictionary_entries_are_checked_with_the_config():
    from polypure.config.settings import config_from_dict

    base = {"relevance": {"targets": [{"layer": "c3", "attribution_layers": ["c1", "c2"]}]}}
    for entries, message in (
            ([SAE, {**NMF, "id": "sae"}], "dictionaries[1]: id 'sae' is used twice"),
            ([{**SAE, "id": "c2"}], "id 'c2' is the name of an attribution layer"),
            ([{**SAE, "id": "activation"}], "dictionary id 'activation' is reserved"),
            ([{**SAE, "top_k": 30}], "top_k (30) must be at most n_concepts (24)"),
            ([{**SAE, "epoch": 3}], "dictionaries[0].epoch: unknown key (did you mean 'epochs'?)")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict({**base, "dictionaries": entries})
    assert config_from_dict(base).dictionaries == []
