"""AttnLRP for vision transformers: lxt's rules as a composite that lives only while it is registered.

AttnLRP (Achtibat et al., ICML 2024) propagates relevance through a transformer in the gradient x input
framework: the backward pass carries a modified gradient, and the relevance of a layer is that gradient
times the layer's activation, as for Gradient x Activation. The rules, from the ``lxt`` package
(``lxt.efficient``), are

* **identity rule** on element-wise non-linearities (GELU, SiLU, ...): ``lxt.efficient.patches.non_linear_forward``;
* **identity rule** on normalisation: the standard deviation of a LayerNorm is a constant to the backward
  pass (``lxt.efficient.patches.layer_norm_forward``);
* **uniform rule** on the products of attention: the gradient reaching the queries and keys is divided by 4
  and that reaching the values by 2 (``lxt.efficient.rules.divide_gradient``), what lxt does for every
  attention it patches; the softmax keeps its gradient. With ``attention="cp"`` the queries and keys get no
  gradient at all (CP-LRP, ``stop_gradient``), the rule lxt applies to torchvision's ViT;
* linear layers, convolutions and residual additions keep their gradient (LRP-epsilon in this framework).

lxt applies its rules by replacing the ``forward`` of classes (``nn.LayerNorm.forward`` for every model in
the process, until the process ends). :class:`AttnLRP` instead replaces the ``forward`` of the module
*instances* of the one model it is registered to, and of the attention's query-key-value projection with a
forward hook, and removes every change in :meth:`AttnLRP.remove`: the relevance engine registers it on
entering and removes it on leaving, so a ResNet's LRP computed afterwards in the same process is untouched.
lxt's Gamma rule for linear layers (which patches zennit's rules with ``zennit.core.ParamMod``) is not
offered: the composite is lxt's efficient rules above.

Example
-------
>>> import timm, torch
>>> from polypure.attribution.transformer_rules import AttnLRP
>>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32).eval()
>>> composite = AttnLRP()
>>> composite.register(vit)                 # doctest: +SKIP
>>> composite.remove()                      # doctest: +SKIP
"""

from __future__ import annotations

import types
import warnings
from typing import Literal

import torch
from torch import nn
from zennit.core import Composite

from polypure.errors import ConfigError

#: How relevance passes through attention: AttnLRP's uniform rule, or CP-LRP (none through queries and keys).
ATTENTION_RULES = ("attnlrp", "cp")

#: Element-wise non-linearities that get the identity rule, by class name (timm's and open_clip's own GELUs
#: are classes of their own).
NON_LINEAR = (nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardswish)
NON_LINEAR_NAMES = frozenset({"GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish"})


def lxt_efficient():
    """The ``lxt.efficient`` modules polypure uses, imported once; one line naming the extra where lxt is missing.

    Returns
    -------
    (module, module)
        ``lxt.efficient.rules`` and ``lxt.efficient.patches``.
    """
    try:
        with warnings.catch_warnings():
            # lxt warns at import that its zennit patches need a newer zennit; polypure does not use them
            warnings.simplefilter("ignore")
            from lxt.efficient import patches, rules
    except ImportError as exc:
        raise ConfigError(f"composite 'attnlrp' needs lxt, which cannot be imported ({exc}); install the extra: "
                          "pip install 'polypure[lxt]'") from None
    return rules, patches


class _Undo:
    """A handle whose ``remove()`` runs an undo function once (zennit's handle lists call ``remove``)."""

    def __init__(self, undo):
        self._undo = undo

    def remove(self) -> None:
        if self._undo is not None:
            undo, self._undo = self._undo, None
            undo()


def _patch_forward(module: nn.Module, forward, keep_original: bool = False) -> _Undo:
    """Replace one instance's ``forward`` (the class and every other instance keep theirs)."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    if keep_original:
        module.original_forward = module.forward
    module.forward = types.MethodType(forward, module)

    def undo():
        if had:
            module.forward = previous
        else:
            del module.forward
        if keep_original:
            del module.original_forward
    return _Undo(undo)


def _is_non_linear(module: nn.Module) -> bool:
    return isinstance(module, NON_LINEAR) or type(module).__name__ in NON_LINEAR_NAMES


def _is_qkv_attention(module: nn.Module) -> bool:
    """Timm's attention (and its kin): one ``qkv`` linear layer whose output is queries, keys, values."""
    qkv = getattr(module, "qkv", None)
    return isinstance(qkv, nn.Linear) and hasattr(module, "num_heads") and qkv.out_features % 3 == 0


class AttnLRP(Composite):
    """AttnLRP through lxt's rules, registered to one model at a time and fully removed afterwards.

    Parameters
    ----------
    canonizers : list, optional
        zennit canonizers to apply first (vision transformers need none).
    attention : {"attnlrp", "cp"}
        The rule inside attention: AttnLRP's uniform rule, or CP-LRP.
    """

    def __init__(self, canonizers=None, attention: Literal["attnlrp", "cp"] = "attnlrp"):
        if attention not in ATTENTION_RULES:
            raise ConfigError(f"composite 'attnlrp': attention must be one of {', '.join(ATTENTION_RULES)}, "
                              f"not {attention!r}")
        super().__init__(canonizers=canonizers)
        self.attention = attention
        self.patched = 0

    def register(self, module: nn.Module) -> None:
        """Apply the canonizers, then lxt's rules to the modules of ``module`` (see the module docstring)."""
        rules, patches = lxt_efficient()
        super().register(module)
        self.patched = 0
        for child in module.modules():
            if isinstance(child, nn.LayerNorm):
                self.handles.append(_patch_forward(child, patches.layer_norm_forward))
            elif _is_non_linear(child):
                self.handles.append(_patch_forward(child, patches.non_linear_forward, keep_original=True))
            elif isinstance(child, nn.MultiheadAttention):
                self.handles.append(_patch_forward(child, self._multi_head_forward(rules), keep_original=True))
            elif _is_qkv_attention(child):
                self.handles.append(child.qkv.register_forward_hook(self._qkv_hook(rules)))
            else:
                continue
            self.patched += 1

    def _scale(self, rules, query, key, value):
        """Queries, keys and values with the attention rule applied to the gradient they receive."""
        if self.attention == "cp":
            return rules.stop_gradient(query), rules.stop_gradient(key), value
        return rules.divide_gradient(query, 4), rules.divide_gradient(key, 4), rules.divide_gradient(value, 2)

    def _multi_head_forward(self, rules):
        scale = self._scale

        def forward(self, query, key, value, *args, **kwargs):
            # the input projections are linear, so a rule on the gradient of their inputs is the same rule on
            # the gradient of the queries, keys and values themselves
            return self.original_forward(*scale(rules, query, key, value), *args, **kwargs)
        return forward

    def _qkv_hook(self, rules):
        scale = self._scale

        def hook(module, args, output):
            query, key, value = output.chunk(3, dim=-1)
            return torch.cat(scale(rules, query, key, value), dim=-1)
        return hook


def attnlrp(canonizers=None, attention: Literal["attnlrp", "cp"] = "attnlrp") -> AttnLRP:
    """The ``attnlrp`` composite (see :class:`AttnLRP`)."""
    return AttnLRP(canonizers=canonizers, attention=attention)
