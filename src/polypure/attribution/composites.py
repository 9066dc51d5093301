"""Attribution rules by name: zennit composites and canonizers, plus polypure's ``gradient``.

``gradient`` is the empty composite: the plain gradient, which times the activation gives Gradient x
Activation (the seed paper's relevance). Every name in ``zennit.composites.COMPOSITES``
(``epsilon_plus_flat``, ``epsilon_gamma_box``, ...) is available as well. Canonizers rewrite the network
so that LRP rules apply cleanly (:mod:`polypure.attribution.canonizers`: residual additions as ``Sum``
modules, batch norms merged, squeeze-excitation gates passed as signal only, DenseNet's norms after
concatenations); an LRP composite without canonizers in the config gets those whose module types the
network has (:func:`automatic_canonizers`), and passes relevance through timm's activations and layer norms
(:func:`~polypure.attribution.canonizers.canonical_rules`).

A composite may take parameters (the keyword arguments of its class besides ``canonizers``). Those that
bound the model input, ``low`` and ``high`` of ``epsilon_gamma_box``'s ZBox rule, default to the data's
normalised pixel range: per channel ``(0 - mean) / std`` and ``(1 - mean) / std``. An LRP composite on
a network with residual additions, gates or normalisations that its canonizers leave to the plain gradient
gets one warning naming their modules (:func:`canonizer_advice`).

Example
-------
>>> from polypure.attribution.composites import make_composite
>>> composite = make_composite("epsilon_plus_flat", ["resnet"])
>>> import torchvision
>>> automatic_canonizers(torchvision.models.efficientnet_b0(), "epsilon_plus")
['mbconv', 'se_gate', 'batch_norm']
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
from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES as ZENNIT_COMPOSITES
from zennit.core import Composite
from zennit.torchvision import VGGCanonizer

from polypure.attribution.canonizers import (
    AUTOMATIC,
    CANONIZER_TOLERANCE,
    canonical_rules,
    choose_canonizers,
)
from polypure.attribution.lrp_gaps import find_gaps
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
GRADIENT_COMPOSITES = frozenset({"gradient", "guided_backprop", "deconvnet", "beta_smooth"}) | GRADIENT_LRP_COMPOSITES

#: Composite parameters that bound the model input; left out of the config they default to the data's
#: normalised pixel range (:func:`input_bounds`).
INPUT_BOUNDS = ("low", "high")

#: Composite parameters that take rule objects (zennit's ``layer_map`` and ``first_map``): Python only, not
#: config values, so they are neither offered nor accepted in a config.
RULE_PARAMETERS = ("layer_map", "first_map")

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
    named = {key: p for key, p in signature.parameters.items()
             if key != "canonizers" and key not in RULE_PARAMETERS
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _parameter_problem(key: str, value: Any, spec: inspect.Parameter) -> str | None:
    """What is wrong with a config value for a composite parameter other than an input bound, if anything."""
    if key == "zero_params":  # zennit: names of parameters set to zero for the rule (``[bias]``)
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return None
        return f"parameter 'zero_params' must be a parameter name or a list of them (e.g. [bias]), not {value!r}"
    if _is_number(spec.default) and not _is_number(value):
        return f"parameter {key!r} must be a number, not {value!r}"
    return None


def _bound_problem(key: str, value: Any) -> str | None:
    if _is_number(value):
        return None
    if isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
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
            problems = (_bound_problem(key, value) if key in INPUT_BOUNDS
                        else _parameter_problem(key, value, named[key]) if key in named else None
                        for key, value in params.items())
            problem = next((p for p in problems if p), None)
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
    composite = factory(canonizers=[LastFirst(chosen)] if chosen else [],
                        **{key: _as_argument(key, value) for key, value in kwargs.items()})
    if name not in GRADIENT_COMPOSITES and callable(getattr(composite, "module_map", None)):
        # the rules canonized modules ask for, and Pass for timm's activations and for layer norms
        canonical_rules(composite)
    return composite


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
# canonizers by name, chosen automatically, and what they leave out

for _name, _cls in AUTOMATIC.items():
    CANONIZERS.register(_name, _cls)
# zennit's own, as zennit-crp applies them (``batch_norm`` merges more exactly and more kinds of norm)
CANONIZERS.register("merge_bn", SequentialMergeBatchNorm)
CANONIZERS.register("vgg", VGGCanonizer)
#: What the zennit canonizers registered by name cover.
_ZENNIT_FAMILIES = {
    "merge_bn": "zennit's SequentialMergeBatchNorm: every batch norm right after a convolution or linear layer "
                "in module order (as zennit-crp merges them)",
    "vgg": "zennit's VGGCanonizer: torchvision VGG with batch norms (the same merge)",
}


def canonizer_families(name: str) -> str:
    """What a registered canonizer covers, for ``polypure list canonizers`` (empty for a plugin that does not say).

    Raises
    ------
    ConfigError
        For an unknown canonizer name.
    """
    factory = CANONIZERS.get(name)
    return _ZENNIT_FAMILIES.get(name, "") if factory in (SequentialMergeBatchNorm, VGGCanonizer) else \
        getattr(factory, "families", "") or ""


def automatic_canonizers(model, composite: str) -> list[str]:
    """The canonizers a composite gets when the config names none.

    The model's own (:attr:`~polypure.models.factory.ExplainedModel.canonizers`), or else those whose module
    types the network has (:func:`~polypure.attribution.canonizers.choose_canonizers`). None for the plain
    gradient. The other gradient-type composites (guided backprop, deconvnet) get those that leave the
    gradient as it is, which is all but ``se_gate`` (it cuts the gradient through the gate).

    Parameters
    ----------
    model : ExplainedModel or torch.nn.Module
    composite : str
        The composite's name.

    Returns
    -------
    list of str
    """
    if composite == "gradient":
        return []
    module = getattr(model, "module", model)
    chosen = list(getattr(model, "canonizers", None) or choose_canonizers(module))
    if composite in GRADIENT_COMPOSITES:
        chosen = [name for name in chosen if name != "se_gate"]
    return chosen


#: Networks warned about (once each), and the rules checked on each: a forward pass per rule, not per call.
_ADVISED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_CHECKED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()

#: Gaps named per kind in the warning before the rest is counted.
_NAMED = 3


def canonizer_advice(module: nn.Module, composite: str, canonizers: list[str] | None, sample: torch.Tensor,
                     params: dict[str, Any] | None = None) -> str | None:
    """What an LRP composite and its canonizers leave to the plain gradient, as one line; None when nothing.

    A residual addition, a gate, a normalisation or a scale outside every module with a rule gets the plain
    gradient, which creates or destroys relevance (:mod:`polypure.attribution.lrp_gaps`). Canonizers that
    change the model's output by more than :data:`~polypure.attribution.canonizers.CANONIZER_TOLERANCE` are
    named first: they do not fit the network.

    Parameters
    ----------
    module : torch.nn.Module
        The network.
    composite : str
        The composite's name; gradient-type composites are never advised.
    canonizers : list of str, optional
        The canonizers that will be applied.
    sample : Tensor
        A model input (a batch of one), for one forward pass.
    params : dict, optional
        The composite's parameters.

    Returns
    -------
    str or None
        The output change, or the gaps by kind, each with the module path and type of the first few.
    """
    if composite in GRADIENT_COMPOSITES:
        return None
    try:
        built = make_composite(composite, list(canonizers or []), params)
    except ConfigError:
        return None  # the config check names what is wrong with the composite
    found = find_gaps(module, built, sample)
    with_canonizers = f"canonizers {', '.join(canonizers)}" if canonizers else "no canonizer"
    if found.change > CANONIZER_TOLERANCE:
        return (f"composite {composite!r} with {with_canonizers}: the canonizers change the model's output by "
                f"{found.change:.3g} of its largest value (at most {CANONIZER_TOLERANCE:g}), so they do not fit "
                "this network (a batch norm merged into a layer that does not feed it?); `polypure check-rules` "
                "names the layers")
    if not found.gaps:
        return None
    by_kind: dict[str, list[str]] = {}
    for gap in found.gaps:
        by_kind.setdefault(gap.kind, []).append(gap.describe())
    parts = []
    for kind, where in by_kind.items():
        more = f" and {len(where) - _NAMED} more" if len(where) > _NAMED else ""
        parts.append(f"{kind} in {', '.join(where[:_NAMED])}{more}")
    missing = [name for name in choose_canonizers(module) if name not in (canonizers or [])]
    hint = (f"the canonizers for this network's module types are {', '.join(choose_canonizers(module))}: leave "
            "relevance.canonizers out to have them chosen" if missing else
            "no registered canonizer rewrites these module types")
    return (f"composite {composite!r} with {with_canonizers} leaves {len(found.gaps)} operation(s) to the plain "
            f"gradient, where relevance is not conserved: {'; '.join(parts)} ({hint}; `polypure check-rules "
            "--ideal` measures the damage)")


def warn_uncanonized(module: nn.Module, composite: str, canonizers: list[str] | None, sample: torch.Tensor,
                     params: dict[str, Any] | None = None) -> None:
    """Log :func:`canonizer_advice` as a warning, once per network (each rule is checked once)."""
    rule = (composite, tuple(canonizers or ()), repr(sorted((params or {}).items())))
    checked = _CHECKED.setdefault(module, set())
    if module in _ADVISED or rule in checked:
        return
    checked.add(rule)
    advice = canonizer_advice(module, composite, canonizers, sample, params)
    if advice is not None:
        _ADVISED.add(module)
        log.warning(advice)
