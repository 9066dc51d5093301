"""Attribution rules by name: zennit composites and canonizers, plus polypure's ``gradient``.

``gradient`` is the empty composite: the plain gradient, which times the activation gives Gradient x
Activation (the seed paper's relevance). Every name in ``zennit.composites.COMPOSITES``
(``epsilon_plus_flat``, ``epsilon_gamma_box``, ...) is available as well. Canonizers rewrite the network
so that LRP rules apply cleanly (``resnet`` merges batch norms and gives residual additions a module of
their own), for torchvision and timm ResNets alike.

Example
-------
>>> from polypure.composites import make_composite
>>> composite = make_composite("epsilon_plus_flat", ["resnet"])
"""

from __future__ import annotations

import torch
from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES as ZENNIT_COMPOSITES
from zennit.core import Composite
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, VGGCanonizer

from .registry import Registry

#: Composite factories ``factory(canonizers) -> zennit.core.Composite``.
COMPOSITES = Registry("composite", group="polypure.composites")
#: Canonizer factories ``factory() -> zennit Canonizer``.
CANONIZERS = Registry("canonizer", group="polypure.canonizers")

#: Composites whose backward pass carries a (possibly modified) gradient rather than relevance; their
#: layer relevance is gradient x activation. All other composites propagate relevance itself.
GRADIENT_COMPOSITES = frozenset({"gradient", "guided_backprop", "deconvnet"})

COMPOSITES.register("gradient", lambda canonizers=None: Composite(canonizers=canonizers))
for _name, _cls in ZENNIT_COMPOSITES.items():
    COMPOSITES.register(_name, _cls)


def make_composite(name: str, canonizers: list[str] | None = None) -> Composite:
    """A fresh composite by name, with the named canonizers.

    Parameters
    ----------
    name : str
        ``gradient`` or any registered (zennit) composite name.
    canonizers : list of str, optional

    Returns
    -------
    zennit.core.Composite
    """
    factory = COMPOSITES.get(name)
    return factory(canonizers=[CANONIZERS.get(c)() for c in canonizers or []])


def times_activation(composite: str, setting="auto") -> bool:
    """Whether layer relevance is the backward signal times the activation.

    The backward signal of the plain gradient (and of guided backprop or deconvnet) is a gradient, and
    relevance is gradient x activation (METHOD.md section 2). Under an LRP composite zennit already
    returns relevance at every layer output, so multiplying again by the activation would not be LRP.
    """
    if setting != "auto":
        return bool(setting)
    return composite in GRADIENT_COMPOSITES


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
