"""Composites: every listed one runs, composites take parameters, and batch norms without a canonizer are named."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from polypure import Experiment
from polypure.attribution.composites import (
    COMPOSITES,
    GRADIENT_COMPOSITES,
    canonizer_advice,
    input_bounds,
    make_composite,
    times_activation,
)
from polypure.attribution.engine import INPUT, ConditionalRelevance, channel_init
from polypure.cli import main
from polypure.config.settings import load_config
from polypure.data.datasets import ArrayDataset
from polypure.errors import ConfigError
from polypure.models.factory import ExplainedModel

from .helpers import random_images

#: The demo model's normalisation: its pixel range [0, 1] becomes [-1.2, 2.8] in every channel.
DEMO_LOW, DEMO_HIGH = -1.2, 2.8
LRP_COMPOSITES = [name for name in COMPOSITES.names() if name not in GRADIENT_COMPOSITES]


def demo_config(tmp_path, composite, **relevance):
    return {
        "store": str(tmp_path / "s.h5"),
        "model": {"name": "demo_resnet", "weights": "DEFAULT"},
        "data": {"kind": "synthetic", "synthetic": {"n": 40, "size": 64, "seed": 0}, "image_size": None,
                 "num_workers": 0},
        "topk": {"layers": ["block_3"], "k": 4},
        "relevance": {"target_layer": "block_3", "neurons": [3, 7], "attribution_layers": ["block_1", "block_2"],
                      "n_refs": 4, "batch_size": 6, "composite": composite, **relevance},
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model, 40 of its images normalised as the model expects, and their dataset."""
    exp = Experiment(demo_config(tmp_path_factory.mktemp("demo"), "gradient"), progress=False)
    images = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
    return exp.model, images, exp.dataset


@pytest.mark.parametrize("name", COMPOSITES.names())
def test_every_listed_composite_runs_the_relevance_stage(tmp_path, name):
    Experiment(demo_config(tmp_path, name), progress=False).run(["topk", "relevance"])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        group = f["relevance/block_3"]
        assert group.attrs["composite"] == name
        assert group["complete"][()].all()
        for layer, channels in (("block_1", 32), ("block_2", 64)):
            values = group[layer][()]
            assert values.shape == (2, 4, channels)
            assert np.isfinite(values).all() and np.abs(values).sum(-1).min() > 0, f"{name} {layer}"
        if name == "epsilon_gamma_box":
            # the box bounds default to the data's normalised pixel range, and the store says so
            params = json.loads(group.attrs["composite_params"])
            np.testing.assert_allclose(params["low"], [DEMO_LOW] * 3, rtol=1e-6)
            np.testing.assert_allclose(params["high"], [DEMO_HIGH] * 3, rtol=1e-6)
        else:
            assert "composite_params" not in group.attrs


@pytest.mark.parametrize("name", LRP_COMPOSITES)
def test_lrp_composites_roughly_conserve_relevance(demo, name):
    """From a logit to block_3 (average pooling and the classifier) the relevance sum is kept, up to biases."""
    model, images, dataset = demo
    logit = 1
    with torch.no_grad():
        chosen = model.module(images)[:, logit].topk(6).indices
    x = images[chosen]
    composite = make_composite(name, model.canonizers, bounds=input_bounds(dataset))
    engine = ConditionalRelevance(model.module, {"logits": model.submodule("logits")},
                                  {"block_3": model.submodule("block_3")}, composite=composite,
                                  times_activation=times_activation(name))
    init = channel_init(torch.full((len(x),), logit))
    with engine:
        out = engine(x, torch.arange(len(x)), init, keep_maps=("block_3",))
    with torch.no_grad():
        start = init(model.module(x)).sum(1)
    np.testing.assert_allclose(out.maps["block_3"].flatten(1).sum(1), start, rtol=0.1, err_msg=name)


def test_box_rule_uses_its_bounds_at_the_first_layer_only(demo):
    model, images, dataset = demo
    x = images[:3]

    def maps(**params):
        composite = make_composite("epsilon_gamma_box", model.canonizers, params, bounds=input_bounds(dataset))
        engine = ConditionalRelevance(model.module, {"block_3": model.submodule("block_3")},
                                      {INPUT: model.module, "block_0": model.submodule("block_0")},
                                      composite=composite, times_activation=False)
        with engine:
            return engine(x, torch.tensor([0, 1, 2, 2]), channel_init(torch.tensor([3, 3, 3, 9])),
                          keep_maps=(INPUT, "block_0")).maps

    default, given, other = maps(), maps(low=DEMO_LOW, high=DEMO_HIGH), maps(low=-5.0, high=5.0)
    for layer in (INPUT, "block_0"):
        torch.testing.assert_close(default[layer], given[layer], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(default["block_0"], other["block_0"])
    assert not torch.allclose(default[INPUT], other[INPUT], rtol=1e-3, atol=1e-6)


def test_input_bounds_are_the_normalised_pixel_range():
    assert input_bounds(None) == (0.0, 1.0)
    assert input_bounds(ArrayDataset(np.zeros((2, 4, 4, 1), np.uint8))) == (0.0, 1.0)
    low, high = input_bounds(random_images(2, 4))
    np.testing.assert_allclose(low, [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(high, [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rtol=1e-6)


def test_crop_view_runs_the_box_rule_for_every_batch_size(tmp_path):
    """The crop view's input heatmaps go through the ZBox rule with batches of several sizes."""
    from polypure.attribution.crops import crop_heatmaps
    from polypure.pipeline.relevance_stage import plans

    exp = Experiment(demo_config(tmp_path, "gradient", neurons=[3, 7, 9], n_refs=3, batch_size=7), progress=False)
    exp.run(["topk", "relevance"])
    with exp.open_store() as store:
        plan, = plans(exp, store)
        refs = store.reference_indices("block_3")
    boxes = crop_heatmaps(exp.model, exp.dataset, plan, refs, "epsilon_gamma_box", list(exp.model.canonizers),
                          batch_size=7, device=exp.device)
    assert len(boxes) == 9 and any(box is not None for box in boxes.values())


def test_composite_parameters_come_from_the_config(tmp_path):
    cfg = load_config(None, ["relevance.composite={name: epsilon_gamma_box, low: -1, high: [1, 2, 3]}"])
    assert cfg.relevance.composite_name == "epsilon_gamma_box"
    assert cfg.relevance.composite_params == {"low": -1, "high": [1, 2, 3]}
    assert "name: epsilon_gamma_box" in cfg.to_yaml()
    plain = load_config(None, [])
    assert plain.relevance.composite == "gradient" and plain.relevance.composite_params == {}

    Experiment(demo_config(tmp_path, {"name": "epsilon_gamma_box", "low": -2.0, "high": [3.0, 3.5, 4.0]}),
               progress=False).run(["topk", "relevance"])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        group = f["relevance/block_3"]
        assert group.attrs["composite"] == "epsilon_gamma_box"
        assert json.loads(group.attrs["composite_params"]) == {"low": -2.0, "high": [3.0, 3.5, 4.0]}


@pytest.mark.parametrize("composite,message", [
    ("{name: epsilon_gamma_box, epsilon: 1e-6}",
     "relevance.composite: epsilon_gamma_box takes no parameter 'epsilon' (it takes low, high)"),
    ("{name: epsilon_plus, low: 0}", "relevance.composite: epsilon_plus takes no parameter 'low' (it takes none)"),
    ("{name: epsilon_gamma_box, low: dark}", "relevance.composite: parameter 'low' must be a number or a list"),
    ("{low: 0}", "relevance.composite: a composite with parameters needs its name"),
    ("epsilon_gama_box", "relevance.composite: unknown composite 'epsilon_gama_box'; known: "),
])
def test_bad_composite_parameters_are_one_line_config_errors(capsys, composite, message):
    code = main(["topk", "demo", "--set", f"relevance.composite={composite}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_per_channel_bound_must_fit_the_data(tmp_path):
    exp = Experiment(demo_config(tmp_path, {"name": "epsilon_gamma_box", "low": [0.0, 0.0]}), progress=False)
    with pytest.raises(ConfigError, match="relevance.composite: 'low' has 2 values but the data has 3 channels"):
        exp.run(["topk", "relevance"])


# ---------------------------------------------------------------------------------------------------
# batch norms without a canonizer


def bn_net(after_linear: bool = True) -> nn.Module:
    first = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()] if after_linear else \
        [nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU()]
    return nn.Sequential(*first, nn.Conv2d(4, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 2)).eval()


class ConcatNorm(nn.Module):
    """A batch norm after a concatenation, as in DenseNet: it follows a convolution in module order only."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(torch.cat([self.a(x), self.b(x)], 1))


def test_canonizer_advice_names_the_canonizer_or_says_none_fits():
    import torchvision

    assert "set relevance.canonizers: [merge_bn] (it merges all of them" in canonizer_advice(
        bn_net(), "epsilon_plus", [])
    assert "no registered canonizer fits this network" in canonizer_advice(bn_net(False), "epsilon_plus", [])
    sample = torch.rand(1, 3, 8, 8)
    assert "set relevance.canonizers: [merge_bn]" in canonizer_advice(bn_net(), "epsilon_plus", [], sample)
    assert "merge_bn would merge 1 of them into a layer that does not feed them" in canonizer_advice(
        ConcatNorm().eval(), "epsilon_plus", [], sample)
    assert canonizer_advice(torchvision.models.resnet18(), "epsilon_plus_flat", []).endswith(
        "set relevance.canonizers: [resnet]")
    assert canonizer_advice(bn_net(), "epsilon_plus", ["merge_bn"]) is None
    assert canonizer_advice(bn_net(), "gradient", []) is None
    assert canonizer_advice(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "epsilon_plus", []) is None


def test_an_lrp_composite_on_uncanonized_batch_norms_warns_once(tmp_path, caplog):
    import torchvision

    net = torchvision.models.mobilenet_v3_small(weights=None).eval()
    model = ExplainedModel(net, layers={"mid": "features.6", "late": "features.9", "low": "features.3"})
    relevance = {"targets": [{"layer": "mid", "neurons": [0, 1], "attribution_layers": ["low"]},
                             {"layer": "late", "neurons": [2], "attribution_layers": ["low", "mid"]}],
                 "n_refs": 2, "composite": "epsilon_plus_flat"}
    with caplog.at_level(logging.WARNING, logger="polypure"):
        Experiment(model=model, dataset=random_images(6, 32), store=tmp_path / "a.h5", progress=False,
                   topk={"layers": ["mid", "late"], "k": 2}, relevance=relevance).run(["topk", "relevance"])
    warned = [r.getMessage() for r in caplog.records if "batch norm" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "composite 'epsilon_plus_flat'" in warned[0] and "relevance.canonizers: [merge_bn]" in warned[0]



@pytest.mark.parametrize("canonizers,warned", [([], True), (["merge_bn"], False)])
def test_the_relevance_stage_warns_only_without_a_canonizer(tmp_path, caplog, canonizers, warned):
    model = ExplainedModel(bn_net(), layers={"a": "2", "b": "4"})
    with caplog.at_level(logging.WARNING, logger="polypure"):
        Experiment(model=model, dataset=random_images(6, 16), store=tmp_path / "s.h5", progress=False,
                   topk={"layers": ["b"], "k": 2},
                   relevance={"target_layer": "b", "neurons": [0, 1], "attribution_layers": ["a"], "n_refs": 2,
                              "composite": "epsilon_plus", "canonizers": canonizers}).run(["topk", "relevance"])
    assert bool([r for r in caplog.records if "batch norm" in r.getMessage()]) is warned


def test_other_composite_parameters_make_a_stored_target_stale(tmp_path):
    Experiment(demo_config(tmp_path, {"name": "epsilon_gamma_box", "low": -2.0}), progress=False).run(
        ["topk", "relevance"])
    with pytest.raises(ConfigError, match="composite_params"):
        Experiment(demo_config(tmp_path, {"name": "epsilon_gamma_box", "low": -3.0}), progress=False).run(
            ["relevance"])
    # the same parameters in another order are the same rule
    Experiment(demo_config(tmp_path, {"name": "epsilon_gamma_box", "high": [DEMO_HIGH] * 3, "low": -2.0}),
               progress=False).run(["relevance"])
