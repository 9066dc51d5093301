"""Canonizers by module type: each restores the model exactly, keeps its function, and makes LRP conserve.

The zoo test runs 18 torchvision and timm architectures with random weights and batch norms whose
statistics are calibrated on random images and then perturbed. On a copy without biases and normalisation
shifts (check-rules' ideal mode) epsilon_plus must conserve relevance at every stage output once the
automatically chosen canonizers are applied, and must fail without them (except on DenseNet, which has no
residual addition or gate and whose batch norms zennit >= 0.5 passes relevance through); with biases no stage
may create relevance. The unit tests below it pin down the single rewrites.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn
from zennit.layer import Sum
from zennit.rules import Pass

from polypure.attribution.canonizers import (
    CANONIZER_TOLERANCE,
    RULE_TAG,
    ConvNeXtCanonizer,
    DenseNetCanonizer,
    GateCanonizer,
    choose_canonizers,
)
from polypure.attribution.composites import make_composite
from polypure.attribution.relevance_plan import Rule, TargetPlan
from polypure.attribution.rule_checks import IDEAL_TOLERANCE, check_rules
from polypure.models.factory import ExplainedModel


def randomise(module: nn.Module, size: int, seed: int = 0, channels: int = 3) -> nn.Module:
    """Random batch-norm affine parameters and layer scales; statistics calibrated on random images, then perturbed.

    Calibrating keeps activations near unit scale through the depth of the network (with arbitrary statistics
    they shrink to 1e-12 or grow to 1e4, and the epsilon rule's stabiliser, not the canonizers, decides);
    the perturbation makes every norm shift and scale.
    """
    generator = torch.Generator().manual_seed(seed)
    module.eval()
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(norm.num_features, generator=generator) * 0.2)
            norm.train()
            norm.momentum = 1.0
        for m in module.modules():
            # ConvNeXt's layer scales start at 1e-6, which would hide every block behind its shortcut
            scale = getattr(m, "layer_scale", None) if type(m).__name__ == "CNBlock" else getattr(m, "gamma", None)
            if isinstance(scale, nn.Parameter):
                scale.uniform_(0.2, 1.0, generator=generator)
        module(torch.randn(4, channels, size, size, generator=generator))
        for norm in norms:
            norm.eval()
            std = (norm.running_var + norm.eps).sqrt()
            norm.running_mean.add_(torch.randn(norm.num_features, generator=generator) * 0.1 * std)
            norm.running_var.mul_(torch.rand(norm.num_features, generator=generator) * 0.45 + 0.8)
    return module


def prefixed(prefix: str, count: int, start: int = 0) -> list[str]:
    return [f"{prefix}{i}" for i in range(start, start + count)]


# name: (builder, input size, stage outputs from the lowest to the target, canonizers expected)
ZOO: dict[str, tuple[Callable[[], nn.Module], int, list[str], list[str]]] = {
    "tv_efficientnet_b0": (torchvision.models.efficientnet_b0, 64, prefixed("features.", 8, 1),
                           ["mbconv", "se_gate", "batch_norm"]),
    "tv_efficientnet_v2_s": (torchvision.models.efficientnet_v2_s, 96, prefixed("features.", 7, 1),
                             ["mbconv", "se_gate", "batch_norm"]),
    "tv_mobilenet_v2": (torchvision.models.mobilenet_v2, 64, prefixed("features.", 18, 1), ["mbconv", "batch_norm"]),
    "tv_mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, 96, prefixed("features.", 12, 1),
                              ["mbconv", "se_gate", "batch_norm"]),
    "tv_densenet121": (torchvision.models.densenet121, 64,
                       [f"features.{part}{i}" for i in range(1, 4) for part in ("denseblock", "transition")]
                       + ["features.denseblock4", "features.norm5"], ["densenet"]),
    # ConvNeXt at 128 px: at 96 its last stage is 3 x 3 and a few of the 7 x 7 depthwise convolutions' outputs
    # have no positive contribution, which z+ cannot pass on (1% of the relevance, either sign)
    "tv_convnext_tiny": (torchvision.models.convnext_tiny, 128, prefixed("features.", 7, 1), ["convnext"]),
    "tv_regnet_x_400mf": (torchvision.models.regnet_x_400mf, 64, prefixed("trunk_output.block", 4, 1),
                          ["regnet", "batch_norm"]),
    "tv_regnet_y_400mf": (torchvision.models.regnet_y_400mf, 64, prefixed("trunk_output.block", 4, 1),
                          ["regnet", "se_gate", "batch_norm"]),
    "tv_resnext50_32x4d": (torchvision.models.resnext50_32x4d, 64, prefixed("layer", 4, 1), ["resnet"]),
    "tv_wide_resnet50_2": (torchvision.models.wide_resnet50_2, 64, prefixed("layer", 4, 1), ["resnet"]),
    "tv_resnet18": (torchvision.models.resnet18, 64, prefixed("layer", 4, 1), ["resnet"]),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), 96, prefixed("blocks.", 7),
                             ["mbconv", "se_gate", "batch_norm"]),
    "timm_efficientnet_lite0": (lambda: timm.create_model("efficientnet_lite0"), 64, prefixed("blocks.", 7),
                                ["mbconv", "batch_norm"]),
    "timm_efficientnet_es": (lambda: timm.create_model("efficientnet_es"), 64, prefixed("blocks.", 6),
                             ["mbconv", "batch_norm"]),
    "timm_resnet26": (lambda: timm.create_model("resnet26"), 64, prefixed("layer", 4, 1), ["resnet"]),
    "timm_resnet50d": (lambda: timm.create_model("resnet50d"), 64, prefixed("layer", 4, 1), ["resnet"]),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto"), 128, prefixed("stages.", 4), ["convnext"]),
    "timm_convnext_atto_linear": (lambda: timm.create_model("convnext_atto", conv_mlp=False), 128,
                                  prefixed("stages.", 4), ["convnext"]),
}

#: Architectures whose uncanonized ideal copy conserves under zennit >= 0.5 (no residual additions, no gates).
BARE_CONSERVES = {"tv_densenet121"}

#: zennit's batch-norm merge (in ``resnet``, kept for bit-equal relevance with zennit-crp) leaves every merged
#: norm computing x / sqrt(1 + eps); through 50 layers of a random ResNeXt, Wide ResNet or ResNet-50-D that
#: moves stage outputs by up to 2.5e-3 of their largest value, where polypure's own merge stays below 1e-4.
ZENNIT_MERGE_TOLERANCE = 3e-3


def snapshot(module: nn.Module) -> dict:
    """Everything a canonizer may touch: tensors (by value and object), instance attributes, children, hooks."""
    return {"tensors": {k: (v, v.detach().clone()) for k, v in module.state_dict(keep_vars=True).items()},
            "attributes": {name: sorted(vars(m)) for name, m in module.named_modules()},
            "children": {name: list(m._modules.items()) for name, m in module.named_modules()},
            "forwards": [m.forward.__func__ for m in module.modules()]}


def assert_restored(before: dict, after: dict) -> None:
    assert before["attributes"] == after["attributes"] and before["children"] == after["children"]
    assert before["forwards"] == after["forwards"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, (tensor, value) in before["tensors"].items():
        now, _ = after["tensors"][key]
        assert now is tensor and torch.equal(now, value), key


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_model(request):
    build, size, stages, expected = ZOO[request.param]
    torch.manual_seed(0)
    module = randomise(build(), size)
    layers = {f"s{i}": path for i, path in enumerate(stages)}
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return request.param, ExplainedModel(module, layers=layers), images, expected


@pytest.mark.slow
def test_zoo_canonizers_restore_exactly_keep_the_function_and_make_lrp_conserve(zoo_model):
    name, model, images, expected = zoo_model
    module = model.module
    canonizers = choose_canonizers(module)
    assert canonizers == expected

    # applied and removed through a composite as the engine does: the model is restored bit for bit
    before = snapshot(module)
    stages = list(model.layers)
    target = model.submodule(stages[-1])
    outputs = []
    handle = target.register_forward_hook(lambda m, args, out: outputs.append(out))
    with torch.no_grad():
        reference = module(images)
    handle.remove()
    # the target neuron: the channel that fires most on these images, so that neither row is silent
    neuron = int(outputs[0].clamp(min=0).flatten(2).sum((0, 2)).argmax())
    composite = make_composite("epsilon_plus", canonizers)
    composite.register(module)
    composite.remove()
    assert_restored(before, snapshot(module))
    with torch.no_grad():
        assert torch.equal(module(images), reference)

    plan = TargetPlan(stages[-1], stages[-1], torch.tensor([neuron]).numpy(), stages[:-1])
    canonized = [("canonized", Rule("epsilon_plus", tuple(canonizers), False))]
    ideal = check_rules(model, images, canonized + [("bare", Rule("epsilon_plus", (), False))], [plan], ideal=True)
    medians = {(c.variant, c.layer): c.conservation_median for c in ideal.checks
               if c.conservation_median is not None}
    for stage in stages[:-1]:
        assert abs(medians["canonized", stage] - 1) <= IDEAL_TOLERANCE, (name, stage, medians["canonized", stage])
    assert not [f for f in ideal.failures if "'canonized'" in f], ideal.failures
    if name in BARE_CONSERVES:
        # zennit >= 0.5 passes relevance through an unmerged batch norm, so without residual additions or gates
        # nothing is left to the plain gradient and the uncanonized copy conserves too; what the DenseNet
        # canonizer must get right is which norms merge (a norm after a concatenation merged into a layer that
        # does not feed it changes the output, test_canonizers_that_change_the_output_are_named_first)
        assert not [f for f in ideal.failures if "'bare'" in f], ideal.failures
    else:
        # without canonizers the same check fails: the test can tell
        assert [f for f in ideal.failures if "'bare'" in f], medians

    # with biases and shifts they absorb relevance, but no stage may create any; the canonizers change no
    # stage output and not the model's by more than the tolerance
    tolerance = ZENNIT_MERGE_TOLERANCE if "resnet" in canonizers else CANONIZER_TOLERANCE
    real = check_rules(model, images, canonized, [plan], conservation=1.05, canonizer_tolerance=tolerance)
    assert real.passed, real.failures
    changes = {c.layer: c.canonizer_rel for c in real.checks}
    assert changes.keys() == {"output", *stages} and all(0 <= change <= tolerance for change in changes.values())
    assert_restored(before, snapshot(module))


# ---------------------------------------------------------------------------------------------------
# single rewrites


def test_a_gate_passes_all_relevance_to_the_signal_and_none_to_the_gate():
    se = torchvision.ops.SqueezeExcitation(8, 2).eval()
    x = torch.rand(2, 8, 5, 5, requires_grad=True)
    composite = make_composite("epsilon_plus", ["se_gate"])
    composite.register(se)
    try:
        assert getattr(se, RULE_TAG) == "pass"
        out = se(x)
        relevance = torch.rand_like(out)
        grad, = torch.autograd.grad(out, x, relevance)
    finally:
        composite.remove()
    torch.testing.assert_close(grad, relevance, rtol=0, atol=0)
    assert not hasattr(se, RULE_TAG) and "forward" not in vars(se)


def test_a_gate_computes_as_before():
    se = timm.models._efficientnet_blocks.SqueezeExcite(8, rd_ratio=0.5).eval()
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        reference = se(x)
        rewrites = GateCanonizer().apply(se)
        assert torch.equal(se(x), reference)
    for rewrite in rewrites:
        rewrite.remove()


def test_densenet_norms_after_concatenations_pass_relevance_and_the_others_merge():
    torch.manual_seed(0)
    net = randomise(torchvision.models.densenet121(), 32)
    layer = net.features.denseblock1.denselayer2
    composite = make_composite("epsilon_plus")
    rewrites = DenseNetCanonizer().apply(net)
    try:
        # norm1 follows the concatenation of the earlier layers: it computes as before and passes relevance on
        assert "forward" not in vars(layer.norm1) and isinstance(composite.module_map({}, "n", layer.norm1), Pass)
        for norm in (net.features.transition1.norm, net.features.norm5):
            assert isinstance(composite.module_map({}, "n", norm), Pass)
        # norm2 follows conv1 alone and merges into it; so does the stem's norm0 into conv0
        assert "forward" in vars(layer.norm2) and "forward" in vars(net.features.norm0)
        x = torch.randn(2, layer.norm2.num_features, 3, 3)
        assert torch.equal(layer.norm2(x), x)
    finally:
        for rewrite in rewrites:
            rewrite.remove()
    assert not hasattr(layer.norm1, RULE_TAG) and "forward" not in vars(layer.norm2)


def test_convnext_layer_scale_is_folded_into_the_last_linear_layer():
    torch.manual_seed(0)
    block = torchvision.models.convnext.CNBlock(16, layer_scale=0.5, stochastic_depth_prob=0.0).eval()
    linear = block.block[5]
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        reference = block(x)
        rewrites = ConvNeXtCanonizer().apply(block)
        torch.testing.assert_close(linear.weight, weight * 0.5)
        assert isinstance(block.canonizer_sum, Sum)
        torch.testing.assert_close(block(x), reference, rtol=1e-6, atol=1e-6)
    for rewrite in rewrites:
        rewrite.remove()
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)


def test_lrp_composites_pass_relevance_through_layer_norms_and_timm_activations():
    composite = make_composite("epsilon_plus")
    for module in (nn.LayerNorm(4), timm.layers.LayerNorm2d(4), timm.layers.activations.GELU(), nn.SiLU()):
        assert isinstance(composite.module_map({}, "m", module), Pass), type(module).__name__
    # the plain gradient stays plain
    assert make_composite("gradient").module_map({}, "m", nn.LayerNorm(4)) is None


def test_batch_norm_canonizer_merges_timm_norm_act_into_the_convolution():
    block = timm.models._efficientnet_blocks.InvertedResidual(8, 8, exp_ratio=2.0).eval()
    torch.manual_seed(0)
    randomise(block, 6, channels=8)
    x = torch.randn(2, 8, 6, 6)
    composite = make_composite("epsilon_plus", choose_canonizers(block))
    with torch.no_grad():
        reference = block(x)
        composite.register(block)
        try:
            assert "forward" in vars(block.bn1) and isinstance(block.canonizer_sum, Sum)
            torch.testing.assert_close(block(x), reference, rtol=1e-5, atol=1e-5)
        finally:
            composite.remove()
