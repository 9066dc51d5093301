"""The relevance engine against independent computations.

crp on a model with a bypass branch, and plain autograd for planted virtual neurons.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from zennit.core import Composite

from polypure import Experiment
from polypure.attribution.engine import ConditionalRelevance, channel_init

from .helpers import random_images
from .nets import tiny


@pytest.mark.parametrize("bypass", [False, True])
def test_engine_matches_crp_with_and_without_a_bypass(bypass):
    model = tiny(seed=6, bypass=bypass)
    dataset = random_images(5, 20, seed=2)
    images = torch.stack([dataset[i][0] for i in range(5)])
    rows = torch.tensor([0, 1, 1, 4, 2, 0])
    neurons = torch.tensor([3, 3, 7, 7, 11, 11])
    engine = ConditionalRelevance(model.module, {"c3": model.submodule("c3")},
                                  {"c1": model.submodule("c1"), "c2": model.submodule("c2")})
    with engine:
        out = engine(images, rows, channel_init(neurons))
    # a shortcut from the input bypasses c1: one row per image below it would be wrong, so no sharing
    assert engine.share_forward is (not bypass)

    attribution = CondAttribution(model.module)
    for j, (r, k) in enumerate(zip(rows.tolist(), neurons.tolist())):
        x = images[r:r + 1].clone().requires_grad_(True)
        attr = attribution(x, [{"act3": [k]}], Composite(), record_layer=["act1", "act2"], start_layer="act3",
                           init_rel=lambda a: a.clamp(min=0))
        for alias, name in (("c1", "act1"), ("c2", "act2")):
            expected = ChannelConcept().attribute(attr.relevances[name] * attr.activations[name], abs_norm=True)[0]
            torch.testing.assert_close(out.relevance[alias][j], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.activation[j], attr.activations["act3"][0].clamp(min=0).mean((1, 2)))


def test_attribution_layer_above_target_is_refused():
    from polypure.errors import ConfigError
    model = tiny()
    engine = ConditionalRelevance(model.module, {"c2": model.submodule("c2")}, {"c3": model.submodule("c3")})
    with engine, pytest.raises(ConfigError, match="run after the target layer 'c2'"):
        engine(random_images(1, 16)[0][0].unsqueeze(0), torch.tensor([0]), channel_init(torch.tensor([0])))


def brute_force_planted(model, image, a, b, sa, sb, mode, layers):
    """Relevance of a virtual neuron by plain autograd through its explicit formula."""
    outs = {}
    hooks = [model.submodule(n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o))
             for n in [*layers, "c3"]]
    with torch.enable_grad():
        model.module(image.unsqueeze(0).requires_grad_(True))
        target = outs["c3"][0]
        va, vb = target[a] / sa, target[b] / sb
        v = va + vb if mode == "sum" else torch.maximum(va, vb)
        grads = torch.autograd.grad(v, [outs[n] for n in layers], v.detach().clamp(min=0))
    for h in hooks:
        h.remove()
    result = {}
    for name, grad in zip(layers, grads):
        r = (grad * outs[name]).sum((2, 3))[0]
        result[name] = (r / (r.abs().sum() + 1e-10)).detach().numpy()
    truth = int((vb.detach().max() > va.detach().max()).item())
    stat = v.detach().max().item()
    return result, truth, stat


def test_planted_relevance_truth_and_topk_by_brute_force(tmp_path):
    model, dataset = tiny(seed=8), random_images(16, 24, seed=9)
    store = tmp_path / "p.h5"
    Experiment(model=model, dataset=dataset, store=store, progress=False,
               topk={"layers": ["c3"], "k": 4},
               relevance={"target_layer": "c3", "neurons": [0], "attribution_layers": ["c1", "c2"], "n_refs": 4,
                          "planted": {"pairs": 2, "layer": "c3", "mode": ["sum", "max"], "seed": 0,
                                      "max_overlap": 1.0}}).run(["topk", "relevance"])
    with h5py.File(store, "r") as f:
        pairs, scales = f["planted/c3/pairs"][()], f["planted/c3/scales"][()]
        modes = list(f["planted/c3/modes"].asstr()[()])
        truth = f["planted/c3/truth"][()]
        refs, values = f["topk/c3@planted/indices"][()], f["topk/c3@planted/values"][()]
        rel = {n: f[f"relevance/c3@planted/{n}"][()] for n in ("c1", "c2")}
        base_values = f["topk/c3/values"][()]
        assert f["relevance/c3@planted/neurons"][()].tolist() == [0, 1, 2, 3]
    assert modes == ["sum", "sum", "max", "max"]
    np.testing.assert_allclose(scales, base_values[pairs].mean(-1), rtol=1e-6)
    for v in range(4):
        (a, b), (sa, sb) = pairs[v % 2], scales[v % 2]
        stats = [brute_force_planted(model, dataset[i][0], a, b, sa, sb, modes[v], ["c1", "c2"])[2]
                 for i in range(len(dataset))]
        expected_refs = np.lexsort((np.arange(len(stats)), -np.array(stats)))[:4]
        np.testing.assert_array_equal(refs[v], expected_refs)
        np.testing.assert_allclose(values[v], np.array(stats)[expected_refs], rtol=1e-5)
        for r, sample in enumerate(refs[v]):
            expected, expected_truth, _ = brute_force_planted(model, dataset[int(sample)][0], a, b, sa, sb,
                                                              modes[v], ["c1", "c2"])
            assert truth[v, r] == expected_truth
            for name in ("c1", "c2"):
                np.testing.assert_allclose(rel[name][v, r], expected[name], atol=1e-5, rtol=0)
