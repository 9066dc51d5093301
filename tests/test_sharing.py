"""Shared forward passes: an image forwarded once serves every row that explains it, with the same float32 numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from polypure.attribution.engine import INPUT, ConditionalRelevance, channel_init
from polypure.attribution.planted import VirtualNeurons
from polypure.attribution.relevance_plan import Rule, TargetPlan, compute_target, plan_unit
from polypure.attribution.sharing import plan_batches
from polypure.models.factory import ExplainedModel, attach_layers

from .helpers import random_images
from .nets import small_vit, tiny


def _check_plan(samples, batches, size):
    served = np.concatenate([b.rows for b in batches])
    assert sorted(served.tolist()) == list(range(len(samples)))            # every row exactly once
    for batch in batches:
        assert len(batch.forward) == size                                   # every pass has the unshared size
        images = batch.samples[batch.forward[batch.forward_rows]]
        np.testing.assert_array_equal(images, samples[batch.rows])          # a row's forward row is its image
        pairs = batch.forward_rows * (batch.slots_count + 1) + batch.slots
        assert len(np.unique(pairs)) == len(pairs)                          # one row per (forward row, slot)


@pytest.mark.parametrize("seed", range(6))
def test_plans_serve_every_row_once_from_passes_of_the_unshared_size(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 40))
    samples = rng.integers(0, int(rng.integers(1, 60)), size * int(rng.integers(1, 8)))
    batches = plan_batches(samples, size, backward_cost=float(rng.uniform(0.5, 4)))
    _check_plan(samples, batches, size)


def test_a_plan_shares_images_used_by_many_rows():
    samples = np.repeat(np.arange(10), 8)                                   # 10 images, 8 rows each
    batches = plan_batches(samples, size=10, backward_cost=1.0)
    _check_plan(samples, batches, 10)
    assert sum(len(b.forward) for b in batches) < len(samples) / 2
    lone, = plan_batches(np.zeros(4, np.int64), size=4, backward_cost=1.0)
    assert lone.samples.tolist() == [0, 0]                                  # a lone image runs as two below


def test_rows_that_share_no_image_get_the_passes_without_sharing():
    samples = np.arange(60)
    batches = plan_unit(samples, [3, 3, 3], n_refs=6, batch_size=20, backward_cost=1.25)
    unshared_passes = plan_unit(samples, [3, 3, 3], n_refs=6, batch_size=20, backward_cost=1.25, share=False)
    assert [b.rows.tolist() for b in batches] == [b.rows.tolist() for b in unshared_passes]
    assert all(b.slots_count == 1 for b in batches)


def test_a_convolution_row_depends_on_the_pass_size_only():
    # what sharing rests on: with the pass size fixed, neither the order nor the content of the other rows
    # changes a row's gradient (the size can: oneDNN splits its sums among threads by it)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(13, 16, 16, 16)
    grad = torch.randn(13, 32, 8, 8)

    def grad_input(g):
        return torch.nn.grad.conv2d_input(x.shape, conv.weight, g, stride=2, padding=1)

    reference = grad_input(grad)
    order = torch.randperm(13)
    assert torch.equal(grad_input(grad[order]), reference[order])
    other = grad.clone()
    other[1:] = torch.randn(12, 32, 8, 8)
    other[5:] = 0
    assert torch.equal(grad_input(other)[0], reference[0])
    # forward passes below the lowest attribution layer run on as many images as a pass has: from two up,
    # a row's output does not depend on their number
    with torch.no_grad():
        assert torch.equal(conv(x[:2]), conv(x)[:2])


# -- shared passes equal unshared ones, bit for bit ------------------------------------------------------------

def _resnet18() -> ExplainedModel:
    torch.manual_seed(0)
    return attach_layers(ExplainedModel(torchvision.models.resnet18(num_classes=10).eval()))


def _refs(neurons: int, n_refs: int, pool: int, seed: int = 0) -> np.ndarray:
    """Every neuron's references drawn from a small pool of images, so that neurons share most of them."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(pool, n_refs, replace=False) for _ in range(neurons)])


def _run(model, rule, plan, dataset, refs, batch, share_passes):
    out = {}

    def write(rows, arrays):
        for name, value in arrays.items():
            out.setdefault(name, np.full((len(plan.neurons), *value.shape[1:]), np.nan, np.float32))[rows] = value

    with rule.engine(model, plan) as engine:
        stats = compute_target(dataset, plan, refs, np.arange(len(plan.neurons)), engine, write, batch_size=batch,
                               share_passes=share_passes)
    return out, stats


CASES = {
    "tiny gradient": (lambda: tiny(), Rule(), "c3", ["c1", "c2"], False, 12),
    "tiny gradient, a pass size that splits neurons": (lambda: tiny(), Rule(), "c3", ["c1", "c2"], False, 4),
    "tiny gradient with a branch bypassing the layers": (lambda: tiny(bypass=True), Rule(), "c3", ["c1", "c2"],
                                                         False, 12),
    "tiny planted neurons": (lambda: tiny(), Rule(), "c3", ["c1", "c2"], True, 12),
    "resnet18 gradient": (_resnet18, Rule(), "block_3", ["block_1", "block_2"], False, 12),
    "resnet18 epsilon_plus with the resnet canonizer": (_resnet18, Rule("epsilon_plus", ("resnet",), False),
                                                        "block_3", ["block_1", "block_2"], False, 12),
    "resnet18 planted neurons under epsilon_plus": (_resnet18, Rule("epsilon_plus", ("resnet",), False), "block_3",
                                                    ["block_1", "block_2"], True, 12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shared_forward_passes_give_the_relevance_of_unshared_ones_bit_for_bit(case):
    build, rule, layer, layers, planted, batch = CASES[case]
    model = build()
    dataset = random_images(10, 32, seed=1)
    neurons = 7                                           # the last chunk is a smaller pass
    if planted:
        virtual = VirtualNeurons.build(np.array([[0, 1], [2, 5], [3, 4]]), np.array([[1.0, 2.0], [0.5, 1.5],
                                                                                     [2.0, 1.0]], np.float32),
                                       ["sum", "max"])
        plan = TargetPlan(f"{layer}@planted", layer, np.arange(len(virtual)), layers, virtual)
        neurons = len(virtual)
    else:
        plan = TargetPlan(layer, layer, np.array([0, 3, 1, 7, 2, 5, 6][:neurons]), layers)
    refs = _refs(neurons, 6, pool=10)
    alone, plain = _run(model, rule, plan, dataset, refs, batch, share_passes=0)
    shared, stats = _run(model, rule, plan, dataset, refs, batch, share_passes=64)
    assert plain.forward_rows == plain.pairs == stats.pairs == neurons * 6
    assert stats.shared > 0.2, stats                      # the forward passes were shared
    assert set(shared) == set(alone) == {*layers, "activation"}
    for name, value in alone.items():
        assert not np.isnan(value).any()
        np.testing.assert_array_equal(shared[name], value, err_msg=f"{case}: {name}")


def test_attnlrp_shared_forward_passes_equal_unshared_ones_bit_for_bit():
    pytest.importorskip("lxt.efficient", reason="lxt (the polypure[lxt] extra) is not installed")
    model = attach_layers(ExplainedModel(small_vit(seed=2)))
    rule = Rule("attnlrp", (), True)
    plan = TargetPlan("block_2", "block_2", np.arange(0, 24, 2), ["block_0", "mlp_1"])
    dataset = random_images(8, 32, seed=2)
    refs = _refs(12, 4, pool=8, seed=3)
    alone, _ = _run(model, rule, plan, dataset, refs, 8, share_passes=0)
    shared, stats = _run(model, rule, plan, dataset, refs, 8, share_passes=64)
    assert stats.shared > 0.2, stats
    for name, value in alone.items():
        np.testing.assert_array_equal(shared[name], value, err_msg=name)


@pytest.mark.parametrize("lowest", ["c1", INPUT])
def test_explain_with_slots_equals_one_pass_per_row_and_refuses_two_rows_in_one_slot(lowest):
    model = tiny()
    engine = ConditionalRelevance(model.module, {"c3": model.submodule("c3")},
                                  {lowest: model.submodule("c1"), "c2": model.submodule("c2")})
    images = torch.stack([random_images(3, 16, seed=4)[i][0] for i in range(3)])
    neurons = torch.tensor([0, 5, 5, 9, 2, 0])
    with engine:
        # six rows from forward rows [0, 1, 2, 0] (images 0, 1, 2, 0): three rows on forward row 0
        forward = torch.tensor([0, 1, 2, 0])
        rows, slots = torch.tensor([0, 0, 1, 2, 0, 3]), torch.tensor([0, 1, 0, 0, 2, 0])
        out = engine.explain(images, forward, rows, slots, channel_init(neurons))
        image_rows = forward[rows]
        for j in range(len(rows)):
            # the same pass size, the row alone in it
            one = engine.explain(images, forward, rows[j:j + 1], torch.zeros(1, dtype=torch.int64),
                                 channel_init(neurons[j:j + 1]))
            for name in (lowest, "c2"):
                assert torch.equal(out.relevance[name][j], one.relevance[name][0]), (j, name)
        per_row = engine(images, image_rows, channel_init(neurons))
        torch.testing.assert_close(out.relevance["c2"], per_row.relevance["c2"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.activation, per_row.activation, rtol=1e-6, atol=0)
        with pytest.raises(ValueError, match="share a forward row and a backward pass"):
            engine.explain(images, forward, torch.tensor([0, 0]), torch.tensor([1, 1]), channel_init(neurons[:2]))
