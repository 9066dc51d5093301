"""Canonizers chosen by module type: the rewrites that make torchvision and timm networks fit for LRP.

zennit's LRP rules attach to modules. Whatever a network computes outside a module with a rule, autograd
differentiates instead, and a gradient is not relevance: an in-place residual addition hands the whole
relevance to both of its inputs (it doubles), a batch norm scales it by its weight over its standard
deviation, a squeeze-excitation gate splits it between signal and gate by the chain rule. On an EfficientNet
that creates relevance 13 to 29 times over, or makes it vanish. A canonizer rewrites such a network while
relevance is computed, so that every operation is a module with a rule, and restores it exactly afterwards:

* residual additions become zennit ``Sum`` modules (one per addition), which the composites give the
  ``Norm`` rule: each summand gets relevance in proportion to its contribution;
* batch norms merge into the convolution or linear layer that feeds them (timm's ``BatchNormAct2d`` is a
  batch norm followed by its activation: the norm part merges, the activation stays);
* squeeze-excitation gates are computed without gradient and the gated module gets the ``Pass`` rule: the
  gate, which only rescales, gets no relevance and the signal all of it;
* a batch norm after a concatenation (DenseNet), which no single convolution feeds, gets the identity
  rule, as layer norms do: its statistics, scale and shift are constants of the normalisation.

Each canonizer is chosen by the module types it finds (:func:`choose_canonizers`), never by module names,
and restores the parameters, buffers and forward methods it changed bit for bit on ``remove``. Rewrites that
need a rule of their own tag the module (:data:`RULE_TAG`); :func:`canonical_rules` makes a composite honour
the tags and gives activations zennit does not know and layer norms the ``Pass`` rule.

Example
-------
>>> import torch, torchvision
>>> from polypure.attribution.canonizers import choose_canonizers
>>> choose_canonizers(torchvision.models.mobilenet_v3_small())
['mbconv', 'se_gate', 'batch_norm']
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from functools import cache
from importlib import import_module

import torch
from torch import nn
from zennit.canonizers import Canonizer, CompositeCanonizer, SequentialMergeBatchNorm
from zennit.core import Hook
from zennit.layer import Sum
from zennit.rules import Pass
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import ConvolutionTranspose
from zennit.types import Linear as LinearTypes

#: The largest change of a layer's output, relative to its largest absolute value, that canonizers may
#: cause. Merging a batch norm into a convolution is exact in real arithmetic. zennit's merge (in ``resnet``)
#: leaves each merged norm computing ``x / sqrt(1 + eps)``: it moved the demo ResNet's outputs by 3e-5, those
#: of ResNet-50 / ResNet-152 with random batch-norm statistics by 2e-4 / 7e-4, and of a random ResNeXt-50,
#: Wide ResNet-50 or ResNet-50-D by 1e-3 to 2.5e-3. polypure's own merge (``batch_norm``) stays within 1e-4 on
#: every network of the test zoo, while a canonizer that misses or mangles a module changes outputs by percents.
CANONIZER_TOLERANCE = 1e-3

#: The attribute by which a canonizer asks for the rule of a module it rewrote (a key of :data:`TAGGED_RULES`).
RULE_TAG = "canonizer_rule"

#: Rules a canonizer can ask for by tag, whatever the composite.
TAGGED_RULES: dict[str, Hook] = {"pass": Pass()}


@cache
def _classes(*paths: str) -> tuple[type, ...]:
    """The classes at ``module:Class`` paths that import; timm is optional, and a missing class is no type."""
    found = []
    for path in paths:
        module, _, name = path.partition(":")
        try:
            found.append(getattr(import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _exactly(module: nn.Module, classes: tuple[type, ...]) -> bool:
    # exact types: a subclass may compute another thing (timm's CondConvResidual is an InvertedResidual with
    # routing weights), and a canonical forward written for the class would change it
    return type(module) in classes


# ---------------------------------------------------------------------------------------------------
# one module's rewrite, undone exactly


class Rewrite(Canonizer):
    """The changes a canonizer made to one module: attributes set and tensor data replaced, undone in reverse.

    Attributes are set on the instance (a forward method, a ``Sum`` child, a rule tag) and deleted again, so
    the class's own attributes show through as before; tensors get their old data objects back.
    """

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def apply(self, root_module):
        """A rewrite is made by its canonizer, never applied on its own: nothing to apply."""
        return []

    def register(self):
        """Nothing to register: the changes are made when the canonizer applies this rewrite."""

    def remove(self):
        """Undo every change, last first."""
        while self._undo:
            self._undo.pop()()

    def set(self, module: nn.Module, key: str, value) -> None:
        """Set an attribute that the module's instance does not have yet (a method, a child module, a tag)."""
        if key in vars(module) or key in module._modules or key in module._parameters:
            raise RuntimeError(f"{type(module).__name__} already has {key!r}: canonized twice?")
        setattr(module, key, value)
        self._undo.append(lambda: delattr(module, key))

    def method(self, module: nn.Module, key: str, function: Callable) -> None:
        """Bind ``function`` to the module as its method ``key`` (usually ``forward``)."""
        self.set(module, key, types.MethodType(function, module))

    def data(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """Replace a parameter's or buffer's data; the old data object comes back on removal."""
        old = tensor.data
        tensor.data = value
        self._undo.append(lambda: setattr(tensor, "data", old))

    def bias(self, module: nn.Module, value: torch.Tensor) -> None:
        """Give a layer without bias the bias ``value``; removal puts back ``None``."""
        module.bias = nn.Parameter(value, requires_grad=module.weight.requires_grad)
        self._undo.append(lambda: setattr(module, "bias", None))


class ModuleCanonizer(Canonizer):
    """Rewrites every module of some types, one :class:`Rewrite` per module.

    Subclasses name the types (:meth:`module_types`) and rewrite one module (:meth:`rewrite`).
    """

    #: The families of networks covered, for ``polypure list canonizers``.
    families = ""

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        """The module types this canonizer rewrites; finding one of them chooses it (:func:`choose_canonizers`)."""
        return ()

    def rewrite(self, rewrite: Rewrite, module: nn.Module) -> bool:
        """Rewrite one module through ``rewrite``; False when there is nothing to do (a block without skip)."""
        raise NotImplementedError

    def applies_to(self, module: nn.Module) -> bool:
        """Whether ``module`` is one this canonizer rewrites."""
        return _exactly(module, self.module_types())

    def apply(self, root_module):
        """Rewrite every applicable module of ``root_module``; an error undoes what was done already."""
        done = []
        try:
            for module in list(root_module.modules()):
                if not self.applies_to(module) or "forward" in vars(module):
                    continue  # another canonizer rewrote it already
                rewrite = Rewrite()
                done.append(rewrite)
                if not self.rewrite(rewrite, module):
                    done.pop().remove()
        except BaseException:
            for rewrite in reversed(done):
                rewrite.remove()
            raise
        return done

    def register(self):
        """Nothing to register: :meth:`apply` returns the rewrites, which zennit removes."""

    def remove(self):
        """Nothing to remove here: each :class:`Rewrite` undoes itself."""

    def copy(self):
        """A fresh canonizer of the same kind."""
        return type(self)()


def _add(block: nn.Module, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    # the residual addition as a module of its own, which the composite gives the Norm rule
    return block.canonizer_sum(torch.stack([shortcut, branch], dim=-1))


# ---------------------------------------------------------------------------------------------------
# batch norms


def _norm_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch norm in eval mode as ``x * scale + shift``, computed in float64."""
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale, shift


def _output_channels(linear: nn.Module) -> int:
    # a transposed convolution keeps output channels in its second weight dimension (times its groups)
    if isinstance(linear, ConvolutionTranspose):
        return linear.weight.shape[1] * linear.groups
    return linear.weight.shape[0]


def _mergeable(linear: nn.Module, norm: nn.Module) -> bool:
    """Whether a batch norm can merge into a layer: it has running statistics and one channel per output."""
    # without running statistics a batch norm normalises with the batch's own, even in eval mode; a layer
    # with another number of outputs does not feed it (a concatenation lies between them)
    return norm.running_mean is not None and norm.running_var is not None and \
        _output_channels(linear) == norm.num_features


def _identity(self, x):
    return x


def _activation_only(self, x):
    # timm's BatchNormAct2d with its norm merged away: what is left is its dropout and activation
    return self.act(self.drop(x))


def merge_norm(rewrite: Rewrite, linear: nn.Module, norm: nn.Module) -> None:
    """Merge a batch norm into the convolution or linear layer that feeds it; the norm then passes its input on.

    Unlike zennit's merge, the norm's parameters stay as they are and its forward becomes the identity (for
    timm's ``BatchNormAct2d``: its activation), so it computes no ``x / sqrt(1 + eps)`` afterwards.
    """
    scale, shift = _norm_scale_shift(norm)
    weight = linear.weight.data
    if isinstance(linear, ConvolutionTranspose):
        # (in, out / groups, ...): each group's output channels in the second dimension
        factor = scale.view(linear.groups, 1, -1, *[1] * (weight.ndim - 2))
        merged = (weight.double().view(linear.groups, -1, *weight.shape[1:]) * factor).view(weight.shape)
    else:
        merged = weight.double() * scale.view(-1, *[1] * (weight.ndim - 1))
    rewrite.data(linear.weight, merged.to(weight.dtype))
    if linear.bias is None:
        rewrite.bias(linear, shift.to(weight.dtype))
    else:
        rewrite.data(linear.bias, (linear.bias.data.double() * scale + shift).to(weight.dtype))
    rewrite.method(norm, "forward", _activation_only if _exactly(norm, _norm_act_types()) else _identity)


def _norm_act_types() -> tuple[type, ...]:
    return _classes("timm.layers.norm_act:BatchNormAct2d")


def _batch_norm_types() -> tuple[type, ...]:
    # exact types again: other subclasses (frozen, synchronised, ...) compute the norm in their own way
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, *_norm_act_types())


def _densenet_types() -> tuple[type, ...]:
    return _classes("torchvision.models.densenet:DenseNet", "torchvision.models.densenet:_DenseLayer",
                    "torchvision.models.densenet:_Transition", "torchvision.models.densenet:_DenseBlock")


def _units(module: nn.Module) -> Iterator[nn.Module | None]:
    """The leaves of a module in registration order, a batch norm with children (BatchNormAct2d) as one leaf.

    DenseNet parts yield None, a barrier: their batch norms follow concatenations, not the layer before
    them in module order (:class:`DenseNetCanonizer` handles them).
    """
    if _exactly(module, _densenet_types()):
        yield None
        return
    children = list(module.children())
    if not children or _exactly(module, _batch_norm_types()):
        yield module
        return
    for child in children:
        yield from _units(child)


class BatchNormCanonizer(Canonizer):
    """Merges every batch norm into the convolution or linear layer right before it in module order.

    A batch norm in eval mode is ``x * scale + shift`` per channel; LRP rules have none for it, so the plain
    gradient would scale the relevance by ``scale``. Merged into the layer that feeds it (weights times
    ``scale``, bias times ``scale`` plus ``shift``), the network computes the same and the layer's rule
    explains the whole. Like zennit's ``SequentialMergeBatchNorm`` it relies on modules being registered in
    the order they run (true of torchvision's and timm's convolution-norm-activation blocks); unlike it, it
    merges timm's ``BatchNormAct2d`` (a norm with an activation inside) and leaves DenseNet's batch norms to
    :class:`DenseNetCanonizer`. Batch norms without running statistics (which normalise with the batch's
    own) or not right after a linear layer stay as they are, and :func:`~polypure.attribution.composites.
    warn_uncanonized` names them.
    """

    families = ("every batch norm right after a convolution or linear layer (timm BatchNormAct2d too): "
                "EfficientNet, MobileNet, RegNet, VGG-BN, ...")

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        """Batch norms (exact types) and timm's ``BatchNormAct2d``."""
        return _batch_norm_types()

    def apply(self, root_module):
        """Merge each batch norm that follows a linear layer in module order."""
        done = []
        try:
            before = None
            for unit in _units(root_module):
                if isinstance(before, LinearTypes) and _exactly(unit, _batch_norm_types()) \
                        and _mergeable(before, unit) and "forward" not in vars(unit):
                    rewrite = Rewrite()
                    done.append(rewrite)
                    merge_norm(rewrite, before, unit)
                before = unit
        except BaseException:
            for rewrite in reversed(done):
                rewrite.remove()
            raise
        return done

    def register(self):
        """Nothing to register: :meth:`apply` returns the rewrites, which zennit removes."""

    def remove(self):
        """Nothing to remove here: each :class:`Rewrite` undoes itself."""

    def copy(self):
        """A fresh canonizer."""
        return BatchNormCanonizer()


# ---------------------------------------------------------------------------------------------------
# DenseNet


def pass_norm(rewrite: Rewrite, norm: nn.Module) -> None:
    """Give a batch norm the identity rule: its statistics, scale and shift are constants of the normalisation."""
    rewrite.set(norm, RULE_TAG, "pass")


class ForwardCanonizer(ModuleCanonizer):
    """A :class:`ModuleCanonizer` that gives each module type of :attr:`FORWARDS` a canonical forward.

    ``FORWARDS`` maps ``"module.path:Class"`` to the forward function; classes that do not import (an
    older torchvision, no timm) are left out.
    """

    FORWARDS: dict[str, Callable] = {}

    @classmethod
    def _forwards(cls) -> dict[type, Callable]:
        return {found: forward for path, forward in cls.FORWARDS.items() for found in _classes(path)}

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        """The module types of :attr:`FORWARDS` that import."""
        return tuple(cls._forwards())


class DenseNetCanonizer(ModuleCanonizer):
    """DenseNet's batch norms: merged where a convolution feeds them, the identity rule after a concatenation.

    In a dense layer (``norm1 -> relu -> conv1 -> norm2 -> relu -> conv2``) ``norm2`` merges into ``conv1``,
    and the stem's ``norm0`` into ``conv0``. ``norm1``, the transitions' ``norm`` and the final ``norm5``
    normalise a concatenation of many layers' outputs, each of which also feeds other layers with other
    norms: no single convolution before them can absorb them, and the ReLU between them and the next
    convolution stops a merge forward (a shift does not pass a ReLU). They keep computing as they are and
    get the identity rule, as layer norms do (:func:`pass_types`): a normalisation's statistics, scale and
    shift are its constants, and the relevance of each channel passes through whole. The alternatives
    measured on a random DenseNet-121 with biases, from ``norm5`` down to the first dense block: a
    per-channel affine layer under z+ lets the relevance vanish (0.007 at ``norm5``'s input, 0 three blocks
    down, as z+ counts a positive shift in its denominator), under the epsilon rule it flips its sign (-0.4,
    where a shift outweighs the signal); the identity rule keeps 0.87 to 1. The concatenation itself needs no
    rewrite: its gradient hands each part its own relevance.
    """

    families = "torchvision DenseNet-121/161/169/201 (_DenseLayer, _Transition, stem and final norm)"

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        """The DenseNet parts of torchvision: ``DenseNet``, ``_DenseLayer`` and ``_Transition``."""
        return _classes("torchvision.models.densenet:DenseNet", "torchvision.models.densenet:_DenseLayer",
                        "torchvision.models.densenet:_Transition")

    def rewrite(self, rewrite: Rewrite, module: nn.Module) -> bool:
        """Merge the batch norms the module owns directly, or tag them for the identity rule."""
        name = type(module).__name__
        if name == "_DenseLayer":
            merge_norm(rewrite, module.conv1, module.norm2)
            pass_norm(rewrite, module.norm1)
        elif name == "_Transition":
            pass_norm(rewrite, module.norm)
        else:
            features = module.features
            if hasattr(features, "norm0"):
                merge_norm(rewrite, features.conv0, features.norm0)
            if hasattr(features, "norm5"):
                pass_norm(rewrite, features.norm5)
        return True

    def apply(self, root_module):
        """Rewrite every DenseNet part (their forwards stay, so none is skipped as rewritten already)."""
        done = []
        try:
            for module in list(root_module.modules()):
                if self.applies_to(module):
                    rewrite = Rewrite()
                    done.append(rewrite)
                    self.rewrite(rewrite, module)
        except BaseException:
            for rewrite in reversed(done):
                rewrite.remove()
            raise
        return done


# ---------------------------------------------------------------------------------------------------
# residual blocks of torchvision


def _tv_mbconv_forward(self, input):
    return _add(self, input, self.stochastic_depth(self.block(input)))


def _tv_mobilenet_v2_forward(self, x):
    return _add(self, x, self.conv(x))


def _tv_mobilenet_v3_forward(self, input):
    return _add(self, input, self.block(input))


def _timm_inverted_residual_forward(self, x):
    shortcut = x
    if self.conv_s2d is not None:
        x = self.bn_s2d(self.conv_s2d(x))
    x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
    x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
    return _add(self, shortcut, self.drop_path(x))


def _timm_depthwise_separable_forward(self, x):
    shortcut = x
    if self.conv_s2d is not None:
        x = self.bn_s2d(self.conv_s2d(x))
    x = self.bn2(self.conv_pw(self.se(self.aa(self.bn1(self.conv_dw(x))))))
    return _add(self, shortcut, self.drop_path(x))


def _timm_edge_residual_forward(self, x):
    shortcut = x
    x = self.bn2(self.conv_pwl(self.se(self.aa(self.bn1(self.conv_exp(x))))))
    return _add(self, shortcut, self.drop_path(x))


class MBConvCanonizer(ForwardCanonizer):
    """Gives the residual addition of inverted-residual blocks a ``Sum`` module.

    torchvision's ``MBConv`` and ``FusedMBConv`` and MobileNet's ``InvertedResidual`` add their input to their
    output in place (``result += input``), timm's blocks with ``drop_path(x) + shortcut``; the gradient of
    that addition hands the whole relevance to both summands. The canonical forward computes the same
    branch and sums ``stack([shortcut, branch])`` in a ``Sum`` module, whose ``Norm`` rule splits the
    relevance in proportion. Stochastic depth and drop path are the identity in eval mode and stay in the
    branch. Blocks without a skip are left alone.
    """

    families = ("torchvision EfficientNet B0-B7 and V2 (MBConv, FusedMBConv), MobileNetV2/V3 (InvertedResidual); "
                "timm EfficientNet, EfficientNet-Lite, MobileNet, MNASNet (InvertedResidual, "
                "DepthwiseSeparableConv, EdgeResidual)")

    FORWARDS = {
        "torchvision.models.efficientnet:MBConv": _tv_mbconv_forward,
        "torchvision.models.efficientnet:FusedMBConv": _tv_mbconv_forward,
        "torchvision.models.mobilenetv2:InvertedResidual": _tv_mobilenet_v2_forward,
        "torchvision.models.mobilenetv3:InvertedResidual": _tv_mobilenet_v3_forward,
        "timm.models._efficientnet_blocks:InvertedResidual": _timm_inverted_residual_forward,
        "timm.models._efficientnet_blocks:DepthwiseSeparableConv": _timm_depthwise_separable_forward,
        "timm.models._efficientnet_blocks:EdgeResidual": _timm_edge_residual_forward,
    }

    def rewrite(self, rewrite: Rewrite, module: nn.Module) -> bool:
        """A ``Sum`` and the canonical forward for a block with a skip."""
        if not getattr(module, "use_res_connect", getattr(module, "has_skip", False)):
            return False
        rewrite.set(module, "canonizer_sum", Sum())
        rewrite.method(module, "forward", self._forwards()[type(module)])
        return True


def _regnet_forward(self, x):
    shortcut = x if self.proj is None else self.proj(x)
    return self.activation(_add(self, shortcut, self.f(x)))


class RegNetCanonizer(ModuleCanonizer):
    """Gives the residual addition of torchvision RegNet's ``ResBottleneckBlock`` a ``Sum`` module.

    The block adds its (projected) input to its bottleneck's output before the activation; the ``Sum``
    splits the relevance between the two by their contributions instead of doubling it.
    """

    families = "torchvision RegNetX/RegNetY (ResBottleneckBlock)"

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        """The ``ResBottleneckBlock`` of torchvision."""
        return _classes("torchvision.models.regnet:ResBottleneckBlock")

    def rewrite(self, rewrite: Rewrite, module: nn.Module) -> bool:
        """A ``Sum`` and the canonical forward."""
        rewrite.set(module, "canonizer_sum", Sum())
        rewrite.method(module, "forward", _regnet_forward)
        return True


# ---------------------------------------------------------------------------------------------------
# ConvNeXt


def _fold_scale(rewrite: Rewrite, linear: nn.Module, scale: torch.Tensor) -> None:
    """Multiply a layer's output channels by ``scale``: weights and bias (a layer scale folded into it)."""
    scale = scale.detach().reshape(-1).double()
    weight = linear.weight.data
    shape = [-1] + [1] * (weight.ndim - 1)
    rewrite.data(linear.weight, (weight.double() * scale.view(shape)).to(weight.dtype))
    if linear.bias is not None:
        rewrite.data(linear.bias, (linear.bias.data.double() * scale).to(weight.dtype))


def _tv_cnblock_forward(self, input):
    return _add(self, input, self.stochastic_depth(self.block(input)))


def _timm_convnext_forward(self, x):
    shortcut = x
    x = self.conv_dw(x)
    if self.use_conv_mlp:
        x = self.mlp(self.norm(x))
    else:
        x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    return _add(self, self.shortcut(shortcut), self.drop_path(x))


class ConvNeXtCanonizer(ModuleCanonizer):
    """ConvNeXt blocks: the layer scale folded into the linear layer before it, the residual addition a ``Sum``.

    A block computes ``input + stochastic_depth(layer_scale * mlp(norm(dwconv(input))))``. Multiplying by a
    parameter is no module with a rule: the gradient would scale the relevance by it. The scale is folded
    into the MLP's last linear layer (weights and bias of each output channel), the addition becomes a
    ``Sum``; stochastic depth is the identity in eval mode. The layer norms get the ``Pass`` rule from the
    composite (:func:`canonical_rules`).
    """

    families = "torchvision ConvNeXt (CNBlock); timm ConvNeXt (ConvNeXtBlock with an Mlp)"

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        """The ``CNBlock`` of torchvision and the ``ConvNeXtBlock`` of timm."""
        return _classes("torchvision.models.convnext:CNBlock", "timm.models.convnext:ConvNeXtBlock")

    def rewrite(self, rewrite: Rewrite, module: nn.Module) -> bool:
        """Fold the layer scale and give the block a ``Sum`` and its canonical forward."""
        if type(module).__name__ == "CNBlock":
            linear = [m for m in module.block if isinstance(m, nn.Linear)][-1]
            _fold_scale(rewrite, linear, module.layer_scale)
            forward = _tv_cnblock_forward
        else:
            if type(module.mlp) not in _classes("timm.layers.mlp:Mlp"):
                return False  # ConvNeXt-V2's GRN MLP normalises globally: not a block this canonizer knows
            if module.gamma is not None:
                _fold_scale(rewrite, module.mlp.fc2, module.gamma)
            forward = _timm_convnext_forward
        rewrite.set(module, "canonizer_sum", Sum())
        rewrite.method(module, "forward", forward)
        return True


# ---------------------------------------------------------------------------------------------------
# squeeze-excitation gates


# The gates are computed from a detached input (not under no_grad, which would keep zennit's hooks inside
# the gate from telling a signal that needs a gradient from one that does not) and detached again.


def _tv_se_forward(self, input):
    return self._scale(input.detach()).detach() * input


def _timm_squeeze_excite_forward(self, x):
    x_se = self.act1(self.conv_reduce(x.detach().mean((2, 3), keepdim=True)))
    return x * self.gate(self.conv_expand(x_se)).detach()


def _timm_se_module_forward(self, x):
    signal = x.detach()
    x_se = signal.mean((2, 3), keepdim=True)
    if self.add_maxpool:
        x_se = 0.5 * x_se + 0.5 * signal.amax((2, 3), keepdim=True)
    x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
    return x * self.gate(x_se).detach()


class GateCanonizer(ForwardCanonizer):
    """Squeeze-excitation gates pass all relevance to the signal they gate.

    ``x * gate(x)`` multiplies two functions of the input; its gradient hands the signal the relevance
    times the gate and the gate the rest, and neither is relevance. A gate only rescales channels, so the
    canonical forward computes it without gradient (it gets no relevance and costs no backward pass), and
    the module is tagged for the ``Pass`` rule: the relevance of ``x * gate`` is the relevance of ``x``.
    """

    families = ("squeeze-excitation: torchvision SqueezeExcitation (EfficientNet, MobileNetV3, RegNetY); "
                "timm SqueezeExcite (EfficientNet, MobileNetV3) and SEModule (SE-ResNet, ...)")

    FORWARDS = {
        "torchvision.ops.misc:SqueezeExcitation": _tv_se_forward,
        "timm.models._efficientnet_blocks:SqueezeExcite": _timm_squeeze_excite_forward,
        "timm.layers.squeeze_excite:SEModule": _timm_se_module_forward,
    }

    def rewrite(self, rewrite: Rewrite, module: nn.Module) -> bool:
        """Compute the gate without gradient and ask for the ``Pass`` rule."""
        rewrite.method(module, "forward", self._forwards()[type(module)])
        rewrite.set(module, RULE_TAG, "pass")
        return True


# ---------------------------------------------------------------------------------------------------
# ResNets: zennit's canonizer for torchvision, the same rewrite for timm


def _timm_residual(block, x, shortcut, act):
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    return act(_add(block, shortcut, x))


def _timm_basic_forward(self, x):
    shortcut = x
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    return _timm_residual(self, self.bn2(self.conv2(x)), shortcut, self.act2)


def _timm_bottleneck_forward(self, x):
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    return _timm_residual(self, self.bn3(self.conv3(x)), shortcut, self.act3)


class TimmResNetBlockCanonizer(ModuleCanonizer):
    """Gives timm ResNet ``BasicBlock`` and ``Bottleneck`` a ``Sum`` for their residual addition.

    The same rewrite zennit's ``ResNetCanonizer`` makes for torchvision's blocks; the shortcut may be
    downsampled by a convolution (resnet26, resnet50) or by average pooling and a convolution (resnet50d).
    """

    families = "timm ResNet (BasicBlock, Bottleneck)"

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        """The ResNet ``BasicBlock`` and ``Bottleneck`` of timm."""
        return _classes("timm.models.resnet:BasicBlock", "timm.models.resnet:Bottleneck")

    def rewrite(self, rewrite: Rewrite, module: nn.Module) -> bool:
        """A ``Sum`` and the canonical forward."""
        rewrite.set(module, "canonizer_sum", Sum())
        rewrite.method(module, "forward", _timm_basic_forward if type(module).__name__ == "BasicBlock"
                       else _timm_bottleneck_forward)
        return True


class ResNetCanonizer(CompositeCanonizer):
    """Merges batch norms and canonizes the residual blocks of torchvision and timm ResNets.

    zennit's own ``ResNetCanonizer`` (a ``Sum`` for the residual addition of every torchvision
    ``BasicBlock`` and ``Bottleneck``, ResNeXt and Wide ResNet included, and ``SequentialMergeBatchNorm``),
    plus the same rewrite of timm's blocks (:class:`TimmResNetBlockCanonizer`). On torchvision ResNets the
    relevance is zennit-crp's to the last bit, activations included; the price is zennit's merge, which
    leaves each merged norm computing ``x / sqrt(1 + eps)`` (on a random ResNeXt-50 the logits move by about
    1e-3 of their largest value, where :class:`BatchNormCanonizer` moves them by 2e-5).
    """

    families = ("torchvision ResNet, ResNeXt, Wide ResNet (BasicBlock, Bottleneck: zennit's ResNetCanonizer); "
                "timm ResNet, ResNet-D (BasicBlock, Bottleneck); their batch norms (zennit's merge)")

    def __init__(self):
        super().__init__((SequentialMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer(),
                          TimmResNetBlockCanonizer()))

    @classmethod
    def module_types(cls) -> tuple[type, ...]:
        """The ResNet blocks of torchvision and timm."""
        from torchvision.models.resnet import BasicBlock, Bottleneck
        return (BasicBlock, Bottleneck, *TimmResNetBlockCanonizer.module_types())


# ---------------------------------------------------------------------------------------------------
# rules of canonized modules, and the choice of canonizers


#: Activations the composite's ``Pass`` rule covers besides zennit's own (``torch.nn`` activations): timm's.
TIMM_ACTIVATIONS = tuple(f"timm.layers.activations:{name}" for name in (
    "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "GELU", "GELUTanh", "QuickGELU")) + \
    tuple(f"timm.layers.activations_me:{name}" for name in ("SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe",
                                                            "HardMishMe"))


def pass_types() -> tuple[type, ...]:
    """Module types an LRP composite passes relevance through unchanged where zennit gives them no rule.

    timm's activations (zennit knows those of ``torch.nn`` only) and layer norms: a layer norm's statistics
    are treated as constants, so it is an elementwise affine map, and the identity rule hands its output's
    relevance to its input whole (as AttnLRP does).
    """
    return (nn.LayerNorm, *_classes(*TIMM_ACTIVATIONS))


def canonical_rules(composite) -> None:
    """Make an LRP composite honour canonizer tags and pass relevance through timm activations and layer norms.

    The composite's module map is wrapped: a module tagged by a canonizer (:data:`RULE_TAG`) gets the
    tagged rule, every other module the composite's own rule, and a module the composite leaves without
    one gets ``Pass`` if it is of :func:`pass_types`.

    Parameters
    ----------
    composite : zennit.core.Composite
        Changed in place.
    """
    original = composite.module_map

    def module_map(ctx, name, module):
        tag = getattr(module, RULE_TAG, None)
        if tag is not None:
            return TAGGED_RULES[tag]
        hook = original(ctx, name, module)
        if hook is None and isinstance(module, pass_types()):
            return TAGGED_RULES["pass"]
        return hook

    composite.module_map = module_map


#: Canonizers :func:`choose_canonizers` may choose, in the order they are applied.
AUTOMATIC = {
    "resnet": ResNetCanonizer,
    "densenet": DenseNetCanonizer,
    "mbconv": MBConvCanonizer,
    "regnet": RegNetCanonizer,
    "convnext": ConvNeXtCanonizer,
    "se_gate": GateCanonizer,
    "batch_norm": BatchNormCanonizer,
}


def choose_canonizers(module: nn.Module) -> list[str]:
    """The canonizers an LRP composite needs on a network, by the module types found in it.

    Every canonizer of :data:`AUTOMATIC` whose module types occur; ``batch_norm`` only where neither
    ``resnet`` nor ``densenet`` merges the batch norms already.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    list of str
        Registered canonizer names, in the order they are applied.
    """
    found = {type(m) for m in module.modules()}
    chosen = [name for name, canonizer in AUTOMATIC.items() if found & set(canonizer.module_types())]
    if "batch_norm" in chosen and ({"resnet", "densenet"} & set(chosen)):
        chosen.remove("batch_norm")
    return chosen
