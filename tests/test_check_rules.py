"""Rule checks: standard rules pass, broken canonizers and rules are caught by name, the model is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from zennit.canonizers import Canonizer
from zennit.composites import LayerMapComposite
from zennit.core import Hook
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass, ZPlus

from polypure.attribution.composites import CANONIZERS, COMPOSITES
from polypure.attribution.relevance_plan import Rule, TargetPlan
from polypure.attribution.rule_checks import (
    CANONIZER_TOLERANCE,
    CONSERVATION_LIMIT,
    IDEAL_TOLERANCE,
    _conservation_failure,
    canonizer_change,
    check_rules,
    ideal_model,
)
from polypure.cli import main
from polypure.config.settings import config_from_dict
from polypure.errors import ConfigError
from polypure.pipeline.work_units import build_data, build_model

from .nets import tiny

DEMO = {
    "model": {"name": "demo_resnet", "weights": "DEFAULT"},
    "data": {"kind": "synthetic", "synthetic": {"n": 4, "size": 32, "seed": 0}, "image_size": None,
             "num_workers": 0},
    "device": "cpu",
    "relevance": {"target_layer": "block_3", "neurons": "2:9", "attribution_layers": ["block_1", "block_2"]},
}


class ScaleFirstConv(Canonizer):
    """A broken canonizer: applied, it scales the first convolution's weight, so the network computes another thing."""

    def apply(self, root_module):
        instance = self.copy()
        instance.register(next(m for m in root_module.modules() if isinstance(m, nn.Conv2d)))
        return [instance]

    def register(self, conv):
        self.conv, self.weight = conv, conv.weight.data
        conv.weight.data = conv.weight.data * 1.5

    def remove(self):
        self.conv.weight.data = self.weight


class ScaleRelevance(Hook):
    """A rule for convolutions that multiplies the relevance passing through by ``factor`` (NaN, 0, ...)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def backward(self, module, grad_input, grad_output):
        return tuple(None if g is None else g * self.factor for g in grad_input)

    def copy(self):
        return ScaleRelevance(self.factor)


def scaling_composite(factor: float):
    """A composite factory, as the registry holds them, whose convolutions scale relevance by ``factor``."""
    return lambda canonizers=None: LayerMapComposite([(nn.Conv2d, ScaleRelevance(factor))], canonizers=canonizers)


@pytest.fixture
def broken_rules(monkeypatch):
    """The test's broken canonizer and rules, registered by name for the test only."""
    monkeypatch.setitem(CANONIZERS._entries, "scale_first_conv", ScaleFirstConv)
    monkeypatch.setitem(COMPOSITES._entries, "nan_rule", scaling_composite(float("nan")))
    monkeypatch.setitem(COMPOSITES._entries, "zero_rule", scaling_composite(0.0))


@pytest.fixture(scope="module")
def demo():
    """The demo model, its first four images and a target of two block_3 neurons."""
    config = config_from_dict(DEMO)
    model = build_model(config)
    dataset = build_data(config, model)
    images = torch.stack([dataset[i][0] for i in range(4)])
    return model, images, TargetPlan("block_3", "block_3", torch.tensor([3, 7]).numpy(), ["block_1", "block_2"])


def state(model: nn.Module) -> dict:
    """Everything a check could leave behind: parameters, buffers, hooks, overridden attributes, grad flags."""
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": [p.requires_grad for p in model.parameters()],
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                         + len(m._backward_pre_hooks) for m in model.modules()),
            "attributes": {name: sorted(k for k in vars(m) if not k.startswith("_") and k != "training")
                           for name, m in model.named_modules()}}


def assert_same_state(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    assert before["grad"] == after["grad"] and before["hooks"] == after["hooks"] == 0
    assert before["attributes"] == after["attributes"]


def test_standard_rules_pass_on_the_demo_model(demo):
    model, images, plan = demo
    variants = [("grad", Rule("gradient", (), True)), ("lrp", Rule("epsilon_plus_flat", ("resnet",), False))]
    report = check_rules(model, images, variants, [plan])
    assert report.passed, report.failures
    rows = {(c.variant, c.layer): c for c in report.checks}
    assert list(rows) == [(v, layer) for v in ("grad", "lrp") for layer in ("output", "block_3", "block_1", "block_2")]
    # the gradient has no canonizer and conserves nothing; LRP with the ResNet canonizer does both
    assert all(rows["grad", layer].canonizer_rel is None and rows["grad", layer].conservation_median is None
               for layer in ("output", "block_1", "block_2"))
    for layer in ("output", "block_3", "block_1", "block_2"):
        assert 0 < rows["lrp", layer].canonizer_rel < CANONIZER_TOLERANCE
    for layer in ("block_1", "block_2"):
        assert 0 < rows["lrp", layer].conservation_median <= CONSERVATION_LIMIT
        assert rows["lrp", layer].zero == 0 and rows["lrp", layer].non_finite == 0
    assert rows["lrp", "block_3"].rows == 8 and 0 <= rows["lrp", "block_3"].silent < 1
    table = report.table().splitlines()
    assert table[0].split()[:3] == ["variant", "target", "layer"] and len(table) == 9
    assert all(line.split()[-1] == "ok" for line in table[1:])


def test_a_broken_canonizer_is_caught_and_the_model_left_unchanged(demo, broken_rules):
    model, images, plan = demo
    before = state(model.module)
    report = check_rules(model, images, [("scaled", Rule("gradient", ("resnet", "scale_first_conv"), True))], [plan])
    assert_same_state(before, state(model.module))
    assert not report.passed
    named = [line.split(":")[0] for line in report.failures]
    assert named == ["variant 'scaled', layer 'output'"] + [
        f"variant 'scaled', layer '{layer}'" for layer in ("block_3", "block_1", "block_2")]
    assert "canonizers resnet, scale_first_conv change its output by" in report.failures[0]
    # both canonizers change the first convolution; undone last-first (composites.LastFirst), nothing is left over


def test_canonizers_that_change_the_same_module_are_undone_last_first(demo):
    """``resnet`` and ``merge_bn`` both merge the first batch norm; undone last-first, the model is restored."""
    model, images, plan = demo
    before = state(model.module)
    report = check_rules(model, images, [("twice", Rule("epsilon_plus_flat", ("resnet", "merge_bn"), False))], [plan])
    assert_same_state(before, state(model.module))
    assert not any("undoing" in failure for failure in report.failures)


def test_canonizers_are_removed_when_applying_one_fails(demo, broken_rules):
    model, images, _ = demo
    before = state(model.module)
    with pytest.raises(ConfigError, match="unknown canonizer 'nonexistent'"):
        canonizer_change(model.module, ["resnet", "scale_first_conv", "nonexistent"], images, {})
    assert_same_state(before, state(model.module))


def test_a_composite_that_produces_nan_is_caught(demo, broken_rules):
    model, images, plan = demo
    before = state(model.module)
    report = check_rules(model, images, [("nan", Rule("nan_rule", ("resnet",), False))], [plan])
    assert_same_state(before, state(model.module))
    rows = {c.layer: c for c in report.checks}
    assert rows["block_1"].non_finite == 1 and rows["block_2"].non_finite == 1
    assert report.failures == [f"variant 'nan', target 'block_3', layer '{layer}': non-finite relevance in 8 of 8 "
                               "rows" for layer in ("block_1", "block_2")]


def test_relevance_created_without_the_resnet_canonizer_is_caught(demo):
    """Residual sums left to the plain gradient double relevance each, and it grows layer by layer."""
    model, images, plan = demo
    report = check_rules(model, images, [("bare", Rule("epsilon_plus_flat", (), False))], [plan])
    rows = {c.layer: c for c in report.checks}
    assert rows["block_1"].conservation_median > rows["block_2"].conservation_median > CONSERVATION_LIMIT
    # block_3 -> block_2 crosses one residual addition, whose two summands each get all the relevance
    assert rows["block_2"].conservation_median == pytest.approx(2.0, rel=1e-4)
    assert [f.split(":")[0] for f in report.failures] == [
        f"variant 'bare', target 'block_3', layer '{layer}'" for layer in ("block_1", "block_2")]
    assert "times the target's relevance (at most 1.75): relevance is created" in report.failures[0]


def test_all_zero_relevance_fails_but_a_silent_neuron_does_not(broken_rules):
    model = tiny()
    with torch.no_grad():
        model.module.conv3.bias[0] = -1e4  # channel 0 of c3 never fires
    images = torch.rand(3, 3, 16, 16)
    plans = [TargetPlan("dead", "c3", torch.tensor([0]).numpy(), ["c1", "c2"]),
             TargetPlan("alive", "logits", torch.tensor([0, 1, 2, 3]).numpy(), ["c2"])]
    report = check_rules(model, images, [("grad", Rule()), ("zero", Rule("zero_rule", (), False))], plans)
    rows = {(c.variant, c.target, c.layer): c for c in report.checks}
    # the dead neuron's rows are all silent: nothing to hold against the rule
    assert rows["grad", "dead", "c3"].silent == 1 and rows["grad", "dead", "c1"].zero is None
    assert report.failures == ["variant 'zero', target 'alive', layer 'c2': all-zero relevance in 100% of the rows "
                               "whose neuron fired (at most 50%)"]


class ScaledEpsilon(Epsilon):
    """The epsilon rule with its result multiplied by ``factor``: -1 flips the relevance, 1e-30 makes it vanish."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def backward(self, module, grad_input, grad_output):
        return tuple(None if g is None else g * self.factor for g in super().backward(module, grad_input, grad_output))

    def copy(self):
        return ScaledEpsilon(self.factor)


@pytest.mark.parametrize("factor,verdict", [(-1.0, "relevance flips sign"), (1e-30, "relevance vanishes")])
def test_flipped_or_vanishing_relevance_fails_naming_the_layer(demo, monkeypatch, factor, verdict):
    """epsilon_plus whose classifier rule scales its relevance: below the logits the sum has the wrong sign or is gone."""
    model, images, _ = demo
    monkeypatch.setitem(COMPOSITES._entries, "scaled", lambda canonizers=None: LayerMapComposite(
        [(nn.Linear, ScaledEpsilon(factor)), (nn.Conv2d, ZPlus()), (Sum, Norm()), (nn.ReLU, Pass()),
         (nn.AdaptiveAvgPool2d, Norm())], canonizers=canonizers))
    plan = TargetPlan("logits", "logits", torch.tensor([0, 1, 2]).numpy(), ["block_3"])
    report = check_rules(model, images, [("scaled", Rule("scaled", ("resnet",), False))], [plan])
    row = next(c for c in report.checks if c.layer == "block_3")
    assert (row.conservation_median < 0) if factor < 0 else (abs(row.conservation_median) < 1e-20)
    assert report.failures == [f"variant 'scaled', target 'logits', layer 'block_3': the median row has "
                               f"{row.conservation_median:.3g} times the target's relevance"
                               + (" (at least 0.001 in size): " if factor > 0 else ": ") + verdict]
    assert row.passed is False and "FAIL" in report.table().splitlines()[-1]


def test_ideal_mode_zeroes_biases_and_shifts_on_a_copy(demo):
    model, _, _ = demo
    ideal = ideal_model(model)
    assert ideal.layers == model.layers and ideal.module is not model.module
    norms = [m for m in ideal.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.running_mean.any() and not m.bias.any() for m in norms)
    assert all(not m.bias.any() for m in ideal.module.modules() if isinstance(m, nn.Linear))
    # the model itself keeps its shifts
    assert any(m.running_mean.any() for m in model.module.modules() if isinstance(m, nn.BatchNorm2d))


def test_ideal_mode_conserves_exactly_with_the_right_canonizer_and_names_a_gap_without(demo):
    """Without biases each residual addition left to the gradient doubles the relevance: 2 at block_2, 4 at block_1."""
    model, images, plan = demo
    before = state(model.module)
    variants = [("resnet", Rule("epsilon_plus", ("resnet",), False)), ("bn", Rule("epsilon_plus", ("merge_bn",), False))]
    report = check_rules(model, images, variants, [plan], ideal=True)
    assert_same_state(before, state(model.module))
    rows = {(c.variant, c.layer): c for c in report.checks}
    for layer in ("block_1", "block_2"):
        assert abs(rows["resnet", layer].conservation_median - 1) < IDEAL_TOLERANCE
    assert abs(rows["bn", "block_2"].conservation_median - 2) < 0.05
    assert abs(rows["bn", "block_1"].conservation_median - 4) < 0.1
    assert [f.split(":")[0] for f in report.failures] == [
        f"variant 'bn', target 'block_3', layer '{layer}'" for layer in ("block_1", "block_2")]
    assert report.failures[1].endswith("times the target's relevance (at most 1.75): relevance is created")
    # a ratio within the limit that an exact rule would not give is a gap only in ideal mode
    assert _conservation_failure(1.3, CONSERVATION_LIMIT, ideal=False) is None
    assert _conservation_failure(1.3, CONSERVATION_LIMIT, ideal=True).endswith(
        "but without biases and normalisation shifts the rule conserves it (within 0.01 of 1): a canonizer gap "
        "between this layer and the target")


def write_config(tmp_path, **relevance) -> str:
    config = {**DEMO, "relevance": {**DEMO["relevance"], **relevance}}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_prints_the_table_and_exits_0(tmp_path, capsys):
    assert main(["check-rules", write_config(tmp_path, composite="epsilon_plus_flat"), "--samples", "2",
                 "--neurons", "1", "-q"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("variant  target   layer") and len(lines) == 5 and err == ""
    assert lines[1].split()[:3] == ["default", "-", "output"]


def test_cli_checks_every_variant_of_a_config(tmp_path, capsys):
    variants = [{"id": "gxa", "composite": "gradient"}, {"id": "lrp", "composite": "epsilon_plus_flat"}]
    assert main(["check-rules", write_config(tmp_path, variants=variants), "--samples", "2", "--neurons", "1",
                 "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["gxa"] * 4 + ["lrp"] * 4
    # the LRP variant is checked for conservation, the gradient one is not
    assert [line.split()[5] for line in lines if line.split()[2] == "block_2"] == ["-", lines[7].split()[5]]
    assert lines[7].split()[5] != "-"


def test_cli_names_each_failure_on_one_line_and_exits_1(tmp_path, capsys, broken_rules):
    config = write_config(tmp_path, composite="epsilon_plus_flat", canonizers=["resnet", "scale_first_conv"])
    assert main(["check-rules", config, "--samples", "2", "--neurons", "1", "-q"]) == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out
    lines = err.splitlines()
    assert lines[0].startswith("polypure: error: variant 'default', layer 'output': canonizers resnet, "
                               "scale_first_conv change its output by")
    assert all(line.startswith("polypure: error: variant 'default'") for line in lines) and len(lines) >= 4


def test_cli_ideal_mode_fails_on_a_canonizer_gap(tmp_path, capsys):
    config = write_config(tmp_path, composite="epsilon_plus", canonizers=["merge_bn"])
    assert main(["check-rules", config, "--samples", "2", "--neurons", "1", "-q", "--ideal"]) == 1
    err = capsys.readouterr().err
    assert "a canonizer gap between this layer and the target" in err or "relevance is created" in err
    assert main(["check-rules", write_config(tmp_path, composite="epsilon_plus"), "--samples", "2", "--neurons",
                 "1", "-q", "--ideal"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--set", "relevance.composite=epsilon_gama_box"], "relevance.composite: unknown composite 'epsilon_gama_box'"),
    (["--samples", "0"], "--samples: must be at least 1, not 0"),
    (["--set", "relevance.neurons=[999]"], "relevance.neurons: neuron 999 out of range"),
])
def test_cli_config_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(["check-rules", write_config(tmp_path), "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polypure: config error: ") and message in err and err.count("\n") == 1


def test_an_experiment_checks_its_rules_on_an_in_memory_model():
    from polypure import Experiment

    from .helpers import random_images

    exp = Experiment(model=tiny(seed=1), dataset=random_images(6, 32, seed=2), store="unused.h5", progress=False,
                     relevance={"targets": [{"layer": "c3", "neurons": "0:3", "attribution_layers": ["c1", "c2"]}],
                                "variants": [{"id": "gxa", "composite": "gradient"},
                                             {"id": "lrp", "composite": "epsilon_plus"}]})
    report = exp.check_rules(samples=3, neurons=2)
    rows = {(c.variant, c.layer) for c in report.checks}
    assert {("gxa", "c1"), ("lrp", "c1"), ("lrp", "c2")} <= rows
    lrp = next(c for c in report.checks if (c.variant, c.layer) == ("lrp", "c2"))
    assert lrp.conservation_median is not None and np.isfinite(lrp.conservation_median)
    assert "lrp" in report.table() and not (exp.config.store_path).exists()       # nothing is written


def test_alpha_beta_ratios_are_shown_not_judged_in_ideal_mode(demo):
    """alpha2-beta1 creates relevance without biases wherever a neuron has no negative contribution, by design."""
    model, images, plan = demo
    variants = [("ab", Rule("epsilon_alpha2_beta1", ("resnet",), False))]
    ideal = check_rules(model, images, variants, [plan], ideal=True)
    measured = [c for c in ideal.checks if c.conservation_median is not None]
    assert measured and all(c.verdict == "shown" and not c.judged for c in measured)
    assert "\nshown: ab (alpha-beta) conserve only where" in ideal.table()
    real = check_rules(model, images, variants, [plan])
    assert all(c.judged and c.verdict in ("ok", "FAIL") for c in real.checks)
    assert "shown" not in real.table()
