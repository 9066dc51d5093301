"""Unit tests of polypure.attribution.hooks: recording, rewriting and stopping a forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polypure.attribution.hooks import StopForward, forward_to, probe_layers, tap_layers
from polypure.errors import PolypureError


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)
        self.ran = []

    def forward(self, x):
        self.ran.append("a")
        x = self.a(x)
        self.ran.append("b")
        x = self.b(x)
        self.ran.append("c")
        return self.c(x)


class Shared(nn.Module):
    """One ReLU used twice: its output cannot be told apart per call."""

    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(3, 3), nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(self.act(x)))


def test_records_outputs_and_stops_after_the_last_requested_layer():
    torch.manual_seed(0)
    net = Chain()
    x = torch.randn(2, 3)
    with torch.no_grad(), tap_layers({"first": net.a, "second": net.b}) as out:
        forward_to(net, x, out)
    assert net.ran == ["a", "b"]          # layer c never ran
    with torch.no_grad():
        torch.testing.assert_close(out["first"], net.a(x))
        torch.testing.assert_close(out["second"], net.b(net.a(x)))


def test_without_stop_the_whole_forward_runs_and_hooks_are_removed():
    net = Chain()
    with tap_layers({"first": net.a}, stop=False) as out:
        net(torch.randn(1, 3))
        assert "first" in out
    assert net.ran == ["a", "b", "c"]
    assert not net.a._forward_hooks        # the context removed its hook


def test_a_transform_replaces_the_output_downstream():
    net = Chain()
    x = torch.randn(2, 3)
    with torch.no_grad(), tap_layers({"first": net.a, "second": net.b}, {"first": torch.zeros_like}) as out:
        forward_to(net, x, out)
    assert torch.equal(out["first"], torch.zeros(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(out["second"], net.b(torch.zeros(2, 4)))


def test_two_names_for_one_module_share_one_hook():
    net = Chain()
    with tap_layers({"x": net.b, "y": net.b}) as out:
        assert len(net.b._forward_hooks) == 1
        forward_to(net, torch.randn(1, 3), out)
        assert torch.equal(out["x"], out["y"])


def test_a_module_that_runs_twice_is_refused():
    net = Shared()
    with pytest.raises(PolypureError, match="runs more than once per forward pass"):
        probe_layers(net, {"act": net.act}, torch.randn(1, 3))


def test_probe_gives_shapes_and_forward_order():
    net = Chain()
    shapes, order = probe_layers(net, {"late": net.c, "early": net.a}, torch.randn(1, 3))
    assert shapes == {"late": (2,), "early": (4,)}
    assert order == ["early", "late"]


def test_probe_names_a_layer_that_does_not_run():
    net = Chain()
    with pytest.raises(PolypureError, match="did not run"):
        probe_layers(net, {"stray": nn.Linear(1, 1)}, torch.randn(1, 3))


def test_stop_forward_outside_forward_to_propagates():
    net = Chain()
    with tap_layers({"first": net.a}) as out, pytest.raises(StopForward):
        net(torch.randn(1, 3))
    assert "first" in out
