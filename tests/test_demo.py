"""The embedded demo: the shipped model, planted ground truth, and the table built from the store."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn

from polypure import Experiment
from polypure.cli import main
from polypure.data.datasets import ArrayDataset
from polypure.data.synthetic import class_of_shape, render
from polypure.models.demo_resnet import evaluate_accuracy, load_card, train_demo
from polypure.models.factory import ExplainedModel, create_model


def test_shipped_demo_model_is_accurate_on_new_images():
    model = create_model("demo_resnet", "DEFAULT")
    images, factors = render(1000, seed=424242)
    accuracy = evaluate_accuracy(model.module, images, class_of_shape()[factors["shape"]])
    assert accuracy >= 0.9
    card = load_card()
    assert card["held_out"]["accuracy"] >= 0.9
    assert model.layers["block_3"] == "layer4" and model.layers["logits"] == "fc"


def test_card_accuracy_is_what_the_shipped_weights_score():
    card = load_card()
    images, factors = render(card["held_out"]["images"], seed=card["held_out"]["seed"])
    accuracy = evaluate_accuracy(create_model("demo_resnet", "DEFAULT").module, images,
                                 class_of_shape()[factors["shape"]])
    assert accuracy == pytest.approx(card["held_out"]["accuracy"], abs=1e-4)


def test_training_is_deterministic(tmp_path):
    cards = [train_demo(tmp_path / str(i), epochs=1, per_epoch=256, held_out=64, progress=False) for i in range(2)]
    assert cards[0]["accuracy_per_epoch"] == cards[1]["accuracy_per_epoch"]
    assert (tmp_path / "0" / "demo_resnet.safetensors").read_bytes() == \
        (tmp_path / "1" / "demo_resnet.safetensors").read_bytes()


def two_part_model():
    """Channel 0 sees red, channel 1 sees blue: their top-K sets are disjoint."""
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        net[0].bias.zero_()
        net[1].weight.copy_(torch.tensor([[1.0, 0, -1], [-1, 0, 1]]).view(2, 3, 1, 1))
        net[1].bias.zero_()
    return ExplainedModel(net.eval(), layers={"pre": "0", "parts": "2"})


def red_and_blue(n=40, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    strength = rng.integers(60, 255, n)
    images[: n // 2, 2:6, 2:6, 0] = strength[: n // 2, None, None]
    images[n // 2:, 2:6, 2:6, 2] = strength[n // 2:, None, None]
    return ArrayDataset(images)


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_planted_neuron_of_disjoint_channels_splits_perfectly_on_its_parts(tmp_path, mode):
    store = tmp_path / "p.h5"
    exp = Experiment(model=two_part_model(), dataset=red_and_blue(), store=store, progress=False,
                     topk={"layers": ["parts"], "k": 10},
                     relevance={"target_layer": "parts", "attribution_layers": ["pre"], "n_refs": 10,
                                "planted": {"pairs": 1, "layer": "parts", "mode": mode}},
                     cluster={"spaces": ["activation"]}, evaluate={"ground_truth": ["planted"]})
    exp.run(["topk", "relevance", "cluster", "evaluate"])
    with h5py.File(store, "r") as f:
        refs = f["topk/parts@planted/indices"][0]
        truth = f["planted/parts/truth"][0]
        top_a, top_b = f["topk/parts/indices"][()]
        assert not set(top_a) & set(top_b)
        assert 0 < truth.sum() < len(truth)                       # the references really mix both parts
        np.testing.assert_array_equal(truth, (refs >= 20).astype(int))   # blue images are part b
        assert f["metrics/parts@planted/ari/planted/activation/kmeans"][0] == 1.0


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    store = tmp_path_factory.mktemp("demo") / "demo.h5"
    # the stages the table comes from; the report of the demo is drawn by the README's main job and tested on
    # its own store (test_report.py)
    code = main(["run", "demo", "-q", "--stages", "topk,relevance,cluster,evaluate", "--set", f"store={store}",
                 "data.synthetic.n=300", "topk.k=12", "relevance.n_refs=12", "relevance.planted.pairs=3"])
    assert code == 0
    return store


def test_demo_table_comes_from_the_stored_clusters_and_factors(small_demo, tmp_path):
    from polypure.evaluation import summary
    from polypure.store.hdf5_store import Store

    with h5py.File(small_demo, "r") as f:
        shape = f["samples/factors/shape"][()]
        refs = f["topk/logits/indices"][:, :12]
        clusters = f["clusters/logits/block_2/kmeans"][()]
        stored = f["metrics/logits/ari/shape/block_2/kmeans"][()]
    # references of one shape, or one cluster, give no score (NaN), not a 0
    split = [len(set(shape[r])) > 1 and len(set(c)) > 1 for r, c in zip(refs, clusters)]
    expected = [adjusted_rand_score(shape[r], c) if ok else np.nan for r, c, ok in zip(refs, clusters, split)]
    np.testing.assert_allclose(stored, expected)
    with h5py.File(small_demo, "r") as f:
        nmi = f["metrics/logits/nmi/shape/block_2/kmeans"][()]
    np.testing.assert_allclose(nmi, [normalized_mutual_info_score(shape[r], c) if ok else np.nan
                                     for r, c, ok in zip(refs, clusters, split)])

    def table_value():
        with Store(small_demo, "r") as store:
            rows = summary.read(store)
        return next(r["mean"] for r in rows if r["group"] == "logits" and r["space"] == "block_2"
                    and r["metric"] == "ARI shape")

    before = table_value()
    assert before == pytest.approx(np.nanmean(expected))
    # relabel the stored clusters by shape itself: the table must follow the store
    with h5py.File(small_demo, "a") as f:
        f["clusters/logits/block_2/kmeans"][...] = shape[refs]
    assert main(["evaluate", "demo", "-q", "--set", f"store={small_demo}", "data.synthetic.n=300", "topk.k=12",
                 "relevance.n_refs=12", "relevance.planted.pairs=3"]) == 0
    assert table_value() == pytest.approx(1.0)
    assert before != pytest.approx(1.0)
    assert small_demo.with_suffix(".metrics.csv").read_text().count("ARI shape") > 0
