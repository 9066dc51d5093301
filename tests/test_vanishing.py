"""Relevance below the normalisation floor: counted by the relevance stage, marked degenerate, never scored."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from polypure.evaluation.metrics import FLOOR_MASS, VANISHING, below_floor, degenerate
from polypure.evaluation.summary import reasons
from polypure.experiment import Experiment
from polypure.models.factory import ExplainedModel

from .helpers import random_images


def test_below_floor_is_the_l1_mass_of_a_normalised_row_against_an_independent_division():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(5, 4, 6)) * np.array([1.0, 1e-9, 1e-11, 0.0, 1e-3])[:, None, None]
    stored = raw / (np.abs(raw).sum(-1, keepdims=True) + 1e-10)
    expected = np.abs(raw).sum(-1) < 1e-10
    np.testing.assert_array_equal(below_floor(stored), expected)
    assert FLOOR_MASS == 0.5
    # a relevance space: one such row makes the neuron vanishing, unless every row is the same (a dead neuron:
    # constant); any other space keeps its own checks
    status = degenerate(stored, normalised=True)
    assert list(status) == ["", "", VANISHING, "constant", ""]
    assert list(degenerate(stored)) == ["", "", "", "constant", ""]


def fading_net() -> nn.Module:
    """Two convolutions; the second's channel 0 sees its input through weights of 1e-13 and lives on its bias."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU()).eval()
    with torch.no_grad():
        net[2].weight[0].mul_(1e-13)
        net[2].bias[0] = 1.0
    return net


def test_the_stage_warns_once_per_target_and_the_neuron_is_not_scored(tmp_path, caplog):
    model = ExplainedModel(fading_net(), layers={"a": "1", "b": "3"})
    with caplog.at_level(logging.WARNING, logger="polypure"):
        exp = Experiment(model=model, dataset=random_images(12, 12), store=tmp_path / "s.h5", progress=False,
                         topk={"layers": ["b"], "k": 6},
                         relevance={"target_layer": "b", "neurons": [0, 1, 2], "attribution_layers": ["a"],
                                    "n_refs": 6},
                         cluster={"methods": [{"name": "kmeans", "n_clusters": 2}], "spaces": ["a"]},
                         evaluate={"references": [], "ground_truth": ["class"]})
        exp.run(["topk", "relevance", "cluster", "evaluate"])
    warned = [r.getMessage() for r in caplog.records if "normalisation floor" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "relevance b: " in warned[0] and "a [default]: 6;" in warned[0] and "their 1 neuron(s)" in warned[0]
    with exp.open_store() as store:
        stored = store.relevance("b", "a")
        assert below_floor(stored[0]).all() and not below_floor(stored[1:]).any()
        assert list(store.metric("b", "degenerate", "a")) == [VANISHING, "", ""]
        skipped = reasons(store, "b", space="a", method="kmeans", labels="class")
        assert list(skipped[VANISHING]) == [True, False, False]
