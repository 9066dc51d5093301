"""Models to explain: one ``create_model`` front door with a registry behind it.

A model name is one of

* ``torchvision:NAME`` -- any ``torchvision.models`` builder (``torchvision:resnet34``),
* ``timm:NAME`` -- any timm model (``timm:resnet34.a1_in1k``, ``timm:vit_small_patch16_224``, DINOv2 as
  ``timm:vit_small_patch14_dinov2``),
* ``open_clip:NAME`` -- the image tower of an open_clip model (``open_clip:ViT-B-32``, weights a tag such as
  ``openai`` or a local checkpoint of the whole CLIP model),
* ``python:MODULE:FACTORY`` -- a factory function in an importable module or a ``.py`` file,
* a registered name (``polypure list models``), such as ``demo_resnet`` or ``efficientnet_lite0``.

Weights are explicit: ``None`` for random initialisation, a library tag (``DEFAULT``) that the library
downloads, or a local file (safetensors, or a state dict that ``torch.load(weights_only=True)`` reads).

Vision transformers (timm, open_clip and torchvision ViTs) get the aliases ``block_0`` .. ``block_{n-1}``
(the residual stream after each block), ``mlp_0`` .. ``mlp_{n-1}`` (the MLP's hidden neurons, after its
activation) and ``logits`` where there is a classification head. Their layers output tokens by channels,
(B, T, D): the channel axis of every such layer is declared with :func:`polypure.attribution.hooks.set_channel_axis`,
so that tokens are positions to polypure, as pixels are for a CNN. ``model.layers`` may declare it for any
other layer (``{name: {module: PATH, channel_axis: -1}}``). An alias may start a path: ``block_3.attn``.

Example
-------
>>> from polypure.models.factory import create_model
>>> model = create_model("torchvision:resnet18")          # random weights
>>> model.layers["block_3"]
'layer4'
>>> vit = create_model("timm:vit_tiny_patch16_224", img_size=32)
>>> vit.layers["mlp_0"], vit.channel_axis("block_0")
('blocks.0.mlp.act', 'tokens')
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from polypure.attribution.hooks import TOKENS, channel_axis, set_channel_axis
from polypure.config.paths import names_a_file, require_file
from polypure.errors import ConfigError
from polypure.models.hub import download_error, fetch, host_reachable
from polypure.registry import Registry, import_factory

#: Registered model factories: ``factory(weights=None, **kwargs) -> nn.Module | ExplainedModel``.
MODELS = Registry("model", group="polypure.models")
MODELS.register_lazy("demo_resnet", "polypure.models.demo_resnet:demo_resnet")
MODELS.register_lazy("demo_vit", "polypure.models.demo_vit:demo_vit")
MODELS.register_lazy("efficientnet_lite0", "polypure.models.efficientnet_lite:efficientnet_lite0")


@dataclass
class ExplainedModel:
    """A network together with what polypure needs to know about it.

    Parameters
    ----------
    module : torch.nn.Module
        The network, in eval mode.
    layers : dict of str to str
        Layer aliases (``block_3``) mapped to module paths (``layer4``).
    name : str
        How the model was named in the config.
    preprocessing : dict, optional
        Input preparation that belongs to the weights: ``mean``, ``std`` and optionally ``image_size``;
        used when ``data.normalize`` is ``auto``.
    canonizers : list of str
        Canonizer names applied automatically when an LRP composite is asked for; empty: those whose module
        types the network has (:func:`polypure.attribution.canonizers.choose_canonizers`).
    channel_axes : dict of str to int
        Channel axes of layers (aliases or module paths) whose outputs are not channels first, such as
        ``-1`` for (B, T, D) tokens; declared on their modules by :meth:`declare_channel_axes`. Transformer
        layers found by :func:`token_modules` need no entry.
    """

    module: nn.Module
    layers: dict[str, str] = field(default_factory=dict)
    name: str = "in-memory"
    preprocessing: dict[str, Any] | None = None
    canonizers: list[str] = field(default_factory=list)
    channel_axes: dict[str, int] = field(default_factory=dict)

    def module_path(self, layer: str) -> str:
        """The module path behind an alias, or ``layer`` itself if it is already a module path.

        An alias may start a path (``block_3.mlp.fc1`` is ``blocks.3.mlp.fc1`` on a timm ViT).

        Raises
        ------
        ConfigError
            If neither an alias nor a module of that name exists.
        """
        path = self.layers.get(layer, layer)
        head, dot, rest = layer.partition(".")
        if layer not in self.layers and dot and head in self.layers:
            path = f"{self.layers[head]}.{rest}" if self.layers[head] else rest
        if path == "":
            return path
        try:
            self.module.get_submodule(path)
        except AttributeError:
            raise ConfigError(self._unknown_layer(layer)) from None
        return path

    def _unknown_layer(self, layer: str) -> str:
        """The message for a layer that is neither alias nor module, with the names a user most likely meant."""
        modules = [name for name, _ in self.module.named_modules() if name]
        if layer in self.layers and self.layers[layer] != layer:
            # an alias pointing at nothing: the alias is fine, its module path is the mistake
            close = difflib.get_close_matches(self.layers[layer], modules, n=4, cutoff=0.5)
            hint = f"; closest modules: {', '.join(close)}" if close else ""
            return (f"model.layers.{layer}: {self.layers[layer]!r} is not a module of {self.name}{hint}")
        close = difflib.get_close_matches(layer, [*self.layers, *modules], n=4, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        if self.layers:
            where = f"aliases: {', '.join(sorted(self.layers))}"
        else:
            # without aliases the top-level children are the stages a user picks layers from
            children = [name for name, _ in self.module.named_children()]
            shown = ", ".join(children[:12]) + (f", ... ({len(children)} in all)" if len(children) > 12 else "")
            where = f"no aliases; top-level modules: {shown}"
        return f"layer {layer!r} is neither an alias nor a module of {self.name} ({where}{hint})"

    def submodule(self, layer: str) -> nn.Module:
        """The module behind an alias or module path."""
        return self.module.get_submodule(self.module_path(layer))

    def channel_axis(self, layer: str) -> int | str:
        """The channel axis of a layer's outputs as polypure reads them.

        1 (channels first), another axis, or ``"tokens"`` (a vision transformer's module: -1 for (B, T, D)
        outputs, 1 for any other).
        """
        return channel_axis(self.submodule(layer)) if self.module_path(layer) else 1

    def declare_channel_axes(self) -> None:
        """Declare the channel axis of token layers on their modules (found ones, then ``channel_axes``)."""
        for module in token_modules(self.module):
            set_channel_axis(module, TOKENS)
        for layer, axis in self.channel_axes.items():
            path = self.module_path(layer)
            if not path:
                raise ConfigError(f"model.layers.{layer}: the model input is channels first; channel_axis "
                                  "applies to a module's outputs")
            set_channel_axis(self.module.get_submodule(path), axis)


def _vit_parts(module: nn.Module) -> tuple[str, list[str], str | None, str] | None:
    """Where a vision transformer keeps its blocks: (kind, block paths, head path, MLP activation suffix).

    timm's ``VisionTransformer`` (ViT, DeiT, DINOv2 and their kin), open_clip's image tower and torchvision's
    ``VisionTransformer``; None for any other network.
    """
    kind = f"{type(module).__module__}.{type(module).__name__}"
    children = dict(module.named_children())
    if kind.startswith("timm.") and isinstance(children.get("blocks"), nn.Sequential) and "patch_embed" in children:
        blocks = [f"blocks.{i}" for i in range(len(children["blocks"]))]
        head = "head" if isinstance(children.get("head"), nn.Linear) else None
        return "timm", blocks, head, "mlp.act"
    transformer = children.get("transformer")
    if kind.startswith("open_clip.") and transformer is not None and hasattr(transformer, "resblocks"):
        if not getattr(transformer, "batch_first", True):
            raise ConfigError(f"{kind}: this open_clip version runs its transformer tokens first (T, B, D); "
                              "polypure needs batch first (open_clip >= 2.24)")
        return "open_clip", [f"transformer.resblocks.{i}" for i in range(len(transformer.resblocks))], None, \
            "mlp.gelu"
    if kind.startswith("torchvision.") and hasattr(children.get("encoder"), "layers"):
        names = [name for name, _ in module.encoder.layers.named_children()]
        heads = children.get("heads")
        head = "heads.head" if heads is not None and isinstance(getattr(heads, "head", None), nn.Linear) else None
        return "torchvision", [f"encoder.layers.{name}" for name in names], head, "mlp.1"
    return None


def token_modules(module: nn.Module) -> list[nn.Module]:
    """The modules of a vision transformer, whose 3-D outputs are (B, T, D) tokens by channels.

    Every module of the network: outputs of other dimensions (the patch embedding's or a convolutional
    stem's (B, D, h, w) maps) stay channels first (:data:`polypure.attribution.hooks.TOKENS`). Empty for a network that
    is not a known vision transformer.
    """
    if _vit_parts(module) is None:
        return []
    return list(module.modules())


def default_layers(module: nn.Module) -> dict[str, str]:
    """Aliases for well-known architectures.

    ResNets: their stages as ``block_0`` .. ``block_3`` plus ``logits``. Vision transformers: ``block_i``
    (each block's output, the residual stream), ``mlp_i`` (the MLP's hidden neurons after the activation)
    and ``logits`` where there is a classification head.
    """
    children = dict(module.named_children())
    if all(f"layer{i}" in children for i in range(1, 5)):
        aliases = {f"block_{i}": f"layer{i + 1}" for i in range(4)}
        if isinstance(children.get("fc"), nn.Linear):
            aliases["logits"] = "fc"
        return aliases
    vit = _vit_parts(module)
    if vit is not None:
        _, blocks, head, act = vit
        aliases = {f"block_{i}": path for i, path in enumerate(blocks)}
        aliases.update({f"mlp_{i}": f"{path}.{act}" for i, path in enumerate(blocks)})
        if head is not None:
            aliases["logits"] = head
        return aliases
    return {}


def default_canonizers(module: nn.Module) -> list[str]:
    """The canonizers an LRP composite gets on this network: those whose module types it has.

    ``resnet`` for ResNets, ``mbconv``, ``se_gate`` and ``batch_norm`` for EfficientNets, ...
    (:func:`polypure.attribution.canonizers.choose_canonizers`).
    """
    from polypure.attribution.canonizers import choose_canonizers
    return choose_canonizers(module)


# ---------------------------------------------------------------------------------------------------
# weights


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a ``torch.save`` file, never through plain pickle.

    A checkpoint that wraps the state dict under ``state_dict`` or ``model`` is unwrapped.

    Raises
    ------
    ConfigError
        If the file cannot be read as weights (bad input: exit status 2).
    """
    path = require_file(path, "weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # weights_only refuses a pickle that would run code: it is named here like any unreadable file
        raise ConfigError(f"weights file {str(path)!r} could not be read: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return state


def apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` strictly, with an error that names what does not fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise ConfigError(f"weights {source!r} do not fit the model: {'; '.join(parts)}")
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# builders per scheme


def _torchvision(arch: str, weights: str | None, **kwargs) -> ExplainedModel:
    import torchvision

    try:
        builder_weights = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        known = ", ".join(torchvision.models.list_models()[:8])
        raise ConfigError(f"model.name: torchvision has no model {arch!r} (e.g. {known}, ...)") from None
    if weights is None:
        module = torchvision.models.get_model(arch, weights=None, **kwargs)
        return ExplainedModel(module, name=f"torchvision:{arch}")
    try:
        entry = builder_weights[weights.replace(builder_weights.__name__ + ".", "")]
    except KeyError:
        tags = ", ".join(["DEFAULT"] + [w.name for w in builder_weights])
        raise ConfigError(f"model.weights: torchvision has no weights {weights!r} for {arch}; tags: {tags}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(entry.url).path).name
    if not cached.exists() and not host_reachable(entry.url):
        raise download_error(f"torchvision:{arch}", weights, "model.weights", f"{urlparse(entry.url).hostname} unreachable")
    try:
        module = torchvision.models.get_model(arch, weights=entry, **kwargs)
    except OSError as exc:
        raise download_error(f"torchvision:{arch}", weights, "model.weights", str(exc).splitlines()[0]) from None
    meta = entry.transforms()
    preprocessing = {"mean": list(meta.mean), "std": list(meta.std), "image_size": int(meta.crop_size[0]),
                     "resize": int(meta.resize_size[0])}
    return ExplainedModel(module, name=f"torchvision:{arch}", preprocessing=preprocessing)


def _timm(arch: str, weights: str | None, **kwargs) -> ExplainedModel:
    import timm

    if weights is not None and weights not in ("DEFAULT", "pretrained"):
        raise ConfigError(f"model.weights: timm models take the weights tag in the name (timm:{arch}.TAG); "
                          f"use weights: DEFAULT or a local file, not {weights!r}")
    pretrained = weights is not None
    if not timm.is_model(arch):
        raise ConfigError(f"model.name: timm has no model {arch!r}")
    if pretrained:
        module = fetch(lambda: timm.create_model(arch, pretrained=True, **kwargs), what=f"timm:{arch}",
                       tag="DEFAULT", key="model.weights")
    else:
        module = timm.create_model(arch, pretrained=False, **kwargs)
    # the tag's preprocessing also fits its weights loaded from a local file, and is harmless for random ones
    cfg = module.pretrained_cfg or {}
    preprocessing = None
    if "mean" in cfg:
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        fixed = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if fixed:
            # a ViT built for another input size (img_size=...) takes only that size
            size = int(fixed[-1] if isinstance(fixed, (tuple, list)) else fixed)
        preprocessing = {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "image_size": size,
                         "resize": round(size / cfg.get("crop_pct", 0.875))}
    return ExplainedModel(module, name=f"timm:{arch}", preprocessing=preprocessing)


def _as_explained(obj: Any, name: str) -> ExplainedModel:
    if isinstance(obj, ExplainedModel):
        return obj
    if isinstance(obj, nn.Module):
        return ExplainedModel(obj, name=name)
    raise ConfigError(f"model.name: {name} returned {type(obj).__name__}, not a torch.nn.Module")


def layer_specs(layers: dict[str, Any] | None) -> tuple[dict[str, str], dict[str, int]]:
    """Split ``model.layers`` entries into aliases (alias to module path) and declared channel axes.

    An entry is a module path, or a mapping (or :class:`~polypure.config.settings.LayerSpec`) with ``module`` and
    ``channel_axis``.
    """
    paths, axes = {}, {}
    for alias, spec in (layers or {}).items():
        if isinstance(spec, str):
            paths[alias] = spec
            continue
        spec = spec if isinstance(spec, dict) else spec.model_dump()
        paths[alias] = spec["module"]
        if spec.get("channel_axis") is not None:
            axes[alias] = int(spec["channel_axis"])
    return paths, axes


def attach_layers(model: ExplainedModel, layers: dict[str, Any] | None = None) -> ExplainedModel:
    """Give a model its default aliases, the config's ``model.layers`` over them, and its channel axes.

    Every alias is checked to name a module, and the channel axes are declared on the modules
    (:meth:`ExplainedModel.declare_channel_axes`).
    """
    paths, axes = layer_specs(layers)
    model.layers = {**default_layers(model.module), **model.layers, **paths}
    model.channel_axes = {**model.channel_axes, **axes}
    for alias in model.layers:
        model.module_path(alias)
    model.declare_channel_axes()
    return model


def _open_clip(arch: str, weights: str | None, **kwargs) -> ExplainedModel:
    """The image tower of an open_clip model (its ``visual`` module), with the model's preprocessing."""
    import open_clip

    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.name: open_clip has no model {arch!r}{hint}")
    if weights is None:
        clip = open_clip.create_model(arch, pretrained=None, **kwargs)
    else:
        clip = fetch(lambda: open_clip.create_model(arch, pretrained=weights, **kwargs), what=f"open_clip:{arch}",
                     tag=weights, key="model.weights")
    cfg = open_clip.get_model_preprocess_cfg(clip)
    size = int(cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"])
    preprocessing = {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "image_size": size, "resize": size}
    return ExplainedModel(clip.visual, name=f"open_clip:{arch}", preprocessing=preprocessing)


def _tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's part of a whole open_clip checkpoint (keys ``visual.*``); a tower's own as it is."""
    if any(key.startswith("visual.") for key in state):
        return {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
    return state


def create_model(name: str, weights: str | None = None, layers: dict[str, Any] | None = None,
                 **kwargs) -> ExplainedModel:
    """Build a model by name, with explicit weights, ready to explain.

    Parameters
    ----------
    name : str
        ``torchvision:NAME``, ``timm:NAME``, ``open_clip:NAME``, ``python:MODULE:FACTORY`` or a registered
        name.
    weights : str, optional
        None (random initialisation), a library tag such as ``DEFAULT``, or a local weights file.
    layers : dict, optional
        Extra or replacing layer aliases, merged over the model's defaults: alias to module path, or to
        ``{"module": PATH, "channel_axis": AXIS}`` for a layer whose outputs are not channels first.
    **kwargs
        Passed to the model's builder (``num_classes=10``, ...).

    Returns
    -------
    ExplainedModel
        In eval mode, with default layer aliases and canonizers filled in.
    """
    weight_file = None
    if names_a_file(weights):
        weight_file, weights = require_file(weights, "model.weights: file"), None

    if name.startswith("torchvision:"):
        model = _torchvision(name.split(":", 1)[1], weights, **kwargs)
    elif name.startswith("timm:"):
        model = _timm(name.split(":", 1)[1], weights, **kwargs)
    elif name.startswith("open_clip:"):
        model = _open_clip(name.split(":", 1)[1], weights, **kwargs)
    elif name.startswith("python:"):
        factory = import_factory(name.split(":", 1)[1], "model.name")
        call_kwargs = dict(kwargs)
        if weights is not None:
            call_kwargs["weights"] = weights
        try:
            built = factory(**call_kwargs)
        except Exception as exc:  # the user's own code: its error in one line, with where it came from
            raise ConfigError(f"model.name: {name} raised {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        model = _as_explained(built, name)
        model.name = name
    else:
        factory = MODELS.get(name)
        model = _as_explained(factory(weights=weights, **kwargs), name)
        model.name = name

    if weight_file is not None:
        state = load_state_dict_file(weight_file)
        if name.startswith("open_clip:"):
            state = _tower_state(state)
        apply_state_dict(model.module, state, str(weight_file))
    attach_layers(model, layers)
    if not model.canonizers:
        model.canonizers = default_canonizers(model.module)
    model.module.eval()
    return model


def build_model(config, device: str | torch.device = "cpu") -> ExplainedModel:
    """The model a run's config names, in eval mode on ``device``, built as every process of a run builds it.

    Random initialisation is seeded by ``config.seed``, so workers that each build the model from the same
    config get the same weights.
    """
    torch.manual_seed(config.seed)
    spec = config.model
    model = create_model(spec.name, spec.weights, spec.layers, **spec.kwargs)
    model.module.eval().to(device)
    return model
