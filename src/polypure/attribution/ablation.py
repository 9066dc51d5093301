"""A neuron's activation with sets of channels of a lower layer zeroed, many sets per forward pass.

:class:`Ablation` runs a neuron's references through the network with, for each of A *keep masks* over the
C channels of layer ``L``, the masked channels of ``L``'s output set to zero (at every position) for the
rest of the forward pass, which stops at the target layer. Every image is forwarded once below ``L``
where every path to the target runs through ``L`` (:func:`polypure.attribution.hooks.passes_through`);
above it each (mask, image) pair gets a row of its own, the masks stacked in one batch of at most
``batch_size`` rows (always whole masks).

What the neuron's activation is comes from the caller (:func:`channel_activation` for a real channel,
:func:`planted_activation` for a planted virtual neuron): a function of the target layer's channels-first
output, one value per row. Used by the selectivity stage (:mod:`polypure.pipeline.selectivity_stage`,
docs/method.md, Causal selectivity).

Example
-------
>>> import torch
>>> from torch import nn
>>> from polypure.attribution.ablation import Ablation, channel_activation
>>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
>>> ablate = Ablation(net, "relu", net[1], net[2])
>>> keep = torch.tensor([[True] * 4, [False, True, True, True]])
>>> ablate(torch.rand(5, 3, 8, 8), keep, channel_activation(0, "max")).shape
(2, 5)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from polypure.attribution.hooks import forward_to, passes_through, tap_layers
from polypure.attribution.planted import VirtualNeurons
from polypure.attribution.precision import flags
from polypure.attribution.topk import channel_statistic
from polypure.errors import PolypureError

_TARGET = "\0target"


def channel_activation(channel: int, statistic: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A real neuron's activation: its top-K statistic (:func:`~polypure.attribution.topk.channel_statistic`), clamped at 0."""
    def activation(output: torch.Tensor) -> torch.Tensor:
        return channel_statistic(output[:, channel:channel + 1], statistic)[:, 0].clamp(min=0)
    return activation


def planted_activation(virtual: VirtualNeurons, neuron: int, statistic: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A planted virtual neuron's activation: the statistic of its definition (sum or max of the scaled pair), clamped at 0."""
    one = VirtualNeurons(virtual.pairs[[neuron]], virtual.scales[[neuron]], [virtual.modes[neuron]])

    def activation(output: torch.Tensor) -> torch.Tensor:
        return one.scored(output, statistic)[0][:, 0].clamp(min=0)
    return activation


class Ablation:
    """The activation of one neuron under stacked channel ablations at one layer.

    Parameters
    ----------
    model : Module
        The network (in eval mode; nothing in it is changed).
    layer : str
        The ablated layer's name.
    module : Module
        Its module.
    target : Module
        The target layer's module: the forward pass stops once it has run.
    device : torch.device or str
        Where the model computes (in float32, TF32 off on CUDA).
    batch_size : int
        (mask, image) rows per forward pass at the most; a pass holds at least one whole mask.
    """

    def __init__(self, model: nn.Module, layer: str, module: nn.Module, target: nn.Module,
                 device: torch.device | str = "cpu", batch_size: int = 512):
        self.model = model
        self.layer = layer
        self.module = module
        self.target = target
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        # decided on the first call, with its first image: whether the rows above the layer may share the forward
        self.share: bool | None = None

    def __call__(self, images: torch.Tensor, keep: torch.Tensor | np.ndarray,
                 activation: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """The neuron's activation on every image under every keep mask.

        Parameters
        ----------
        images : Tensor, shape (U, ...)
            Model inputs.
        keep : Tensor or ndarray of bool, shape (A, C)
            Per mask, the channels of the layer left as they are (False: zeroed). A mask of all True gives
            the neuron's own activation.
        activation : callable
            ``activation(target_output) -> (rows,)``, for the channels-first output of the target layer.

        Returns
        -------
        ndarray, shape (A, U), float64
        """
        images = images.to(self.device)
        keep = torch.as_tensor(np.asarray(keep, bool), device=self.device)
        count, n = len(keep), len(images)
        if self.share is None:
            self.share = passes_through(self.model, self.module, self.target, images[:1])
        per_pass = max(1, self.batch_size // max(1, n))
        out = []
        # no autograd at all (inference mode is a third faster than no_grad on a CPU); float32, TF32 off
        with torch.inference_mode(), flags(self.device, "fp32"):
            for start in range(0, count, per_pass):
                out.append(self._pass(images, keep[start:start + per_pass], activation))
        return torch.cat(out).view(count, n).double().cpu().numpy()

    def _pass(self, images: torch.Tensor, keep: torch.Tensor, activation) -> torch.Tensor:
        """One forward pass: rows mask-major, ``len(keep) * len(images)`` of them."""
        n = len(images)
        image_rows = torch.arange(n, device=self.device).repeat(len(keep))
        mask_rows = torch.arange(len(keep), device=self.device).repeat_interleave(n)

        def zeroed(output: torch.Tensor) -> torch.Tensor:
            if output.shape[1] != keep.shape[1]:
                raise PolypureError(f"layer {self.layer!r} has {output.shape[1]} channels, the masks {keep.shape[1]}")
            rows = output[image_rows] if self.share else output
            mask = keep[mask_rows].to(rows.dtype).view(len(rows), -1, *([1] * (rows.ndim - 2)))
            return rows * mask

        x = images if self.share else images[image_rows]
        with tap_layers({self.layer: self.module, _TARGET: self.target}, transforms={self.layer: zeroed}) as outputs:
            forward_to(self.model, x, outputs)
            if _TARGET not in outputs:
                raise PolypureError(f"the target layer did not run in the forward pass ablating {self.layer!r}")
            values = activation(outputs[_TARGET])
        return values.float()
