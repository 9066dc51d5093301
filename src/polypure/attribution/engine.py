"""Conditional relevance of lower layers to target neurons, many (neuron, image) pairs per backward pass.

For target channel k of layer L and a lower layer l (docs/method.md, Conditional relevance)::

    R_i^l = sum over positions of  A_i^l * G_i^l,   G^l = VJP of A^L w.r.t. A^l with max(A_k^L, 0) on channel k

then ``R / (sum_i |R_i| + 1e-10)``. This is zennit-crp's ``CondAttribution`` with ``start_layer=L`` and
``init_rel=lambda a: a.clamp(min=0)``, but

* every attribution layer is recorded by one backward pass (crp's users ran one per layer),
* the backward stops at the lowest attribution layer instead of running down to the input,
* each image is forwarded once up to the lowest attribution layer, however many neurons use it as a
  reference,
* above it, :meth:`ConditionalRelevance.explain` forwards rows that several (neuron, image) pairs share and runs
  one backward pass per *slot* over that graph (the rows to share are planned by
  :mod:`polypure.attribution.sharing`); :meth:`ConditionalRelevance.__call__` gives every pair a row of its own,
* the forward stops at the target layer.

Example
-------
>>> import torch, torchvision
>>> from polypure.attribution.engine import ConditionalRelevance, channel_init
>>> net = torchvision.models.resnet18().eval()
>>> engine = ConditionalRelevance(net, {"layer4": net.layer4}, {"layer2": net.layer2, "layer3": net.layer3})
>>> images = torch.randn(2, 3, 64, 64)
>>> rows, neurons = torch.tensor([0, 1, 1]), torch.tensor([5, 5, 9])
>>> with engine:
...     out = engine(images, rows, channel_init(neurons))
>>> out.relevance["layer3"].shape
torch.Size([3, 256])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from polypure.attribution.hooks import forward_to, passes_through, probe_layers, tap_layers
from polypure.attribution.precision import autocast, flags
from polypure.attribution.precision import check as check_precision
from polypure.errors import ConfigError, PolypureError

#: Name of the model input, usable as an attribution layer (input-level heatmaps).
INPUT = "input"
_TARGET = "\0target"


def normalize_l1(relevance: torch.Tensor) -> torch.Tensor:
    """Sum a relevance map over positions and divide by its L1 norm over channels (plus 1e-10).

    This is zennit-crp's ``ChannelConcept().attribute(R, abs_norm=True)``.
    """
    per_channel = relevance.flatten(2).sum(-1) if relevance.ndim > 2 else relevance
    return per_channel / (per_channel.abs().sum(-1, keepdim=True) + 1e-10)


def spatial_mean(activation: torch.Tensor) -> torch.Tensor:
    """The activation baseline: clamped at 0 and averaged over positions, one value per channel."""
    clamped = activation.clamp(min=0)
    return clamped.flatten(2).mean(-1) if clamped.ndim > 2 else clamped


def channel_init(neurons: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Initial relevance of real neurons: row j gets ``max(A[j, neurons[j]], 0)`` on that channel only."""
    def init(target: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(target), device=target.device)
        channels = neurons.to(target.device)
        grad = torch.zeros_like(target)
        grad[rows, channels] = target[rows, channels].clamp(min=0)
        return grad
    return init


@dataclass
class RelevanceBatch:
    """The result for P (neuron, image) rows.

    Attributes
    ----------
    relevance : dict of str to Tensor
        Per attribution layer, (P, C_layer) L1-normalised relevance vectors.
    activation : Tensor
        (P, C_target) activation baseline.
    maps : dict of str to Tensor
        Unreduced relevance maps, only for layers asked for in ``keep_maps``.
    """

    relevance: dict[str, torch.Tensor]
    activation: torch.Tensor
    maps: dict[str, torch.Tensor]


class ConditionalRelevance:
    """Computes conditional relevance for batches of (neuron, image) rows.

    Parameters
    ----------
    model : Module
        The network (its parameters are frozen while the engine is entered).
    target : dict of str to Module
        One entry: the target layer's name and module.
    attribution_layers : dict of str to Module
        Lower layers to record (``"input"`` for the model input, with any module value).
    composite : zennit.core.Composite, optional
        None for the plain gradient.
    times_activation : bool
        Multiply the backward signal by the activation (Gradient x Activation); False when the composite
        already propagates relevance (LRP).
    precision : {"fp32", "tf32", "bf16"}
        How the forward and backward passes compute (:mod:`polypure.attribution.precision`); relevance maps are
        reduced and normalised in float32 at every precision.
    relevance_init : bool
        The composite is LRP in the gradient x input framework (AttnLRP): ``init`` gives the initial
        *relevance* at the target, as zennit-crp's ``init_rel`` under an LRP composite, and the backward
        starts from that divided by the target's activation, so that gradient x activation at the target is
        the initial relevance and lower layers conserve it. False: ``init`` is the initial gradient itself
        (Gradient x Activation as docs/method.md defines it, or zennit's relevance under an LRP composite).
    """

    def __init__(self, model: nn.Module, target: dict[str, nn.Module], attribution_layers: dict[str, nn.Module],
                 composite=None, times_activation: bool = True, precision: str = "fp32",
                 relevance_init: bool = False):
        if len(target) != 1:
            raise ValueError("target must name exactly one layer")
        self.model = model
        (self.target_name, self.target_module), = target.items()
        self.layers = dict(attribution_layers)
        if not self.layers:
            raise ConfigError(f"target {self.target_name!r}: no attribution layers given")
        self.composite = composite
        self.times_activation = times_activation
        self.precision = check_precision(precision)
        self.relevance_init = relevance_init
        self.order: list[str] | None = None
        self.share_forward = True
        #: A backward row's cost in forward rows, for planning which rows share a forward pass: about 1 for
        #: gradients, plain or modified as AttnLRP's (a convolution's input gradient costs its forward), about 3.5
        #: for zennit's rules (each hooked layer runs its modified forward again in the backward pass); measured on
        #: CPU ResNets.
        self.backward_cost = 1.25 if composite is None or relevance_init else 3.5
        self._entered = 0
        self._grad_flags: list[bool] = []

    # -- set-up ------------------------------------------------------------------------------------

    def __enter__(self) -> ConditionalRelevance:
        if self._entered == 0:
            self._grad_flags = [p.requires_grad for p in self.model.parameters()]
            self.model.requires_grad_(False)
            if self.composite is not None:
                self.composite.register(self.model)
        self._entered += 1
        return self

    def __exit__(self, *exc) -> None:
        self._entered -= 1
        if self._entered == 0:
            if self.composite is not None:
                self.composite.remove()
            for param, flag in zip(self.model.parameters(), self._grad_flags):
                param.requires_grad_(flag)

    def _module_taps(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.layers.items() if name != INPUT}

    def prepare(self, sample: torch.Tensor) -> list[str]:
        """Order the attribution layers by the forward pass and decide how the forward can be shared.

        Checks that every attribution layer lies below the target. Sharing the forward below the
        lowest attribution layer is only exact when every path from the input to the target passes
        through that layer (a branch that bypasses it, like a shortcut from the input, would see one
        row per image while the rest sees one row per pair); this is tested once with autograd.
        """
        taps = {**self._module_taps(), _TARGET: self.target_module}
        _, order = probe_layers(self.model, taps, sample[:1])
        position = {name: i for i, name in enumerate(order)}
        above = [n for n in self._module_taps() if position[n] > position[_TARGET]]
        if above:
            raise ConfigError(f"attribution layer(s) {', '.join(above)} run after the target layer "
                              f"{self.target_name!r}; attribution layers must lie below the target")
        self.order = ([INPUT] if INPUT in self.layers else []) + [n for n in order if n in self.layers]
        if self.order[0] != INPUT:
            self.share_forward = self._lowest_layer_dominates(sample[:1])
        return self.order

    def _lowest_layer_dominates(self, sample: torch.Tensor) -> bool:
        return passes_through(self.model, self.layers[self.order[0]], self.target_module, sample)

    # -- computation -------------------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor, rows: torch.Tensor,
                 init: Callable[[torch.Tensor], torch.Tensor],
                 keep_maps: tuple[str, ...] = ()) -> RelevanceBatch:
        """Relevance for P rows, row j explaining image ``images[rows[j]]``, in one pass of P rows.

        Parameters
        ----------
        images : Tensor, shape (U, C, H, W)
            Each image once (already on the model's device).
        rows : Tensor, shape (P,)
            Image index of every row.
        init : callable
            ``init(target_output) -> initial relevance`` for the (P, ...) target output; see
            :func:`channel_init`.
        keep_maps : tuple of str
            Attribution layers whose unreduced relevance maps are returned too.

        Returns
        -------
        RelevanceBatch
        """
        count = len(rows)
        return self.explain(images, rows, torch.arange(count), torch.zeros(count, dtype=torch.int64), init,
                            keep_maps)

    def explain(self, images: torch.Tensor, forward: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                init: Callable[[torch.Tensor], torch.Tensor], keep_maps: tuple[str, ...] = ()) -> RelevanceBatch:
        """Relevance for P rows from one forward pass of F rows and one backward pass per slot.

        Row j explains forward row ``rows[j]`` (image ``images[forward[rows[j]]]``) in backward pass
        ``slots[j]``; each backward pass starts from the initial relevance of its own rows and zero on the
        other forward rows. Every pass runs on F rows, so a row's relevance does not depend on how many rows
        share its forward pass (:mod:`polypure.attribution.sharing`). ``explain(images, rows, arange(P),
        zeros(P), ...)`` is the plain pass of :meth:`__call__`.

        Parameters
        ----------
        images : Tensor, shape (U, C, H, W)
            Each image once (already on the model's device).
        forward : Tensor, shape (F,)
            Image index of every forward row.
        rows : Tensor, shape (P,)
            Forward row of every row.
        slots : Tensor, shape (P,)
            Backward pass of every row; a (forward row, slot) pair holds one row at most.
        init : callable
            ``init(target_output) -> initial relevance`` for the (P, ...) target output of the P rows.
        keep_maps : tuple of str
            Attribution layers whose unreduced relevance maps are returned too.

        Returns
        -------
        RelevanceBatch
            For the P rows, in their order.
        """
        if self._entered == 0:
            raise RuntimeError("use the engine inside 'with engine:'")
        if self.order is None:
            self.prepare(images)
        device = images.device
        forward, rows, slots = forward.to(device), rows.to(device), slots.to(device)
        count = int(slots.max()) + 1 if len(slots) else 1
        if len(torch.unique(rows * count + slots)) != len(rows):
            raise ValueError("two rows share a forward row and a backward pass")
        return self._compute(images, forward, rows, slots, count, init, keep_maps)

    def _compute(self, images, forward, rows, slots, count, init, keep_maps) -> RelevanceBatch:
        lowest, share = self.order[0], self.share_forward
        x = images if share else images[forward]

        def expand(output):
            # cut the graph here: nothing below the lowest attribution layer is needed for the backward
            output = output.detach()
            return (output[forward] if share else output).requires_grad_(True)

        taps = {**self._module_taps(), _TARGET: self.target_module}
        transforms = {} if lowest == INPUT else {lowest: expand}
        if lowest == INPUT:
            x = expand(x)
        device = images.device
        relevance: dict[str, torch.Tensor] = {}
        maps: dict[str, torch.Tensor] = {}
        with flags(device, self.precision), torch.enable_grad(), tap_layers(taps, transforms=transforms) as outputs:
            with autocast(device, self.precision):
                forward_to(self.model, x, outputs)
            if _TARGET not in outputs:
                raise PolypureError(f"target layer {self.target_name!r} did not run in the forward pass")
            target = outputs[_TARGET]
            if not target.requires_grad:
                raise PolypureError(f"target layer {self.target_name!r} does not depend on the attribution layers")
            inputs = {name: (x if name == INPUT else outputs[name]) for name in self.layers}
            # element-wise per row: the same numbers whichever forward row a row's target output comes from
            start_rows = init(target.detach()[rows])
            if self.relevance_init:
                # relevance R at the target is gradient x activation there: the gradient to start from is R / A
                # (zero where A is: R, a clamped share of A, is zero there too)
                activation = target.detach()[rows]
                start_rows = torch.where(activation != 0, start_rows / torch.where(activation != 0, activation, 1), 0)
            for slot in range(count):
                mine = torch.nonzero(slots == slot).squeeze(1)
                start = torch.zeros_like(target)
                start[rows[mine]] = start_rows[mine]
                grads = torch.autograd.grad(target, list(inputs.values()), start, allow_unused=True,
                                            retain_graph=slot < count - 1)
                for (name, activation), grad in zip(inputs.items(), grads):
                    if grad is None:
                        raise ConfigError(f"attribution layer {name!r} does not lie on a path to the target "
                                          f"{self.target_name!r}")
                    # in float32 whatever the passes computed in: the sums over positions are where bf16 would
                    # lose most; reduced over all forward rows, the shapes a pass without sharing reduces
                    grad = grad.float()
                    rel_map = grad * activation.detach().float() if self.times_activation else grad
                    if name not in relevance:
                        relevance[name] = torch.empty((len(rows), rel_map.shape[1]), device=device)
                    relevance[name][mine] = normalize_l1(rel_map)[rows[mine]]
                    if name in keep_maps:
                        if name not in maps:
                            maps[name] = torch.empty((len(rows), *rel_map.shape[1:]), device=device)
                        maps[name][mine] = rel_map.detach()[rows[mine]]
        return RelevanceBatch(relevance, spatial_mean(target.detach().float())[rows], maps)
