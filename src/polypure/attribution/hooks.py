"""Forward hooks that record layer outputs, optionally rewrite one, and stop the forward early.

Stopping once every requested layer has produced its output skips the rest of the network (for a
block_2 target, layer4 and the head never run). Rewriting the output of the lowest attribution layer
is how the relevance stage forwards each reference image once and still gives every (neuron,
reference) pair its own row above that layer.

Every recorded output is channels first, ``(B, C, *positions)``, whatever the module's own layout: a
transformer block's ``(B, T, D)`` tokens-by-channels output is recorded as ``(B, D, T)`` (its channel axis
is set with :func:`set_channel_axis`). The recorded tensor is a view, and the network goes on with the
same view moved back, so autograd sees the recorded tensor on the path to the output and nothing is copied.
Top-K statistics, relevance sums and neuron indices therefore treat tokens as positions, as they treat a
CNN's pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from polypure.errors import PolypureError, StopForward

#: Attribute of a module that names the channel axis of its outputs when it is not 1 (``-1`` for the
#: ``(B, T, D)`` outputs of transformer blocks), or :data:`TOKENS`. Kept on the module, so that it travels
#: with it when a model is pickled to a worker process.
CHANNEL_AXIS_ATTR = "_polypure_channel_axis"

#: The layout of a vision transformer's modules: a 3-D output is (B, T, D), tokens by channels, and any
#: other is channels first (the convolutions, batch norms and activations of a hybrid ViT's stem).
TOKENS = "tokens"


def set_channel_axis(module: nn.Module, axis: int | str) -> None:
    """Declare the channel axis of a module's outputs: an int, or :data:`TOKENS`; 1 removes the declaration.

    An int applies to outputs of three or more dimensions (``-1`` for channels-last (B, H, W, C) maps too); a
    ``(B, C)`` output is channels first anyway.
    """
    if axis == 1:
        module.__dict__.pop(CHANNEL_AXIS_ATTR, None)
    elif axis == TOKENS:
        setattr(module, CHANNEL_AXIS_ATTR, TOKENS)
    else:
        setattr(module, CHANNEL_AXIS_ATTR, int(axis))


def channel_axis(module: nn.Module) -> int | str:
    """The channel axis declared for a module's outputs (1 unless :func:`set_channel_axis` said otherwise)."""
    return getattr(module, CHANNEL_AXIS_ATTR, 1)


def _moved_axis(output: torch.Tensor, axis: int | str) -> int | None:
    """The axis to move to position 1 for a channels-first view, or None where the output already is one."""
    if axis == TOKENS:
        return 2 if output.ndim == 3 else None
    if output.ndim < 3:
        return None
    axis = axis % output.ndim
    return None if axis == 1 else axis


@contextmanager
def tap_layers(modules: dict[str, nn.Module], transforms: dict[str, Callable] | None = None,
               stop: bool = True):
    """Record the outputs of named modules during forward passes inside the context.

    Parameters
    ----------
    modules : dict of str to Module
        Layer name to module.
    transforms : dict of str to callable, optional
        ``fn(output) -> output`` applied to (and replacing) a layer's output before it is recorded; it
        receives and returns the channels-first view.
    stop : bool
        Raise :class:`StopForward` as soon as every module has produced its output.

    Yields
    ------
    dict
        Filled with ``name -> output`` (channels first) as the forward runs; cleared by the caller between
        passes.
    """
    outputs: dict[str, torch.Tensor] = {}
    transforms = transforms or {}
    handles = []
    names_by_module: dict[int, list[str]] = {}
    for name, module in modules.items():
        names_by_module.setdefault(id(module), []).append(name)

    def make_hook(names):
        def hook(module, args, output):
            packed = output
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise PolypureError(f"layer {names[0]!r} does not output a tensor")
            moved = _moved_axis(output, channel_axis(module))
            if moved is not None:
                output = output.movedim(moved, 1)
            for name in names:
                if name in outputs:
                    raise PolypureError(f"layer {name!r} runs more than once per forward pass (a module reused "
                                        "inside the network, like a shared ReLU); choose a module that runs once")
                if name in transforms:
                    output = transforms[name](output)
                outputs[name] = output
            if stop and len(outputs) == len(modules):
                raise StopForward
            if moved is not None:
                output = output.movedim(1, moved)
            if isinstance(packed, tuple):
                # a module returning (output, extra), like nn.MultiheadAttention: only the first is replaced
                return (output, *packed[1:])
            if isinstance(packed, list):
                return [output, *packed[1:]]
            return output
        return hook

    try:
        # one hook per module, however many names point at it
        for module in {id(m): m for m in modules.values()}.values():
            handles.append(module.register_forward_hook(make_hook(names_by_module[id(module)])))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def forward_to(model: nn.Module, x: torch.Tensor, outputs: dict) -> None:
    """Run ``model(x)`` inside :func:`tap_layers`, treating an early stop as normal completion."""
    outputs.clear()
    try:
        model(x)
    except StopForward:
        pass


def passes_through(model: nn.Module, module: nn.Module, target: nn.Module, sample: torch.Tensor) -> bool:
    """Whether every path from the input to ``target``'s output runs through ``module``'s output.

    Only then may a forward pass run each image once up to ``module`` and give each row of a larger batch
    its own copy above it (the relevance engine's shared forward, the ablations of the selectivity stage):
    a branch that bypasses ``module`` (a shortcut from the input) would see one row per image while the
    rest sees one row per copy. Tested once with autograd on one sample: ``module``'s output is cut from the
    graph and doubled, and the input must then have no gradient from ``target``.

    Parameters
    ----------
    model : Module
    module, target : Module
        The layer that would be expanded, and the layer whose output is needed (a later one).
    sample : Tensor
        One input (a batch of one).
    """
    x = sample.detach().clone().requires_grad_(True)
    expand = {"module": lambda out: out.detach()[[0, 0]].requires_grad_(True)}
    try:
        with torch.enable_grad(), tap_layers({"module": module, "target": target}, transforms=expand) as outputs:
            forward_to(model, x, outputs)
            output = outputs["target"]
            if not output.requires_grad:
                return True
            bypass, = torch.autograd.grad(output.sum(), x, allow_unused=True)
    except RuntimeError:
        # a shortcut that meets the doubled rows fails to broadcast
        return False
    return bypass is None


def probe_layers(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> tuple[dict, list[str]]:
    """Shapes (without batch) and forward order of layers, checked to run exactly once.

    Parameters
    ----------
    model : Module
    modules : dict of str to Module
    x : Tensor
        One input batch (a single sample is enough).

    Returns
    -------
    shapes : dict of str to tuple
    order : list of str
        Layer names in the order their outputs appear.

    Raises
    ------
    PolypureError
        If a layer does not run or runs more than once.
    """
    with torch.no_grad(), tap_layers(modules, stop=False) as out:
        forward_to(model, x, out)
        missing = [name for name in modules if name not in out]
        if missing:
            raise PolypureError(f"layer(s) {', '.join(missing)} did not run in a forward pass of the model")
        order = list(out)
        shapes = {name: tuple(out[name].shape[1:]) for name in modules}
    return shapes, order
