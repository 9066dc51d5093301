"""What an LRP composite leaves to the plain gradient: residual additions, gates and normalisations.

zennit applies a rule to each module its composite maps; every operation outside such a module is
differentiated by autograd. For most (a concatenation, a reshape, a pooling by a functional call) the
gradient hands relevance on unchanged, but for three it creates or destroys relevance:

* **residual additions**, the sum of two activations: both summands get all the relevance;
* **gates**, the product of two activations (squeeze-excitation): the chain rule splits the relevance
  between signal and gate by their derivatives, not their contributions;
* **normalisations** (a batch, layer or group norm) and **scales** (the product of an activation and a
  parameter, such as a layer scale): the relevance is multiplied by the norm's or scale's factor.

:func:`find_gaps` runs one forward pass with the composite's canonizers applied and records each such
operation with the innermost module that performs it, unless a module around it has a rule. Parameters are
frozen and the input requires a gradient, so "activation" means "a tensor that depends on the input". It
also compares the output with that of the network as it is: a canonizer that merges a batch norm into a
layer that does not feed it (after a concatenation it does not know) changes what the network computes.

Example
-------
>>> import torch, torchvision
>>> from polypure.attribution.composites import make_composite
>>> from polypure.attribution.lrp_gaps import find_gaps
>>> net = torchvision.models.resnet18().eval()
>>> found = find_gaps(net, make_composite("epsilon_plus"), torch.rand(1, 3, 32, 32))
>>> found.gaps[0]
Gap(path='layer1.0', type='BasicBlock', kind='residual addition')
>>> find_gaps(net, make_composite("epsilon_plus", ["resnet"]), torch.rand(1, 3, 32, 32)).gaps
[]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_ADDITIONS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
              torch.Tensor.__iadd__}
_PRODUCTS = {torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__, torch.Tensor.__rmul__,
             torch.Tensor.__imul__}
_NORMS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm,
          *([F.rms_norm] if hasattr(F, "rms_norm") else [])}


@dataclass(frozen=True)
class Gap:
    """An operation left to the plain gradient.

    Attributes
    ----------
    path : str
        The module path of the innermost module performing it (empty for the model itself).
    type : str
        That module's class name.
    kind : str
        ``residual addition``, ``gate``, ``normalisation`` or ``scale``.
    """

    path: str
    type: str
    kind: str

    def describe(self) -> str:
        """``path (Type)``, the model itself shown as ``(the model)``."""
        return f"{self.path or '(the model)'} ({self.type})"


def _activation(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _identity_batch_norm(args, kwargs) -> bool:
    """Whether an ``F.batch_norm`` call computes the identity (a norm zennit merged sets its statistics so)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = dict(zip(names, args)) | kwargs
    mean, var, weight, bias = (bound.get(k) for k in ("running_mean", "running_var", "weight", "bias"))
    if bound.get("training") or mean is None or var is None:
        return False

    def equals(tensor, value):
        return tensor is None or bool((tensor == value).all())

    return equals(mean, 0) and equals(var, 1) and equals(weight, 1) and equals(bias, 0)


def _kind(func, args, kwargs) -> str | None:
    """The gap an operation is, or None."""
    if func in _ADDITIONS:
        operands = [*args[:2], kwargs.get("other")]
        return "residual addition" if sum(_activation(a) for a in operands) >= 2 else None
    if func in _PRODUCTS:
        operands = [a for a in [*args[:2], kwargs.get("other")] if a is not None]
        if sum(_activation(a) for a in operands) >= 2:
            return "gate"
        if any(_activation(a) for a in operands) and any(isinstance(a, nn.Parameter) and a.numel() > 1
                                                         for a in operands):
            return "scale"
        return None
    if func in _NORMS and args and _activation(args[0]):
        return None if func is F.batch_norm and _identity_batch_norm(args, kwargs) else "normalisation"
    return None


@dataclass
class GapReport:
    """What :func:`find_gaps` found.

    Attributes
    ----------
    gaps : list of Gap
        In the order the forward pass met them, one per module and kind.
    change : float
        The largest change of the model output that the canonizers cause, over its largest absolute value
        (0 without canonizers or where the output is not a tensor).
    """

    gaps: list[Gap]
    change: float


class _Watch(TorchFunctionMode):
    """Records gaps while a forward pass runs, with the stack of modules it is in."""

    def __init__(self, stack: list[tuple[str, nn.Module, bool]], found: dict[tuple[str, str], Gap]):
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack and not any(covered for _, _, covered in self.stack):
            kind = _kind(func, args, kwargs)
            if kind is not None:
                path, module, _ = self.stack[-1]
                self.found.setdefault((path, kind), Gap(path, type(module).__name__, kind))
        return func(*args, **kwargs)


def find_gaps(module: nn.Module, composite, sample: torch.Tensor) -> GapReport:
    """The residual additions, gates, normalisations and scales an LRP composite leaves to the plain gradient.

    Parameters
    ----------
    module : torch.nn.Module
        The network, in eval mode; it is unchanged afterwards.
    composite : zennit.core.Composite
        Its canonizers are applied for the forward pass, its module map says which modules have a rule
        (a gap inside a module with a rule is none: the rule replaces the module's gradient as a whole).
    sample : Tensor
        A model input (a batch of one is enough).

    Returns
    -------
    GapReport
    """
    with torch.no_grad():
        reference = module(sample) if composite.canonizers else None
    handles, hooks = [], []
    grad_flags = [p.requires_grad for p in module.parameters()]
    stack: list[tuple[str, nn.Module, bool]] = []
    found: dict[tuple[str, str], Gap] = {}
    try:
        for canonizer in composite.canonizers:
            handles += canonizer.apply(module)
        ctx: dict = {}
        covered = {m for name, m in module.named_modules() if composite.module_map(ctx, name, m) is not None}

        def enter(child, args, name):
            stack.append((name, child, child in covered))

        def leave(child, args, output):
            stack.pop()

        for name, child in module.named_modules():
            hooks.append(child.register_forward_pre_hook(lambda m, args, name=name: enter(m, args, name)))
            hooks.append(child.register_forward_hook(leave))
        module.requires_grad_(False)
        x = sample.detach().clone().requires_grad_(True)
        with torch.enable_grad(), _Watch(stack, found):
            output = module(x)
    finally:
        # the canonizers in the order zennit removes them (the order apply returned them)
        for handle in [*hooks, *handles]:
            handle.remove()
        for param, flag in zip(module.parameters(), grad_flags):
            param.requires_grad_(flag)
    change = 0.0
    if isinstance(reference, torch.Tensor) and isinstance(output, torch.Tensor):
        scale = float(reference.abs().max())
        difference = float((output.detach() - reference).abs().max())
        change = difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)
    return GapReport(list(found.values()), change)
