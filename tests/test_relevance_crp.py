"""Must-show 1: every stored relevance vector equals zennit-crp's CondAttribution procedure."""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch
import torchvision
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from zennit.composites import EpsilonPlusFlat
from zennit.core import Composite
from zennit.torchvision import ResNetCanonizer

from polypure import Experiment

from .helpers import random_images

LAYERS = {"block_0": "layer1", "block_1": "layer2", "block_2": "layer3"}
NEURONS = [3, 17, 100, 511]


def crp_vectors(model, images, neuron, composite, multiply):
    """The conditional relevance of docs/method.md computed with crp: one CondAttribution call per neuron, all lower layers recorded."""
    attribution = CondAttribution(model)
    x = images.clone().requires_grad_(True)
    attr = attribution(x, [{"layer4": [neuron]}], composite, record_layer=list(LAYERS.values()),
                       start_layer="layer4", init_rel=lambda a: a.clamp(min=0))
    out = {}
    for alias, name in LAYERS.items():
        rel = attr.relevances[name] * attr.activations[name] if multiply else attr.relevances[name]
        out[alias] = ChannelConcept().attribute(rel, abs_norm=True)
    out["activation"] = attr.activations["layer4"].clamp(min=0).mean((2, 3))
    return out


@pytest.fixture(scope="module")
def resnet34():
    torch.manual_seed(0)
    return torchvision.models.resnet34().eval()


@pytest.mark.parametrize("composite,canonizers,multiply", [
    ("gradient", [], "auto"),
    ("epsilon_plus_flat", ["resnet"], "auto"),
    ("epsilon_plus_flat", ["resnet"], True),
])
def test_relevance_equals_crp(tmp_path, resnet34, composite, canonizers, multiply):
    # 64 px keeps every stage's map at least 2 x 2 (layer4 of a ResNet-34 is 2 x 2), so pooling stays real
    dataset = random_images(10, 64, seed=1)
    store = tmp_path / "crp.h5"
    exp = Experiment(model=copy.deepcopy(resnet34), dataset=dataset, store=store, progress=False,
                     topk={"k": 5}, relevance={"neurons": NEURONS, "n_refs": 5, "composite": composite,
                                              "canonizers": canonizers, "times_activation": multiply,
                                              "batch_size": 7})
    exp.run(["topk", "relevance"])

    with h5py.File(store, "r") as f:
        group = f["relevance/block_3"]
        assert group["complete"][()].all()
        assert list(group["neurons"][()]) == NEURONS
        refs = f["topk/block_3/indices"][()]
        stored = {name: group[name][()] for name in [*LAYERS, "activation"]}

    lrp = composite != "gradient"
    product = (not lrp) or multiply is True
    reference = copy.deepcopy(resnet34)
    for row, neuron in enumerate(NEURONS):
        images = torch.stack([dataset[int(i)][0] for i in refs[neuron, :5]])
        comp = EpsilonPlusFlat(canonizers=[ResNetCanonizer()]) if lrp else Composite()
        expected = crp_vectors(reference, images, neuron, comp, product)
        for name, value in expected.items():
            np.testing.assert_allclose(stored[name][row], value.numpy(), atol=1e-5, rtol=0,
                                       err_msg=f"{composite} {name} neuron {neuron}")
        # the vectors are not trivially zero, so the comparison means something
        assert np.abs(stored["block_2"][row]).sum() > 0.5


def test_lrp_relevance_is_not_gradient_times_activation(tmp_path, resnet34):
    """Under LRP the recorded signal already is relevance; auto mode must not multiply it again."""
    dataset = random_images(6, 64, seed=2)
    runs = {}
    for multiply in ("auto", True):
        store = tmp_path / f"lrp_{multiply}.h5"
        Experiment(model=copy.deepcopy(resnet34), dataset=dataset, store=store, progress=False,
                   topk={"k": 3}, relevance={"neurons": [5], "n_refs": 3, "composite": "epsilon_plus",
                                            "canonizers": ["resnet"], "times_activation": multiply}).run(
            ["topk", "relevance"])
        with h5py.File(store, "r") as f:
            runs[multiply] = f["relevance/block_3/block_2"][()]
            assert f["relevance/block_3"].attrs["times_activation"] == (multiply is True)
    assert not np.allclose(runs["auto"], runs[True], atol=1e-3)
