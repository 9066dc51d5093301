"""Composites: every listed one runs, composites take parameters, canonizers are chosen and their gaps named."""

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
    automatic_canonizers,
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
    ("{name: epsilon_gamma_box, beta: 1}",
     "relevance.composite: epsilon_gamma_box takes no parameter 'beta' (it takes low, high, epsilon, gamma, "
     "stabilizer, zero_params)"),
    ("{name: epsilon_plus, low: 0}",
     "relevance.composite: epsilon_plus takes no parameter 'low' (it takes epsilon, stabilizer, zero_params)"),
    ("{name: epsilon_plus, layer_map: []}", "relevance.composite: epsilon_plus takes no parameter 'layer_map'"),
    ("{name: deconvnet, epsilon: 0.1}", "relevance.composite: deconvnet takes no parameter 'epsilon' (it takes none)"),
    ("{name: epsilon_plus, epsilon: small}", "relevance.composite: parameter 'epsilon' must be a number"),
    ("{name: epsilon_plus, zero_params: 3}", "relevance.composite: parameter 'zero_params' must be a parameter name"),
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
# canonizers chosen by module type, and what they leave to the plain gradient


def bn_net() -> nn.Module:
    """Convolution, batch norm with statistics of its own (not the identity a fresh one is), ReLU, ..."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(0.2)
        net[1].running_var.fill_(2.0)
    return net


def gn_net() -> nn.Module:
    """A group norm between two convolutions: no canonizer merges it and zennit gives it no rule."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()


class ConcatNorm(nn.Module):
    """A batch norm after a concatenation, as in DenseNet: it follows a convolution in module order only."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(4)
        self.norm.running_var.fill_(3.0)
        self.eval()

    def forward(self, x):
        return self.norm(torch.cat([self.a(x), self.b(x)], 1))


class Misordered(nn.Module):
    """A batch norm registered after ``b`` but fed by ``a``: a merge by module order puts it in the wrong layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.norm.running_var.fill_(3.0)
        self.eval()

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_canonizer_advice_names_each_gap_with_its_module_path_and_type():
    import torchvision

    from .nets import tiny

    sample = torch.rand(1, 3, 16, 16)
    advice = canonizer_advice(gn_net(), "epsilon_plus", [], sample)
    assert advice.startswith("composite 'epsilon_plus' with no canonizer leaves 1 operation(s) to the plain gradient")
    assert "normalisation in 1 (GroupNorm)" in advice
    assert canonizer_advice(gn_net(), "gradient", [], sample) is None
    # zennit >= 0.5 passes relevance through a batch norm it finds unmerged, so no batch norm is a gap, not even
    # one after a concatenation, which no canonizer can merge (and which batch_norm leaves as it is)
    assert canonizer_advice(bn_net(), "epsilon_plus", [], sample) is None
    assert canonizer_advice(ConcatNorm(), "epsilon_plus", ["batch_norm"], sample) is None
    assert "residual addition in (the model) (TinyNet)" in canonizer_advice(tiny(bypass=True).module, "epsilon_plus",
                                                                             [], sample)
    resnet = torchvision.models.resnet18().eval()
    assert "residual addition in layer1.0 (BasicBlock), layer1.1 (BasicBlock), layer2.0 (BasicBlock) and 5 more" in \
        canonizer_advice(resnet, "epsilon_plus_flat", [], sample)
    assert canonizer_advice(resnet, "epsilon_plus_flat", ["resnet"], sample) is None


def test_canonizers_that_change_the_output_are_named_first():
    advice = canonizer_advice(Misordered(), "epsilon_plus", ["batch_norm"], torch.rand(1, 3, 8, 8))
    assert "the canonizers change the model's output by" in advice and "(at most 0.001)" in advice


def test_lrp_composites_get_the_canonizers_of_the_module_types_found():
    import torchvision

    small = torchvision.models.mobilenet_v3_small()
    assert automatic_canonizers(small, "epsilon_plus") == ["mbconv", "se_gate", "batch_norm"]
    # guided backprop carries a gradient: the gate canonizer would cut it
    assert automatic_canonizers(small, "guided_backprop") == ["mbconv", "batch_norm"]
    assert automatic_canonizers(small, "gradient") == []
    assert automatic_canonizers(torchvision.models.resnet18(), "epsilon_plus") == ["resnet"]
    assert automatic_canonizers(torchvision.models.regnet_y_400mf(), "epsilon_plus") == [
        "regnet", "se_gate", "batch_norm"]
    # a model that names its canonizers keeps them
    assert automatic_canonizers(ExplainedModel(small, canonizers=["merge_bn"]), "epsilon_plus") == ["merge_bn"]
    assert automatic_canonizers(ExplainedModel(bn_net()), "epsilon_plus") == ["batch_norm"]


def test_an_lrp_composite_with_gaps_warns_once_naming_them(tmp_path, caplog):
    from .nets import tiny

    model = tiny(bypass=True)
    relevance = {"targets": [{"layer": "c3", "neurons": [0, 1], "attribution_layers": ["c1"]},
                             {"layer": "logits", "neurons": [2], "attribution_layers": ["c1", "c2"]}],
                 "n_refs": 2, "composite": "epsilon_plus_flat"}
    with caplog.at_level(logging.WARNING, logger="polypure"):
        Experiment(model=model, dataset=random_images(6, 16), store=tmp_path / "a.h5", progress=False,
                   topk={"layers": ["c3", "logits"], "k": 2}, relevance=relevance).run(["topk", "relevance"])
    warned = [r.getMessage() for r in caplog.records if "plain gradient" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "composite 'epsilon_plus_flat' with no canonizer" in warned[0]
    assert "residual addition in (the model) (TinyNet)" in warned[0]


@pytest.mark.parametrize("canonizers,stored", [([], ["batch_norm"]), (["se_gate"], ["se_gate"])])
def test_the_relevance_stage_picks_canonizers_and_warns_about_what_is_left(tmp_path, caplog, canonizers, stored):
    net = bn_net()
    net[1] = nn.Sequential(net[1], nn.GroupNorm(2, 4))  # a batch norm to merge, and a group norm no canonizer can
    model = ExplainedModel(net, layers={"a": "2", "b": "4"})
    with caplog.at_level(logging.WARNING, logger="polypure"):
        Experiment(model=model, dataset=random_images(6, 16), store=tmp_path / "s.h5", progress=False,
                   topk={"layers": ["b"], "k": 2},
                   relevance={"target_layer": "b", "neurons": [0, 1], "attribution_layers": ["a"], "n_refs": 2,
                              "composite": "epsilon_plus", "canonizers": canonizers}).run(["topk", "relevance"])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert list(f["relevance/b"].attrs["canonizers"]) == stored
    messages = [r.getMessage() for r in caplog.records if "plain gradient" in r.getMessage()]
    assert len(messages) == 1 and "normalisation in 1.1 (GroupNorm)" in messages[0], messages


def test_list_canonizers_shows_the_families_each_covers(capsys):
    assert main(["list", "canonizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("canonizers: ") and "mbconv" in lines[0] and "densenet" in lines[0]
    described = {line.split()[0]: line for line in lines[1:]}
    assert "EfficientNet" in described["mbconv"] and "MobileNetV2" in described["mbconv"]
    assert "DenseNet-121" in described["densenet"] and "SqueezeExcitation" in described["se_gate"]
    assert "zennit" in described["merge_bn"]


def test_other_composite_parameters_make_a_stored_target_stale(tmp_path):
    Experiment(demo_config(tmp_path, {"name": "epsilon_gamma_box", "low": -2.0}), progress=False).run(
        ["topk", "relevance"])
    with pytest.raises(ConfigError, match="composite_params"):
        Experiment(demo_config(tmp_path, {"name": "epsilon_gamma_box", "low": -3.0}), progress=False).run(
            ["relevance"])
    # the same parameters in another order are the same rule
    Experiment(demo_config(tmp_path, {"name": "epsilon_gamma_box", "high": [DEMO_HIGH] * 3, "low": -2.0}),
               progress=False).run(["relevance"])
