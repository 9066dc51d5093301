"""Causal selectivity: ablating a cluster's circuit silences the neuron on that cluster's references only.

The network is built by hand. Layer ``rgb`` copies the input (3 channels: too few for a circuit of 4);
layer ``mix`` has 64 channels: 0-3 see only the red input channel, 4-7 only the blue one, the others only the
green one. The target layer ``out`` has neuron 0 = the sum of channels 0-7
(red images and blue images both drive it: polysemantic, with a known split), neuron 1 = channels 0-3 and
neuron 2 = channels 4-7; ``mix2`` copies ``mix``. The split by colour is real in the network's own
computation; a split that ignores colour is not.
"""

from __future__ import annotations

import itertools
import json
import re

import h5py
import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import adjusted_rand_score
from torch import nn

from polypure import Experiment
from polypure.attribution.ablation import Ablation, ConceptSubtraction, channel_activation
from polypure.data.datasets import ArrayDataset
from polypure.errors import ConfigError
from polypure.evaluation import comparisons, summary
from polypure.evaluation.selectivity import measure
from polypure.models.factory import ExplainedModel
from polypure.store.hdf5_store import Store
from polypure.store.results import open_results

from .helpers import doc_page

WIDTH, SIZE, PER_COLOUR, K, M, DRAWS, SEED = 64, 12, 20, 20, 4, 5, 7
#: Weights of the red channels 0-3 and (the same) of the blue channels 4-7 into neuron 0.
WEIGHTS = torch.tensor([1.0, 0.8, 0.6, 0.4])


class ColourNet(nn.Module):
    """rgb (a copy) -> mix (1x1 conv, ReLU) -> mix2 (a copy, ReLU) -> out (three neurons) -> max pool -> a head."""

    def __init__(self):
        super().__init__()
        self.rgb = nn.Conv2d(3, 3, 1, bias=False)
        self.mix, self.act = nn.Conv2d(3, WIDTH, 1, bias=False), nn.ReLU()
        self.mix2, self.act2 = nn.Conv2d(WIDTH, WIDTH, 1, bias=False), nn.ReLU()
        self.out = nn.Conv2d(WIDTH, 3, 1, bias=False)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.rgb.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            mix = torch.zeros(WIDTH, 3)
            mix[0:4, 0] = 1.0                                           # red
            mix[4:8, 2] = 1.0                                           # blue
            mix[8:, 1] = torch.linspace(0.5, 1.5, WIDTH - 8)            # green: nothing to do with the neurons
            self.mix.weight.copy_(mix.view(WIDTH, 3, 1, 1))
            self.mix2.weight.copy_(torch.eye(WIDTH).view(WIDTH, WIDTH, 1, 1))
            out = torch.zeros(3, WIDTH)
            out[0, 0:4], out[0, 4:8] = WEIGHTS, WEIGHTS
            out[1, 0:4], out[2, 4:8] = WEIGHTS, WEIGHTS
            self.out.weight.copy_(out.view(3, WIDTH, 1, 1))
        self.eval()

    def forward(self, x):
        h = self.act2(self.mix2(self.act(self.mix(self.rgb(x)))))
        return self.head(self.out(h).amax(dim=(2, 3)))


def colour_net() -> ExplainedModel:
    return ExplainedModel(ColourNet(), layers={"rgb": "rgb", "mix": "act", "mix2": "act2", "out": "out"})


def colour_images() -> ArrayDataset:
    """Red, blue and green squares at seeded places, of paired brightness (red i as bright as blue i)."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((3 * PER_COLOUR, SIZE, SIZE, 3), np.uint8)
    for colour, channel in enumerate((0, 2, 1)):
        for i in range(PER_COLOUR):
            row, col = rng.integers(0, SIZE - 4, size=2)
            pixels[colour * PER_COLOUR + i, row:row + 4, col:col + 4, channel] = 100 + 7 * i
    colours = np.repeat(np.arange(3), PER_COLOUR)
    return ArrayDataset(pixels, labels=colours, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def experiment(path, compare: dict | None = None, settings: dict | None = None, **selectivity) -> Experiment:
    return Experiment(model=colour_net(), dataset=colour_images(), store=path, progress=False, seed=SEED,
                      topk={"layers": ["out"], "k": K},
                      relevance={"targets": [{"layer": "out", "neurons": "all",
                                              "attribution_layers": ["rgb", "mix", "mix2"]}],
                                 "n_refs": K, "planted": {"pairs": 1, "layer": "out", "mode": "sum"}},
                      evaluate={"ground_truth": ["class"]}, compare={"n_resamples": 1000, **(compare or {})},
                      selectivity={"enabled": True, "m": M, "null_draws": DRAWS, **selectivity}, **(settings or {}))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("selectivity") / "colours.h5"
    experiment(path).run(["topk", "relevance", "cluster", "selectivity", "evaluate"])
    return path


def colours_of_refs(st: Store, target: str) -> np.ndarray:
    return st.labels()[st.reference_indices(target)]


# -- the score itself -------------------------------------------------------------------------------------------


def test_the_split_by_colour_is_selective_and_a_split_that_ignores_colour_is_not(store):
    with Store(store) as st:
        row = int(np.flatnonzero(st.neurons("out") == 0)[0])
        colours = colours_of_refs(st, "out")[row]
        relevance = st.relevance("out", "mix")[row]
        refs = st.reference_indices("out")[row]
    assert sorted(np.unique(colours).tolist()) == [0, 1]                 # red and blue references, no green
    data = colour_images()
    images = torch.stack([data[int(i)][0] for i in refs])
    net = colour_net()
    ablation = Ablation(net.module, "mix", net.submodule("mix"), net.submodule("out"), batch_size=64)

    def ablate(keep):
        return ablation(images, keep, channel_activation(0, "max"))

    rng = np.random.default_rng(1)
    # a split independent of colour: each colour's references halved at random between the two clusters
    random_split = np.zeros(len(colours), np.int64)
    for colour in (0, 1):
        members = rng.permutation(np.flatnonzero(colours == colour))
        random_split[members[:len(members) // 2]] = 1
    found = measure(ablate, relevance, {"colour": colours, "random": random_split}, M, DRAWS, SEED, 0)
    by_colour, at_random = found["colour"], found["random"]
    assert by_colour.selectivity > 0.8
    # each colour's circuit is its own channels, which silence its references and spare the other colour's
    assert sorted(by_colour.circuits[0].tolist()) == [0, 1, 2, 3] and sorted(by_colour.circuits[1].tolist()) == [4, 5, 6, 7]
    np.testing.assert_allclose(by_colour.drops[:, :2], [[1, 0], [1, 0]], atol=1e-6)
    assert abs(at_random.selectivity) < 0.2
    for result in (by_colour, at_random):
        assert abs(result.null) < 0.2                                     # random channel sets: no selectivity


def test_noise_is_no_cluster_and_a_cluster_without_another_side_is_left_out():
    from polypure.evaluation.selectivity import score

    base = np.ones(6)
    ablated = {0: np.array([0, 0, 1, 1, 0, 0.]), 1: np.array([1, 1, 0, 0, 1, 1.])}
    null = {0: [np.ones(6)], 1: [np.ones(6)]}
    # references 4 and 5 are noise: the drop they show under cluster 0's ablation counts on neither side
    result = score(np.array([0, 0, 1, 1, -1, -1]), base, ablated, null)
    assert result.selectivity == pytest.approx(1.0) and result.drops.shape == (2, 4)
    alone = score(np.array([0, 0, -1, -1, -1, -1]), base, ablated, null)
    assert np.isnan(alone.selectivity) and np.isnan(alone.drops).all()
    # a neuron silent on the other side has no other drop: the cluster is left out, the other one scored
    silent = score(np.array([0, 0, 1, 1, 1, 1]), np.array([1, 1, 0, 0, 0, 1.]), ablated, null)
    assert np.isfinite(silent.drops[1]).all() and silent.selectivity == pytest.approx(silent.drops[1, 0] - silent.drops[1, 1])


def test_an_ablation_two_clusterings_share_is_computed_once():
    from polypure.evaluation.selectivity import measure

    rng = np.random.default_rng(0)
    relevance = rng.random((12, 10))
    labels = np.repeat([0, 1], 6)
    calls = []

    def ablate(keep):
        calls.append(len(keep))
        # a made-up neuron: the sum of the kept channels' relevance, per reference
        return (relevance * keep[:, None, :]).sum(axis=2)

    alone = measure(ablate, relevance, {"a": labels}, 3, 4, 0, 5)["a"]
    # the same labels under two names: the same circuits and random sets, so nothing more to ablate
    both = measure(ablate, relevance, {"a": labels, "b": labels.copy()}, 3, 4, 0, 5)
    assert calls == [1 + 2 * (1 + 4)] * 2
    for split in both.values():
        assert split.selectivity == alone.selectivity and split.null == alone.null
        np.testing.assert_array_equal(split.drops, alone.drops)


# -- the stage and what it stores -------------------------------------------------------------------------------


def test_the_stored_selectivity_equals_a_recomputation_with_plain_torch(store):
    """Circuits from the stored relevance and clusters, ablation by hand, drops and null as docs/method.md says."""
    with Store(store) as st:
        row = int(np.flatnonzero(st.neurons("out") == 0)[0])
        labels = st.cluster_labels("out", "mix", "kmeans", row)
        relevance = st.relevance("out", "mix")[row].astype(np.float64)
        refs = st.reference_indices("out")[row]
        stored = {kind: st.metric("out", kind, "mix", "kmeans") for kind in
                  ("selectivity", "selectivity_null", "selectivity_drops", "selectivity_circuits")}
    net, data = ColourNet(), colour_images()
    images = torch.stack([data[int(i)][0] for i in refs])

    def neuron(zeroed: list[int]) -> np.ndarray:
        with torch.no_grad():
            h = net.act(net.mix(net.rgb(images)))
            h[:, zeroed] = 0
            return net.out(net.act2(net.mix2(h)))[:, 0].amax(dim=(1, 2)).clamp(min=0).double().numpy()

    base = neuron([])
    rng = np.random.default_rng([SEED, 0])
    own_other, null_own_other, drops = [], [], []
    for cluster in sorted(set(labels.tolist()) - {-1}):
        circuit = np.argsort(-relevance[labels == cluster].mean(axis=0), kind="stable")[:M]
        assert sorted(stored["selectivity_circuits"][row, cluster].tolist()) == sorted(circuit.tolist())

        def sides(zeroed, cluster=cluster):
            drop = (base - neuron(list(zeroed))) / base
            return drop[labels == cluster].mean(), drop[(labels >= 0) & (labels != cluster)].mean()

        own, other = sides(circuit)
        nulls = [sides(rng.choice(WIDTH, M, replace=False)) for _ in range(DRAWS)]
        null_own, null_other = np.mean([n[0] for n in nulls]), np.mean([n[1] for n in nulls])
        own_other.append(own - other)
        null_own_other.append(null_own - null_other)
        drops.append([own, other, null_own, null_other])
    assert stored["selectivity"][row] == pytest.approx(np.mean(own_other), abs=1e-6)
    assert stored["selectivity_null"][row] == pytest.approx(np.mean(null_own_other), abs=1e-6)
    np.testing.assert_allclose(stored["selectivity_drops"][row], drops, atol=1e-6)
    assert stored["selectivity"][row] > 0.8


def test_concepts_subtracted_below_the_target_go_through_the_rest_of_the_network():
    """A ConceptSubtraction at ``mix`` against plain torch: subtract the terms, forward mix2 and out by hand."""
    net, data = ColourNet(), colour_images()
    images = torch.stack([data[i][0] for i in range(0, 3 * PER_COLOUR, 6)])
    rng = np.random.default_rng(0)
    concepts = 5
    dictionary = torch.tensor(rng.random((concepts, WIDTH)), dtype=torch.float32)
    codes = torch.tensor(rng.random((len(images), SIZE * SIZE, concepts)), dtype=torch.float32)
    keep = np.ones((3, concepts), bool)
    keep[1, [0, 2]] = False
    keep[2, 4] = False
    # a batch of 16 rows holds one edit of the 10 images: three passes
    ablation = Ablation(net, "mix", net.act, net.out, batch_size=16)
    found = ablation(images, ConceptSubtraction(codes, dictionary, keep), channel_activation(0, "max"))
    with torch.no_grad():
        h = net.act(net.mix(net.rgb(images)))
        for edit in range(3):
            removed = np.einsum("npt,tc->ncp", codes.numpy() * ~keep[edit], dictionary.numpy()).reshape(h.shape)
            out = net.out(net.act2(net.mix2(h - torch.from_numpy(removed))))
            expected = out[:, 0].amax(dim=(1, 2)).clamp(min=0).double().numpy()
            np.testing.assert_allclose(found[edit], expected, rtol=1e-5, atol=1e-5)
    assert not ablation.at_target and not np.allclose(found[0], found[1])


@pytest.mark.parametrize("bypass", [False, True])
def test_neurons_batched_together_get_what_each_gets_alone(bypass):
    """Requests packed into shared passes (and cut where one is too large) equal one call per request."""
    from polypure.attribution.ablation import ChannelMasks, Request

    from .helpers import random_images
    from .nets import tiny

    net = tiny(seed=1, bypass=bypass)
    data = random_images(12, 32, seed=2)
    rng = np.random.default_rng(4)
    requests = []
    for neuron, count in ((0, 5), (3, 7), (5, 2), (9, 6)):
        images = torch.stack([data[int(i)][0] for i in rng.choice(12, count, replace=False)])
        keep = rng.random((int(rng.integers(1, 6)), 12)) > 0.3
        keep[0] = True
        edits = (ChannelMasks(keep) if neuron % 2 else
                 ConceptSubtraction(torch.rand(count, 16 * 16, 4), torch.rand(4, 12), keep[:, :4]))
        requests.append(Request(images, edits, channel_activation(neuron, "max")))
    ablation = Ablation(net.module, "c2", net.submodule("c2"), net.submodule("c3"), batch_size=20)
    together = ablation.batch(requests)
    assert ablation.share is (not bypass)
    for request, found in zip(requests, together):
        alone = Ablation(net.module, "c2", net.submodule("c2"), net.submodule("c3"), batch_size=10_000)
        np.testing.assert_allclose(found, alone(request.images, request.edits, request.activation), rtol=1e-5,
                                   atol=1e-6)


#: A dictionary of ``out`` whose concepts are its two true components: the red route (into neurons 0 and 1) and the
#: blue one (into neurons 0 and 2). Every activation vector of ``out`` is ``z_red D[0] + z_blue D[1]`` exactly.
TRUTH = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], np.float32)


def test_a_dictionary_of_the_two_true_components_makes_the_colour_split_selective(store, tmp_path):
    """Subtracting the red concept silences neuron 0 on red references alone; a split blind to colour scores 0."""
    from polypure.config.settings import DictionarySection
    from polypure.store import schema

    path = tmp_path / "truth.h5"
    path.write_bytes(store.read_bytes())
    entry = {"id": "truth", "layer": "out", "kind": "nmf", "n_concepts": 2, "max_samples": 100}
    spec = DictionarySection(**entry)
    with Store(path, "a") as st:
        # stored as finished with the entry's settings: the dictionary stage only makes its spaces
        st.write_dictionary_checkpoint("truth", {schema.KIND_ATTR: "nmf", schema.LAYER_ATTR: "out",
                                                 schema.SIGNATURE_ATTR: json.dumps(spec.signature(SEED), sort_keys=True)},
                                       {}, spec.epochs)
        st.write_dictionary("truth", TRUTH, np.zeros(3, np.float32), {},
                            {"r2": 1.0, "dead_share": 0.0, "mean_active": 2.0, "n_train": 90, "n_heldout": 10})
    settings = {"dictionaries": [entry], "cluster": {"spaces": ["truth"], "methods": [{"name": "kmeans"}]}}
    experiment(path, settings=settings, m=1, spaces=["truth"]).run(["dictionary", "cluster"])
    rng = np.random.default_rng(3)
    with Store(path, "a") as st:
        assert np.array_equal(st.dictionary_arrays("truth")[0], TRUTH)
        # a split blind to colour: each colour's references halved at random between two clusters
        colours = colours_of_refs(st, "out")
        blind = np.zeros_like(colours)
        for row, colour in itertools.product(range(len(colours)), (0, 1, 2)):
            members = rng.permutation(np.flatnonzero(colours[row] == colour))
            blind[row, members[:len(members) // 2]] = 1
        st.write_clusters("out", "truth", "blind", blind, {"method": "blind", "signature": "blind"})
    experiment(path, settings=settings, m=1, spaces=["truth"]).selectivity()
    with Store(path) as st:
        row = int(np.flatnonzero(st.neurons("out") == 0)[0])
        labels = st.cluster_labels("out", "truth", "kmeans", row)
        assert abs(adjusted_rand_score(labels, colours[row])) == pytest.approx(1.0)     # k-means finds the colours
        by_colour = st.metric("out", "selectivity", "truth", "kmeans")[row]
        assert by_colour > 0.95
        # each colour's circuit is its own concept: red references drive neuron 0 through concept 0
        red = int(labels[colours[row] == 0][0])
        assert st.metric("out", "selectivity_circuits", "truth", "kmeans")[row, red].tolist() == [0]
        np.testing.assert_allclose(st.metric("out", "selectivity_drops", "truth", "kmeans")[row, :, :2],
                                   [[1, 0], [1, 0]], atol=1e-3)
        assert abs(st.metric("out", "selectivity", "truth", "blind")[row]) < 0.15
        planted = st.metric("out@planted", "selectivity", "truth", "kmeans")[0]
        assert planted > 0.95


def test_the_planted_neuron_of_two_colour_channels_is_split_for_real(store):
    with Store(store) as st:
        assert st.planted_pairs("out")[0].ravel().tolist() in ([1, 2], [2, 1])
        values = st.metric("out@planted", "selectivity", "mix", "kmeans")
        null = st.metric("out@planted", "selectivity_null", "mix", "kmeans")
    assert values[0] > 0.8 and abs(null[0]) < 0.2


def test_layers_too_narrow_for_a_circuit_and_degenerate_neurons_get_no_score(store):
    with Store(store) as st:
        # rgb has 3 channels, fewer than m: not tested at all
        assert st.metric_keys("out", "selectivity") == ["mix", "mix2"]
        # neuron 1 sees red references only, all with the same relevance: a constant space, no split to test
        row = int(np.flatnonzero(st.neurons("out") == 1)[0])
        assert np.isnan(st.metric("out", "selectivity", "mix", "kmeans")[row])
        assert np.isnan(st.metric("out", "selectivity_drops", "mix", "kmeans")[row]).all()
        assert st.metric_attrs("out", "selectivity_drops", "mix", "kmeans")["columns"] == [
            "own", "other", "null_own", "null_other"]


def test_selectivity_is_in_the_summary_the_comparisons_and_the_metrics_table(store):
    with Store(store) as st:
        records = summary.read(st)
        compared, _ = comparisons.read(st)
    rows = {(r["target"], r["space"], r["metric"]): r for r in records if r["group"] == r["target"]}
    circuit = rows["out", "mix", "selectivity circuit"]
    assert circuit["n"] == 1 and circuit["mean"] > 0.8 and "constant" in circuit["skipped"]
    assert abs(rows["out", "mix", "selectivity null"]["mean"]) < 0.2
    assert ("out", "rgb", "selectivity circuit") not in rows
    text = summary.format_table(records, "kmeans")
    assert "selectivity circuit" in text and "selectivity null" in text
    # compared between spaces, over the same neurons: mix against the baseline mix2, for both kinds
    pairs = {(r["target"], r["metric"], r["space_b"], r["space_a"]) for r in compared}
    assert {("out", "selectivity circuit", "mix", "mix2"), ("out", "selectivity null", "mix", "mix2"),
            ("out@planted", "selectivity circuit", "mix", "mix2")} <= pairs
    with open_results(store) as results:
        table = results.metrics("out")
    chosen = table[(table.metric == "selectivity") & (table.space == "mix") & (table.of == "circuit")]
    assert len(chosen) == 3 and chosen.set_index("neuron").loc[1, "skipped"] == "constant"


def test_the_stage_skips_what_it_has_and_recomputes_when_m_changes(store, tmp_path, monkeypatch):
    path = tmp_path / "copy.h5"
    path.write_bytes(store.read_bytes())
    calls = []
    original = Ablation.batch

    def counted(self, *args, **kwargs):
        calls.append(self.layer)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Ablation, "batch", counted)
    experiment(path).selectivity()
    assert calls == []
    experiment(path, m=2).selectivity()
    # every space anew, rgb too: its 3 channels now hold a circuit of 2
    assert set(calls) == {"rgb", "mix", "mix2"}
    with h5py.File(path, "r") as f:
        attrs = f["metrics/out/selectivity/mix/kmeans"].attrs
        assert attrs["m"] == 2 and json.loads(attrs["signature"])["m"] == 2
        assert f["metrics/out/selectivity_circuits/mix/kmeans"].shape[2] == 2
        assert "metrics/out/selectivity/rgb/kmeans" in f


def test_disabled_it_does_nothing_and_bad_names_are_refused(store, tmp_path):
    path = tmp_path / "copy.h5"
    path.write_bytes(store.read_bytes())
    experiment(path, enabled=False, m=2).selectivity()
    with Store(path) as st:
        assert st.metric_attrs("out", "selectivity", "mix", "kmeans")["m"] == M        # kept as it was
    with pytest.raises(ConfigError, match=r"selectivity.spaces\[0\]: 'mixx' is not an attribution-layer space"):
        experiment(path, spaces=["mixx"]).validate()
    with pytest.raises(ConfigError, match="compare.metrics: 'selectivity circuits' is not a metric"):
        experiment(path, compare={"metrics": ["selectivity circuits"]}).validate()
    experiment(path, compare={"metrics": ["selectivity circuit", "selectivity null"]}).validate()


def test_the_guide_s_section_is_a_valid_config_with_the_defaults_but_enabled():
    from polypure.config.settings import SelectivitySection, load_config

    section = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", doc_page("how-to/selectivity.md"), flags=re.S)[0])
    config = load_config(None, [f"selectivity.{key}={json.dumps(value)}" for key, value in
                                section["selectivity"].items()])
    assert config.selectivity == SelectivitySection(enabled=True)
