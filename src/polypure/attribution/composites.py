"""Attribution rules by name: zennit composites and canonizers, plus polypure's ``gradient``.

``gradient`` is the empty composite: the plain gradient, which times the activation gives Gradient x
Activation (the seed paper's relevance). Every name in ``zennit.composites.COMPOSITES``
(``epsilon_plus_flat``, ``epsilon_gamma_box``, ...) is available as well. Canonizers rewrite the network
so that LRP rules apply cleanly (``resnet`` merges batch norms and gives residual additions a module of
their own), for torchvision and timm ResNets alike.

A composite may take parameters (the keyword arguments of its class besides ``canonizers``). Those that
bound the model input, ``low`` and ``high`` of ``epsilon_gamma_box``'s ZBox rule, default to the data's
normalised pixel range: per channel ``(0 - mean) / std`` and ``(1 - mean) / std``. An LRP composite on
a network whose batch norms no canonizer merges gets a warning naming the canonizer to use
(:func:`canonizer_advice`).

Example
-------
>>> from polypure.attribution.composites import make_composite
>>> composite = make_composite("epsilon_plus_flat", ["resnet"])
>>> box = make_composite("epsilon_gamma_box", bounds=([-1.2, -1.2, -1.2], [2.8, 2.8, 2.8]))
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import nn
from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES as ZENNIT_COMPOSITES
from zennit.core import Composite, collect_leaves
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, VGGCanonizer

from polypure.errors import ConfigError
from polypure.registry import Registry

log = logging.getLogger("polypure")

#: Composite factories ``factory(canonizers, **params) -> zennit.core.Composite``.
COMPOSITES = Registry("composite", group="polypure.composites")
#: Canonizer factories ``factory() -> zennit Canonizer``.
CANONIZERS = Registry("canonizer", group="polypure.canonizers")

#: LRP in the gradient x input framework (lxt's AttnLRP): the backward pass carries a modified gradient,
#: layer relevance is that gradient times the activation, and it is conserved like any LRP relevance.
GRADIENT_LRP_COMPOSITES = frozenset({"attnlrp"})

#: Composites whose backward pass carries a (possibly modified) gradient rather than relevance; their
#: layer relevance is gradient x activation. All other composites propagate relevance itself.
GRADIENT_COMPOSITES = frozenset({"gradient", "guided_backprop", "deconvnet"}) | GRADIENT_LRP_COMPOSITES

#: Composite parameters that bound the model input; left out of the config they default to the data's
#: normalised pixel range (:func:`input_bounds`).
INPUT_BOUNDS = ("low", "high")

#: An input bound: one value for every channel, or one per channel.
Bound = float | list[float]

COMPOSITES.register("gradient", lambda canonizers=None: Composite(canonizers=canonizers))
for _name, _cls in ZENNIT_COMPOSITES.items():
    COMPOSITES.register(_name, _cls)
# AttnLRP for vision transformers through lxt (an optional extra, imported when the composite is registered)
COMPOSITES.register_lazy("attnlrp", "polypure.attribution.transformer_rules:attnlrp")


def composite_parameters(name: str) -> tuple[dict[str, inspect.Parameter], bool]:
    """The parameters a composite takes besides ``canonizers``.

    Parameters
    ----------
    name : str
        A registered composite name.

    Returns
    -------
    parameters : dict of str to inspect.Parameter
        By name, in signature order.
    open_ended : bool
        Whether the factory also takes arbitrary keyword arguments (``**kwargs``).

    Raises
    ------
    ConfigError
        For an unknown composite name.
    """
    factory = COMPOSITES.get(name)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return {}, True
    named = {key: p for key, p in signature.parameters.items() if key != "canonizers"
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def _bound_problem(key: str, value: Any) -> str | None:
    if isinstance(value, Real) and not isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, Real) and not isinstance(v, bool) for v in value):
        return None
    return f"parameter {key!r} must be a number or a list of numbers (one per channel), not {value!r}"


def check_composite(name: str, params: dict[str, Any] | None = None, key: str = "relevance.composite") -> None:
    """Check a composite name and its parameters against the composite's signature, before any work.

    Parameters
    ----------
    name : str
        A registered composite name.
    params : dict, optional
        Keyword arguments for the composite (``canonizers`` excluded).
    key : str
        The config key that names the composite, for the message.

    Raises
    ------
    ConfigError
        One line naming the key and the unknown composite, the unknown or missing parameter, or the bad
        input bound.
    """
    params = dict(params or {})
    try:
        named, open_ended = composite_parameters(name)
    except ConfigError as exc:
        problem = str(exc)
    else:
        problem = None
        unknown = [p for p in params if p not in named]
        missing = [p for p, spec in named.items()
                   if spec.default is spec.empty and p not in params and p not in INPUT_BOUNDS]
        if unknown and not open_ended:
            takes = f"it takes {', '.join(named)}" if named else "it takes none"
            problem = f"{name} takes no parameter {unknown[0]!r} ({takes})"
        elif missing:
            problem = f"{name} needs parameter {missing[0]!r}"
        else:
            problem = next((p for p in (_bound_problem(b, params[b]) for b in INPUT_BOUNDS if b in params) if p),
                           None)
    if problem is not None:
        raise ConfigError(f"{key}: {problem}")


def input_bounds(dataset=None) -> tuple[Bound, Bound]:
    """The lowest and highest model input, per channel: the pixel range [0, 1] after the data's normalisation.

    Parameters
    ----------
    dataset : PolypureDataset, optional
        Its ``mean`` and ``std`` (None: no normalisation) give the bounds.

    Returns
    -------
    low, high : float or list of float
        ``(0 - mean) / std`` and ``(1 - mean) / std`` per channel, or 0.0 and 1.0 without normalisation.
    """
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is None or std is None:
        return 0.0, 1.0
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)

    def shortest(values: torch.Tensor) -> list[float]:
        # the shortest decimals that give these float32 values back: 2.8, not 2.799999952316284
        return [float(str(v)) for v in values.numpy()]

    return shortest((0 - mean) / std), shortest((1 - mean) / std)


def composite_kwargs(name: str, params: dict[str, Any] | None = None,
                     bounds: tuple[Bound, Bound] | Callable[[], tuple[Bound, Bound]] | None = None,
                     key: str = "relevance.composite") -> dict[str, Any]:
    """The keyword arguments a composite is built with: the given parameters plus defaulted input bounds.

    Parameters
    ----------
    name : str
        A registered composite name.
    params : dict, optional
        Parameters from the config; checked with :func:`check_composite`.
    bounds : (low, high) or callable returning it, optional
        The data's input bounds (see :func:`input_bounds`), the default of ``low`` / ``high`` and what a
        per-channel bound is checked against; a callable is called only for a composite that takes
        them. None: 0 and 1.
    key : str
        The config key that names the composite, for error messages.

    Returns
    -------
    dict
        Plain values (numbers and lists), as the store records them; empty for a composite without
        parameters.

    Raises
    ------
    ConfigError
        For bad parameters, or a per-channel bound whose length differs from the data's channels.
    """
    check_composite(name, params, key)
    kwargs = dict(params or {})
    named, _ = composite_parameters(name)
    takes = [b for b in INPUT_BOUNDS if b in named]
    if takes:
        defaults = dict(zip(INPUT_BOUNDS, (bounds() if callable(bounds) else bounds) or (0.0, 1.0)))
        channels = len(defaults["low"]) if isinstance(defaults["low"], (list, tuple)) else None
        for b in takes:
            value = kwargs.setdefault(b, defaults[b])
            if isinstance(value, (list, tuple)) and channels is not None and len(value) not in (1, channels):
                raise ConfigError(f"{key}: {b!r} has {len(value)} values but the data has {channels} channels")
    return {key: list(value) if isinstance(value, tuple) else value for key, value in kwargs.items()}


def _as_argument(key: str, value: Any) -> Any:
    # a per-channel bound broadcasts against (batch, channels, height, width) inputs of any batch size
    if key in INPUT_BOUNDS and isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=torch.float32).view(1, -1, 1, 1)
    return value


def make_composite(name: str, canonizers: list[str] | None = None, params: dict[str, Any] | None = None,
                   bounds: tuple[Bound, Bound] | Callable[[], tuple[Bound, Bound]] | None = None,
                   key: str = "relevance.composite") -> Composite:
    """A fresh composite by name, with the named canonizers and its parameters.

    Parameters
    ----------
    name : str
        ``gradient`` or any registered (zennit) composite name.
    canonizers : list of str, optional
    params : dict, optional
        Keyword arguments of the composite (``low``, ``high`` for ``epsilon_gamma_box``).
    bounds : (low, high) or callable returning it, optional
        Default input bounds, see :func:`composite_kwargs`.
    key : str
        The config key that names the composite, for error messages.

    Returns
    -------
    zennit.core.Composite

    Raises
    ------
    ConfigError
        For an unknown name or bad parameters.
    """
    kwargs = composite_kwargs(name, params, bounds, key)
    factory = COMPOSITES.get(name)
    chosen = [CANONIZERS.get(c)() for c in canonizers or []]
    return factory(canonizers=[LastFirst(chosen)] if chosen else [],
                   **{key: _as_argument(key, value) for key, value in kwargs.items()})


class LastFirst(CompositeCanonizer):
    """Canonizers applied in the order given and undone in the reverse order.

    zennit reverts canonizers in the order it applied them. Two that change the same module (``resnet``,
    which merges batch norms into the convolutions before them, then ``merge_bn``) must be undone
    last-first, or the second undo finds the first's state gone and the weights stay changed.
    """

    def apply(self, root_module):
        """Apply every canonizer; the handles come back last-first, the order zennit removes them in."""
        return list(reversed(super().apply(root_module)))


def times_activation(composite: str, setting="auto") -> bool:
    """Whether layer relevance is the backward signal times the activation.

    The backward signal of the plain gradient (and of guided backprop or deconvnet) is a gradient, and
    relevance is gradient x activation (docs/method.md, Conditional relevance). Under an LRP composite zennit already
    returns relevance at every layer output, so multiplying again by the activation would not be LRP.
    """
    if setting != "auto":
        return bool(setting)
    return composite in GRADIENT_COMPOSITES


# ---------------------------------------------------------------------------------------------------
# batch norms an LRP composite would leave alone

_ADVISED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _has_resnet_blocks(module: nn.Module) -> bool:
    from torchvision.models.resnet import BasicBlock, Bottleneck
    blocks = (BasicBlock, Bottleneck, *(t for t in _timm_block_types() if t is not None))
    return any(isinstance(m, blocks) for m in module.modules())


def _merged_batch_norms(module: nn.Module, sample: torch.Tensor | None) -> tuple[int, int]:
    """How many batch norms ``merge_bn`` merges into the layer that feeds them, and how many into another.

    ``merge_bn`` (zennit's SequentialMergeBatchNorm) merges a batch norm into the linear layer right before
    it in module order. Given a sample, a forward pass checks that this layer's output is the batch norm's
    input; a batch norm after a concatenation (DenseNet) would otherwise be merged into the wrong layer.
    """
    merge = SequentialMergeBatchNorm
    leaves = list(collect_leaves(module))
    pairs = [(before, leaf) for before, leaf in zip(leaves, leaves[1:])
             if isinstance(before, merge.linear_type) and isinstance(leaf, merge.batch_norm_type)]
    if sample is None or not pairs:
        return len(pairs), 0
    outputs, inputs = {}, {}
    handles = [m.register_forward_hook(lambda m, args, out: outputs.__setitem__(m, out)) for m, _ in pairs]
    handles += [m.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, args[0])) for _, m in pairs]
    try:
        with torch.no_grad():
            module(sample)
    finally:
        for handle in handles:
            handle.remove()
    right = sum(norm in inputs and inputs[norm] is outputs.get(linear) for linear, norm in pairs)
    return right, len(pairs) - right


def canonizer_advice(module: nn.Module, composite: str, canonizers: list[str] | None,
                     sample: torch.Tensor | None = None) -> str | None:
    """What to do when an LRP composite meets batch norms that no canonizer merges; None when all is well.

    zennit's LRP rules have no rule for a batch norm: without a canonizer that merges it into the layer
    before, the backward pass goes through it as a plain gradient, and the result is not LRP.

    Parameters
    ----------
    module : torch.nn.Module
        The network.
    composite : str
        The composite's name; gradient-type composites need no canonizer.
    canonizers : list of str, optional
        The canonizers that will be applied.
    sample : Tensor, optional
        A model input (batch of one); with it, ``merge_bn`` is advised only where a forward pass shows
        that it would merge each batch norm into the layer that feeds it.

    Returns
    -------
    str or None
        One line naming the canonizer to use, or saying that none fits.
    """
    if composite in GRADIENT_COMPOSITES or canonizers:
        return None
    norms = [m for m in module.modules() if isinstance(m, SequentialMergeBatchNorm.batch_norm_type)]
    if not norms:
        return None
    found = (f"composite {composite!r} on a network with {len(norms)} batch norm(s) and no canonizer: zennit "
             "passes the plain gradient through them, so the relevance is not LRP")
    if _has_resnet_blocks(module):
        return f"{found}; set relevance.canonizers: [resnet]"
    right, wrong = _merged_batch_norms(module, sample)
    if wrong:
        return (f"{found}; no registered canonizer fits this network (merge_bn would merge {wrong} of them into "
                "a layer that does not feed them)")
    if right == len(norms):
        return f"{found}; set relevance.canonizers: [merge_bn] (it merges all of them into the layers before)"
    if right:
        return (f"{found}; relevance.canonizers: [merge_bn] merges {right} of them, no registered canonizer "
                f"merges the other {len(norms) - right}")
    return f"{found}; no registered canonizer fits this network (none of its batch norms follows a linear layer)"


def warn_uncanonized(module: nn.Module, composite: str, canonizers: list[str] | None,
                     sample: torch.Tensor | None = None) -> None:
    """Log :func:`canonizer_advice` as a warning, once per network."""
    if module in _ADVISED:
        return
    advice = canonizer_advice(module, composite, canonizers, sample)
    if advice is not None:
        _ADVISED.add(module)
        log.warning(advice)


# ---------------------------------------------------------------------------------------------------
# timm ResNet blocks, canonized like zennit does for torchvision: the in-place residual addition
# becomes a Sum module that LRP rules can attach to.


def _timm_block_types():
    try:
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # timm is optional for canonizing
        return None, None
    return BasicBlock, Bottleneck


def _timm_residual(block, x, shortcut, act):
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    return act(block.canonizer_sum(torch.stack([shortcut, x], dim=-1)))


def _timm_basic_forward(self, x):
    shortcut = x
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    return _timm_residual(self, self.bn2(self.conv2(x)), shortcut, self.act2)


def _timm_bottleneck_forward(self, x):
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    return _timm_residual(self, self.bn3(self.conv3(x)), shortcut, self.act3)


class TimmResNetBlockCanonizer(AttributeCanonizer):
    """Gives timm ResNet BasicBlocks and Bottlenecks a Sum module for their residual addition."""

    def __init__(self):
        super().__init__(self._attribute_map)

    @staticmethod
    def _attribute_map(name, module):
        basic, bottleneck = _timm_block_types()
        if basic is not None and type(module) is basic:
            return {"forward": _timm_basic_forward.__get__(module), "canonizer_sum": Sum()}
        if bottleneck is not None and type(module) is bottleneck:
            return {"forward": _timm_bottleneck_forward.__get__(module), "canonizer_sum": Sum()}
        return None


class ResNetCanonizer(CompositeCanonizer):
    """Merge batch norms and canonize residual blocks of torchvision and timm ResNets."""

    def __init__(self):
        super().__init__((SequentialMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer(),
                          TimmResNetBlockCanonizer()))


CANONIZERS.register("resnet", ResNetCanonizer)
CANONIZERS.register("merge_bn", SequentialMergeBatchNorm)
CANONIZERS.register("vgg", VGGCanonizer)
