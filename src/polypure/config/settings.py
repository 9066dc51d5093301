"""The run configuration: a validated YAML file, overridable key by key.

Every key is checked before any work starts: an unknown key, a wrong type, a missing file, a path of
the wrong kind (a folder where a file is expected, :mod:`polypure.config.paths`) or a selection that
selects nothing (:mod:`polypure.config.selection`) stops the run with one line that names the key and the
problem.

Example
-------
>>> from polypure.config.settings import load_config
>>> cfg = load_config(None, ["topk.k=60", "relevance.n_refs=60"])  # the bundled demo, changed
>>> cfg.topk.k, cfg.model.name
(60, 'demo_resnet')
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polypure.config.paths import kind_of, names_a_file, require_file, require_folder
from polypure.config.selection import selection_form
from polypure.errors import ConfigError

#: Keys that change how fast a run goes but not what it computes; a store made with other values of
#: these keys is still the same result.
RUNTIME_KEYS = (
    "name", "device", "store",
    "data.batch_size", "data.num_workers",
    "topk.checkpoint_every",
    "relevance.batch_size",
    "selectivity.batch_size",
    "report",
    "executor",
    "commit_every",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_python_spec(value: str, what: str) -> str:
    """``python:MODULE:FACTORY``, where a MODULE ending in .py must be an existing regular file."""
    parts = value.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        raise ValueError(f"{value!r} is not of the form python:MODULE:FACTORY")
    if parts[1].endswith(".py"):
        require_file(parts[1], what)
    return value


def _non_empty(value: list | None, what: str) -> list | None:
    """An empty list where a list selects something selects nothing: refused (None keeps the default)."""
    if value is not None and len(value) == 0:
        raise ValueError(f"an empty list selects no {what}; give at least one, or leave the key out")
    return value


class LayerSpec(_Section):
    """A layer alias with the layout of its outputs (``model.layers: {name: {module: PATH, channel_axis: -1}}``).

    ``channel_axis`` says where the channels are in outputs of three or more dimensions: 1 (channels first,
    a CNN's (B, C, H, W)) or -1 (tokens by channels, a transformer's (B, T, D)). Layers of timm, open_clip and
    torchvision ViTs are recognised without it.
    """

    module: str
    """Path of the module inside the model (``blocks.3.mlp.act``), or an alias followed by a path."""
    channel_axis: int = 1
    """Where the channels are in outputs of three or more dimensions: 1 (channels first, a CNN's (B, C, H, W)) or -1
    (tokens by channels, a transformer's (B, T, D)).
    """


class ModelSection(_Section):
    """Which network to explain and where its layers are."""

    name: str = "torchvision:resnet34"
    """The network: ``torchvision:NAME``, ``timm:NAME`` (ViTs and DINOv2 included: ``timm:vit_small_patch14_dinov2``),
    ``open_clip:NAME`` (the image tower of an open_clip model: ``open_clip:ViT-B-32``), ``python:MODULE:FACTORY``
    (MODULE may be a ``.py`` file path), or a registered name (``demo_resnet``, ``demo_vit``,
    ``efficientnet_lite0``; ``polypure list models``).
    """
    weights: str | bool | None = None
    """``null`` = random initialisation; a library tag (``DEFAULT``, ``IMAGENET1K_V1``; for timm ``DEFAULT`` loads the
    tag in the name; for open_clip a pretrained tag such as ``openai``); or a local file (``.safetensors``, or a
    state dict read with ``torch.load(weights_only=True)``; for open_clip the whole CLIP model's or the tower's).
    ``true`` means ``DEFAULT``, ``false`` means ``null``.
    """
    layers: dict[str, str | LayerSpec] = Field(default_factory=dict)
    """Layer aliases: alias -> module path, or ``{module: PATH, channel_axis: -1}`` for a layer whose outputs are
    tokens by channels (B, T, D) that polypure does not recognise by itself; merged over the model's defaults.
    ResNets get ``block_0..block_3`` (``layer1..layer4``) and ``logits`` (``fc``); vision transformers (timm,
    open_clip, torchvision) get ``block_i`` (block i's output, the residual stream), ``mlp_i`` (its MLP's hidden
    neurons after the activation: ``blocks.i.mlp.act``, ``transformer.resblocks.i.mlp.gelu``,
    ``encoder.layers.encoder_layer_i.mlp.1``) and ``logits`` where there is a classification head. A layer may also
    be an alias followed by a path: ``block_3.attn``.
    """
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the model builder (``num_classes: 10``)."""

    @field_validator("name")
    @classmethod
    def _name_file(cls, value: str) -> str:
        return _check_python_spec(value, "model file") if value.startswith("python:") else value

    @field_validator("weights")
    @classmethod
    def _weights_file(cls, value):
        if value is True:
            return "DEFAULT"
        if value is False:
            return None
        if names_a_file(value):
            require_file(value, "weights file")
        return value


class NormalizeSpec(_Section):
    """Per-channel mean and std that turn [0, 1] pixels into model inputs."""

    mean: list[float]
    """Per-channel mean subtracted from pixels in [0, 1]."""
    std: list[float]
    """Per-channel standard deviation (positive) the pixels are divided by after the mean is subtracted."""

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.mean) != len(self.std):
            raise ValueError("normalize.mean and normalize.std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("normalize.std must be positive")
        return self


class DataSection(_Section):
    """Which images, and how they are prepared for the model."""

    kind: str = "imagefolder"
    """``imagefolder`` (one subfolder per class), ``images`` (one flat folder), ``npz``, ``synthetic`` (the demo's
    concept images), ``python:MODULE:FACTORY``, or a kind a package registers under the entry-point group
    ``polypure.datasets``.
    """
    root: Path | None = None
    """Folder of the images, for ``imagefolder`` and ``images`` (required there)."""
    path: Path | None = None
    """The ``.npz`` file, for ``npz`` (required there): images ``(N, H, W)`` or ``(N, H, W, C)`` uint8."""
    images_key: str = "images"
    """``npz``: the array holding the images."""
    labels_key: str | None = "labels"
    """``npz``: the array holding the labels; ``null`` for none."""
    labels: Literal["auto", "none", "prefix"] = "auto"
    """``auto`` (folder names, npz labels, none for flat folders), ``none``, or ``prefix``: the class of a file in a
    flat folder is the position of its file-name prefix before ``_`` in the sorted list of prefixes (with all 1000
    ImageNet wnids present: the usual ImageNet order), or in the order of ``data.classes``.
    """
    classes: Path | None = None
    """A file listing the class prefixes in order, one per line (for ``labels: prefix``)."""
    image_size: int | None = Field(224, ge=1)
    """Side of the centre crop after the short side is resized to ``round(image_size * 256 / 224)`` (Resize(256) +
    CenterCrop(224)); ``null`` keeps the native size.
    """
    resize: int | None = Field(None, ge=1)
    """Side the short edge is resized to, instead of the one derived from ``image_size``."""
    normalize: Literal["auto", "imagenet", "none"] | NormalizeSpec = "auto"
    """``auto`` (the model's own mean and std if it has them, else ImageNet's for RGB), ``imagenet``, ``{mean: [...],
    std: [...]}``, or ``none`` (pixels in [0, 1]).
    """
    batch_size: int = Field(32, ge=1)
    """Images per batch of the data loader."""
    num_workers: int = Field(2, ge=0)
    """Worker processes of the data loader (0: load in the main process)."""
    limit: int | None = Field(None, ge=1)
    """Keep only the first N samples (at most as many as the data has)."""
    synthetic: dict[str, Any] = Field(default_factory=dict)
    """Options of the ``synthetic`` kind (see ``data.synthetic.*``)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Options of a registered data kind (its factory reads them); passed to a ``python:`` data factory, which returns
    a polypure dataset or a torch dataset of ``image`` or ``(image, label)`` items with images in [0, 1] (float
    tensors or PIL images), resized and normalised like image files.
    """

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value.startswith("python:"):
            return _check_python_spec(value, "data file")
        # imported here rather than at the top: the data kinds bring torch, which the rest of a config does not need
        from polypure.data.datasets import DATASETS

        if value not in DATASETS:
            # 'memory' is reserved for a dataset passed from Python, not a kind to choose
            kinds = ", ".join(name for name in DATASETS.names() if name != "memory")
            raise ValueError(f"unknown data kind {value!r}; use {kinds} or python:MODULE:FACTORY")
        return value

    @model_validator(mode="after")
    def _paths(self):
        # the keys of the built-in kinds, checked before any work starts; a plugin kind checks its own options
        # when it builds its dataset
        if self.kind in ("imagefolder", "images"):
            if self.root is None:
                raise ValueError(f"data.root is required for data.kind {self.kind!r}")
            require_folder(self.root, "data.root: folder")
        if self.kind == "npz":
            if self.path is None:
                raise ValueError("data.path (the .npz file) is required for data.kind 'npz'")
            require_file(self.path, "data.path: file")
        if self.labels == "prefix" and self.kind != "images":
            raise ValueError("data.labels: 'prefix' applies to data.kind 'images' only")
        if self.classes is not None:
            require_file(self.classes, "data.classes: file")
        return self

    @property
    def resize_to(self) -> int | None:
        """Side the short edge is resized to before the centre crop (256 for 224, as in docs/method.md)."""
        if self.image_size is None:
            return None
        return self.resize if self.resize is not None else round(self.image_size * 256 / 224)


class TopKSection(_Section):
    """Which channels' most-activating samples to find."""

    layers: list[str] = Field(default_factory=lambda: ["block_3"])
    """Layers whose channels get top-K references; the relevance targets and planted layers are added to them."""
    k: int = Field(50, ge=1)
    """References kept per channel (at most as many as the data has samples)."""
    statistic: Literal["max", "mean", "cls"] = "max"
    """How a sample's value of a channel is computed: ``max`` or ``mean`` over spatial positions (the tokens of a
    transformer layer), or ``cls``: the class token's value (token layers only). A non-spatial output such as a
    logit is its own value.
    """
    checkpoint_every: int = Field(50, ge=1)
    """Batches between checkpoints of the streaming top-K pass."""


NeuronSpec = Literal["all"] | list[int] | str | int


def _check_neurons(value):
    # before pydantic's own parsing, so that `true`, `[]`, `[-1]` or '-8:' get the one message of the rule
    # (polypure.config.selection; pydantic puts the key in front); the range is checked once the layer's
    # width is known
    return selection_form(value, key="")


class TargetSection(_Section):
    """One target layer, which of its neurons to explain, and at which lower layers."""

    layer: str
    """The layer whose neurons are explained."""
    neurons: NeuronSpec = "all"
    """``all``, a channel id, a list of channel ids, or ``"start:stop"`` (ids ``start`` to
    ``stop - 1``; an open end is the first or the last channel). Never empty and never past the layer's channels:
    a stop past them is an error, not clipped, and negative numbers are refused (no counting from the end).
    """
    attribution_layers: list[str]
    """Lower layers whose relevance is recorded, all in one backward pass (at least one)."""

    _layers = field_validator("attribution_layers")(classmethod(lambda cls, v: _non_empty(v, "attribution layer")))

    _neurons = field_validator("neurons", mode="before")(classmethod(lambda cls, v: _check_neurons(v)))


class PlantedSection(_Section):
    """Virtual neurons made from pairs of real channels, with a known split (docs/method.md, Planted neurons)."""

    pairs: int = Field(16, ge=1)
    """How many pairs of real channels become virtual neurons: at least 1, at most half the layer's channels (each
    channel is in one pair at most).
    """
    layer: str = "block_3"
    """The layer whose channels are paired."""
    mode: Literal["sum", "max"] | list[Literal["sum", "max"]] = "sum"
    """How a pair is combined: ``sum`` (superposed) or ``max`` (gated); a list (``[sum, max]``) makes a virtual neuron
    of each mode per pair.
    """
    seed: int = 0
    """Seeds the choice of the pairs."""
    max_overlap: float = Field(0.1, ge=0, le=1)
    """The largest share of top-K references two channels of a pair may have in common."""
    attribution_layers: list[str] | None = None
    """Lower layers whose relevance is recorded for the virtual neurons; ``null`` = those of the real target on the
    same layer.
    """

    _layers = field_validator("attribution_layers")(classmethod(lambda cls, v: _non_empty(v, "attribution layer")))
    _modes = field_validator("mode")(classmethod(lambda cls, v: v if isinstance(v, str) else _non_empty(v, "mode")))

    @property
    def modes(self) -> list[str]:
        """The modes as a list, in the order given."""
        return [self.mode] if isinstance(self.mode, str) else list(dict.fromkeys(self.mode))


class CompositeSpec(BaseModel):
    """A composite with parameters: its registered ``name`` and the keyword arguments of its class."""

    model_config = ConfigDict(extra="allow")

    name: str
    """The composite's registered name (``epsilon_gamma_box``); every other key is a keyword argument of its class."""

    @property
    def params(self) -> dict[str, Any]:
        """The composite's parameters from the mapping form (empty for a plain name)."""
        return dict(self.model_extra or {})


#: ``relevance.composite``: a registered name, or ``{name: ..., <parameter>: <value>, ...}``.
CompositeField = str | CompositeSpec


def _group_id(value: str, kind: str, reserved, reserved_as: str) -> str:
    """A variant or dictionary id: it becomes an HDF5 group name and part of space names, so no '/' or ':'."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", value):
        raise ValueError(f"{kind} id {value!r}: use letters, digits, '_', '-' and '.', starting with a letter")
    if value in reserved:
        raise ValueError(f"{kind} id {value!r} is reserved ({reserved_as})")
    return value


def _composite_form(value: Any) -> Any:
    # one message for a wrong form, instead of one per branch of the union
    if isinstance(value, dict) and "name" not in value:
        raise ValueError("a composite with parameters needs its name: {name: epsilon_gamma_box, low: ..., ...}")
    if not isinstance(value, (str, dict, CompositeSpec)):
        raise ValueError(f"expected a composite name or a mapping {{name: ..., <parameter>: ...}}, not {value!r}")
    return value


#: The id of the variant a config without ``relevance.variants`` computes; its spaces keep plain layer names.
DEFAULT_VARIANT = "default"
#: Between a variant id and a layer in the name of a space: ``lrp:block_2``.
VARIANT_SEPARATOR = ":"
#: Names a variant id may not take: they are datasets of a relevance target in the store.
_RESERVED_VARIANT_IDS = ("neurons", "complete", "activation")


def space_name(variant: str, layer: str) -> str:
    """The space of a variant's relevance at a layer: ``<variant>:<layer>``, plain ``<layer>`` for ``default``.

    Examples
    --------
    >>> space_name("lrp", "block_2"), space_name("default", "block_2")
    ('lrp:block_2', 'block_2')
    """
    return layer if variant == DEFAULT_VARIANT else f"{variant}{VARIANT_SEPARATOR}{layer}"


def split_space(space: str) -> tuple[str, str]:
    """``(variant, layer)`` of a space name, the inverse of :func:`space_name`."""
    variant, sep, layer = space.partition(VARIANT_SEPARATOR)
    return (variant, layer) if sep else (DEFAULT_VARIANT, space)


class _NamedComposite:
    """The name and parameters of a section's ``composite``, whichever form the config used."""

    @property
    def composite_name(self) -> str:
        """The composite's registered name, whichever form the config used."""
        return self.composite if isinstance(self.composite, str) else self.composite.name

    @property
    def composite_params(self) -> dict[str, Any]:
        """The composite's parameters from the config (empty for the plain-name form)."""
        return {} if isinstance(self.composite, str) else self.composite.params


class VariantSection(_NamedComposite, _Section):
    """One attribution rule of ``relevance.variants``: an ``id`` and the rule's composite, canonizers, product.

    Its spaces are named ``<id>:<layer>`` (plain ``<layer>`` for the id ``default``).
    """

    id: str
    """Names the variant and its spaces (``<id>:<layer>``; ``default`` keeps plain layer names): letters, digits, ``_ -
    .``, starting with a letter, not ``neurons``, ``complete`` or ``activation``.
    """
    composite: CompositeField = "gradient"
    """The variant's composite, as ``relevance.composite``."""
    canonizers: list[str] = Field(default_factory=list)
    """The variant's canonizers, as ``relevance.canonizers``."""
    times_activation: Literal["auto"] | bool = "auto"
    """Whether the variant multiplies by the activation, as ``relevance.times_activation``."""

    _composite_form = field_validator("composite", mode="before")(classmethod(lambda cls, v: _composite_form(v)))

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _group_id(value, "variant", _RESERVED_VARIANT_IDS, "a dataset of every relevance target")


class RelevanceSection(_NamedComposite, _Section):
    """Conditional relevance of lower layers to target neurons (docs/method.md, Conditional relevance)."""

    target_layer: str = "block_3"
    """The layer whose neurons are explained (one target; see ``relevance.targets`` for several)."""
    neurons: NeuronSpec = "all"
    """Neurons of ``target_layer`` to explain: ``all``, a channel id, a list of channel ids, or ``"start:stop"`` (ids ``start`` to
    ``stop - 1``; an open end is the first or the last channel). Never empty and never past the layer's channels:
    a stop past them is an error, not clipped, and negative numbers are refused (no counting from the end).
    """
    attribution_layers: list[str] = Field(default_factory=lambda: ["block_0", "block_1", "block_2"])
    """Lower layers whose relevance is recorded for ``target_layer``, all in one backward pass (at least one)."""
    targets: list[TargetSection] | None = None
    """Several targets instead of ``target_layer``, ``neurons`` and ``attribution_layers``: a list of ``{layer,
    neurons, attribution_layers}``. ``[]`` explains the planted neurons alone (refused without ``planted``).
    """
    n_refs: int = Field(50, ge=1)
    """References per neuron (at most ``topk.k``)."""
    composite: CompositeField = "gradient"
    """The relevance rule: ``gradient`` (Gradient x Activation), any name in ``zennit.composites.COMPOSITES``
    (``epsilon_plus_flat``, ...; ``polypure list composites``), ``attnlrp`` (AttnLRP for vision transformers through
    lxt, extra ``polypure[lxt]``; ``{name: attnlrp, attention: cp}`` for CP-LRP inside attention), or a composite
    with parameters: ``{name: epsilon_gamma_box, low: -2.1, high: [2.2, 2.4, 2.6]}``. The parameters are the keyword
    arguments of the composite's class (unknown ones are errors), numbers where zennit's default is one
    (``epsilon``, ``gamma``, ``stabilizer``) and ``zero_params: [bias]`` to set parameters to zero for the rules;
    the input bounds ``low`` / ``high`` (a number, or one per channel) default to the data's normalised pixel
    range. ``layer_map`` and ``first_map`` take rule objects and are Python only.
    """
    canonizers: list[str] = Field(default_factory=list)
    """zennit canonizers (``resnet``, ``merge_bn``, ``vgg``); with an LRP composite and none given, the model's own
    (ResNets: ``resnet``, torchvision and timm alike).
    """
    times_activation: Literal["auto"] | bool = "auto"
    """Multiply the backward signal by the activation; ``auto`` = only for gradient-type composites (``gradient``,
    ``guided_backprop``, ``deconvnet``, ``attnlrp``), whose signal is a gradient rather than a relevance.
    """
    variants: list[VariantSection] | None = None
    """Several rules in one store instead of ``composite``, ``canonizers`` and ``times_activation``: a list of ``{id,
    composite, canonizers, times_activation}``. They share the top-K, the references and the rows; a variant's
    spaces are named ``<id>:<layer>`` (``lrp:block_2``), except the id ``default``, which keeps plain layer names.
    """
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1)] = 64
    """(neuron, reference) rows per backward pass; ``auto``: on a GPU, measured from one small pass's peak memory and
    60 % of the free memory, else 64. Resolved once per target by the driver, so Ray workers cut the same chunks.
    """
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """``fp32``, ``tf32`` (TensorFloat-32 products on Ampere+ GPUs; the same as ``fp32`` on a CPU) or ``bf16`` (the
    forward under bfloat16 autocast, on CPU and GPU); relevance is reduced and normalised in float32 at every
    precision. Recorded with each variant's rule: a store made at another precision is stale.
    """
    planted: PlantedSection | list[PlantedSection] | None = None
    """Virtual neurons with a known split, made from pairs of real channels: ``{pairs: 16, layer: block_3, mode: sum,
    seed: 0, max_overlap: 0.1, attribution_layers: null}``; a list of such entries plants on several layers.
    """

    _neurons = field_validator("neurons", mode="before")(classmethod(lambda cls, v: _check_neurons(v)))
    _composite_form = field_validator("composite", mode="before")(classmethod(lambda cls, v: _composite_form(v)))
    _layers = field_validator("attribution_layers")(classmethod(lambda cls, v: _non_empty(v, "attribution layer")))
    _planted = field_validator("planted")(classmethod(
        lambda cls, v: v if not isinstance(v, list) else _non_empty(v, "planted entry (null plants none)")))

    @model_validator(mode="after")
    def _one_form(self):
        # a key equal to its default is no conflict (a resolved config lists every key)
        defaults = RelevanceSection.model_construct()
        short = {key for key in ("target_layer", "neurons", "attribution_layers")
                 if key in self.model_fields_set and getattr(self, key) != getattr(defaults, key)}
        if self.targets is not None and short:
            message = f"give either relevance.targets or relevance.{'/'.join(sorted(short))}, not both"
            # a layer name that is no layer of the targets is likely a typo too: say it now, not one fix later
            known = {name for spec in self.targets for name in [spec.layer, *(spec.attribution_layers or [])]}
            given = [self.target_layer] if "target_layer" in short else []
            given += list(self.attribution_layers or []) if "attribution_layers" in short else []
            for name in given:
                if name not in known and (close := difflib.get_close_matches(name, sorted(known), n=1)):
                    message += f"; and {name!r} is no layer of relevance.targets (did you mean {close[0]!r}?)"
            raise ValueError(message)
        rule = {key for key in ("composite", "canonizers", "times_activation")
                if key in self.model_fields_set and getattr(self, key) != getattr(defaults, key)}
        if self.variants is not None and rule:
            raise ValueError(f"give either relevance.variants or relevance.{'/'.join(sorted(rule))}, not both "
                             "(each variant names its own)")
        if self.variants is not None:
            if not self.variants:
                raise ValueError("relevance.variants: give at least one variant, or leave the key out")
            ids = [v.id for v in self.variants]
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                raise ValueError(f"relevance.variants: id {twice[0]!r} is used twice")
        if self.targets is not None and not self.targets and not self.planted_list:
            raise ValueError("relevance.targets: an empty list with no relevance.planted selects no neuron to "
                             "explain; give a target, plant neurons, or leave the key out")
        if self.targets is not None:
            layers = [t.layer for t in self.targets]
            twice = sorted({layer for layer in layers if layers.count(layer) > 1})
            if twice:
                raise ValueError(f"relevance.targets: layer {twice[0]!r} is listed twice (give one entry per layer)")
        return self

    @property
    def rows_per_pass(self) -> int:
        """``batch_size``, with ``auto`` read as 64: for the passes that are not worth measuring (checks, crops)."""
        return 64 if self.batch_size == "auto" else self.batch_size

    @property
    def variant_list(self) -> list[VariantSection]:
        """The rule variants: ``variants``, or the one ``composite`` / ``canonizers`` / ``times_activation`` give.

        That one has the id ``default``, whose spaces keep plain layer names.
        """
        if self.variants is not None:
            return list(self.variants)
        return [VariantSection(id=DEFAULT_VARIANT, composite=self.composite, canonizers=self.canonizers,
                               times_activation=self.times_activation)]

    @property
    def target_list(self) -> list[TargetSection]:
        """The real targets, whichever form the config used."""
        if self.targets is not None:
            return list(self.targets)
        return [TargetSection(layer=self.target_layer, neurons=self.neurons,
                              attribution_layers=self.attribution_layers)]

    @property
    def planted_list(self) -> list[PlantedSection]:
        """The planted entries as a list, whichever form the config used."""
        if self.planted is None:
            return []
        return [self.planted] if isinstance(self.planted, PlantedSection) else list(self.planted)


class ClusterMethod(BaseModel):
    """One clusterer: its registered ``name``, an optional storage ``id`` and its parameters."""

    model_config = ConfigDict(extra="allow")

    name: str
    """A registered clusterer (``kmeans``, ``hdbscan``, plugins: ``polypure list clusterers``) or ``MODULE:CLASS``
    (``sklearn.cluster:AgglomerativeClustering``); every other key is a parameter of it, checked against its
    signature. The run's ``seed`` becomes ``random_state`` (or ``seed``) where the clusterer takes it.
    """
    id: str | None = None
    """Names the result in the store (``/clusters/<target>/<space>/<id>``); default: the name."""
    spaces: list[str] | None = None
    """The spaces this method clusters, among the run's (``cluster.spaces``); ``null`` = all of them, except for
    ``dominant``, which clusters the dictionary spaces among them and is refused on any other space.
    """

    _spaces = field_validator("spaces")(classmethod(lambda cls, v: _non_empty(v, "space (null: every space)")))

    @property
    def params(self) -> dict[str, Any]:
        """The clusterer's parameters: every key but ``name``, ``id`` and ``spaces``."""
        return dict(self.model_extra or {})

    @property
    def method_id(self) -> str:
        """Where the clustering is stored: ``id``, or else ``name``."""
        return self.id or self.name


class ClusterSection(_Section):
    """How each neuron's references are clustered, per feature space (docs/method.md, Spaces and clustering)."""

    spaces: list[str] | None = None
    """Spaces to cluster in (attribution layers, ``activation``, or evaluator embeddings); ``null`` = every attribution
    layer, then ``activation``.
    """
    methods: list[ClusterMethod] = Field(
        default_factory=lambda: [ClusterMethod(name="kmeans", n_clusters=2)])
    """Clusterers with their parameters, each ``{name, id, <parameter>: <value>, ...}``."""

    _spaces = field_validator("spaces")(classmethod(lambda cls, v: _non_empty(v, "space (null: every space)")))
    _methods = field_validator("methods")(classmethod(lambda cls, v: _non_empty(v, "clusterer")))

    @model_validator(mode="after")
    def _unique_ids(self):
        seen = set()
        for i, method in enumerate(self.methods):
            if method.method_id in seen:
                raise ValueError(f"cluster.methods[{i}]: two methods would be stored as {method.method_id!r}; "
                                 "give each an 'id'")
            seen.add(method.method_id)
        return self


class EvaluateSection(BaseModel):
    """Reference spaces and metrics (docs/method.md, Evaluation). Extra keys configure evaluators by name."""

    model_config = ConfigDict(extra="allow")

    references: list[str] = Field(default_factory=list)
    """Evaluators whose embeddings are reference spaces for the distance correlation and PURE's cluster distances
    (``clip``, ``dinov2``, ``labels``, plugins, or a name configured with ``evaluator:``). Every other key of the
    section, ``evaluate.<name>``, holds the settings of evaluator ``<name>``.
    """
    ground_truth: Literal["auto"] | list[str] = "auto"
    """Label sets to score clusterings against: ``planted``, a factor (``shape``, ``colour``, ``texture``) or
    ``class``; ``auto`` = all the data has.
    """
    mixture_share: float = Field(0.2, gt=0, le=1)
    """A neuron is polysemantic by a label when two or more of its values each make up at least this share of its top-K
    references.
    """
    polysemantic_by: str | None = None
    """Report the neurons polysemantic by this label as a group of their own."""
    batch_size: int = Field(32, ge=1)
    """Images per evaluator batch."""

    def settings(self, name: str) -> dict[str, Any]:
        """The settings of evaluator ``name`` (``evaluate.<name>``), empty where none are given."""
        value = (self.model_extra or {}).get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"evaluate.{name}: expected a mapping of settings, got {value!r}")
        return dict(value)


class CompareSection(_Section):
    """Which per-neuron metrics the evaluate stage compares between spaces, and how (:mod:`polypure.evaluation.comparisons`)."""

    baseline: str | None = None
    """The space every other space is compared with (a layer, ``activation``, an evaluator); ``null`` = each target's
    last attribution layer.
    """
    baseline_method: str | None = None
    """A leaderboard: every (space, cluster method) is compared with the baseline space clustered by this method id,
    and the run prints ranked tables instead of the summary (saved all the same). Without it, each method's spaces
    are compared with the baseline space of that method. Not with ``pairs``.
    """
    metrics: list[str] | None = None
    """Metric labels to compare, as the summary shows them (``ARI shape``, ``corr clip``, ``gain clip``); ``null`` =
    every metric the store has. A label no run can give stops the run before the first stage; one the store lacks,
    or a space no target has, stops the evaluate stage (exit status 2).
    """
    pairs: list[tuple[str, str]] | None = None
    """Explicit ``[space_a, space_b]`` pairs instead of every space against the baseline."""
    n_resamples: int = Field(2000, ge=1000)
    """Bootstrap resamples of each interval (at least 1000), seeded with ``seed``."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Coverage of the bootstrap intervals."""
    top: int | None = Field(None, ge=1)
    """Lines per leaderboard on screen (the baseline's always), or of the comparisons table under the summary;
    ``null`` = all of a leaderboard, a screenful (24) of the comparisons. The CSV has every line."""

    @model_validator(mode="after")
    def _leaderboard(self):
        if self.baseline_method is not None and self.pairs is not None:
            raise ValueError("compare.baseline_method ranks every space and method against the baseline; it does "
                             "not combine with compare.pairs")
        return self


class SelectivitySection(_Section):
    """The causal test of every split: ablate each cluster's circuit and see whom it silences (docs/how-to/selectivity.md).

    For each neuron, attribution layer and clustering made in that layer's relevance space, the circuit of a
    cluster is the ``m`` channels of the layer with the largest mean relevance over its references. Zeroing
    them should silence the neuron on that cluster's references and spare the others': the selectivity is
    the own minus the other relative drop of activation, averaged over the clusters, beside a null from
    random sets of ``m`` channels. In a dictionary space the circuit is the ``m`` concepts with the largest mean
    contribution, and ablating it subtracts their terms from the dictionary's layer.
    """

    enabled: bool = False
    """Run the ``selectivity`` stage (after ``cluster``, before ``evaluate``); its scores join the summary, the
    comparisons and the neuron pages.
    """
    m: int = Field(8, ge=1)
    """Channels (or dictionary concepts) in a cluster's circuit: those of the layer with the largest mean relevance
    (concepts: contribution) over the cluster's references. A layer with ``m`` channels or fewer, or a dictionary
    space keeping ``m`` concepts per neuron or fewer, is not tested (ablating all of it tells nothing), with a warning.
    """
    null_draws: int = Field(5, ge=1)
    """Random sets of ``m`` channels (concepts among the neuron's kept ones) per cluster whose ablation gives the null,
    averaged (seeded with ``seed``).
    """
    spaces: list[str] | None = None
    """Spaces to test: attribution layers (``block_2``, ``lrp:block_2``), whose circuits are channels, and dictionaries
    (``sae``), whose circuits are concepts; ``null`` = every attribution layer of every target and rule variant and
    every dictionary. Other spaces (``activation``, evaluators) have nothing to ablate.
    """
    batch_size: int = Field(512, ge=1)
    """(reference, ablation) rows per forward pass at the most; a pass always holds one whole ablation of a
    neuron's references.
    """

    _spaces = field_validator("spaces")(classmethod(lambda cls, v: _non_empty(v, "space")))


class ReportSection(_Section):
    """The browsable HTML report written at the end of ``polypure run``."""

    enabled: bool = True
    """Write the report at the end of ``polypure run``."""
    out: Path | None = None
    """The report folder (a folder, or nothing yet); ``null`` = ``<store without .h5>_report`` beside the store."""
    neurons: int | None = Field(None, ge=1)
    """Neuron pages per target (every neuron is listed on the index); ``null`` = 8. A cap: a target with fewer
    neurons gets a page for each, so a config's value also fits runs narrowed to fewer neurons.
    """
    view: Literal["auto", "full", "crop"] = "auto"
    """Thumbnails of whole images (``full``) or of the crop view's crops (``crop``); ``auto``: crops where they are
    stored.
    """


class ExecutorSection(_Section):
    """Where the top-K, relevance and embedding work runs: this process, or a Ray cluster.

    Results do not depend on it (a Ray run writes the same store as a local one), so it is a runtime key.
    """

    kind: Literal["local", "ray"] = "local"
    """``local`` (this process) or ``ray`` (a Ray cluster; extra ``polypure[ray]``); ``--executor`` on the command
    line.
    """
    address: str | None = None
    """``null`` (a Ray already initialised in this process, else a local one started for the run), ``auto`` (the
    cluster this machine belongs to), ``HOST:PORT`` or ``ray://HOST:PORT``.
    """
    workers: int = Field(2, ge=1)
    """Ray actors, started once per run, that compute the top-K shards, relevance ranges and embedding batches of every
    stage. ``--workers`` on the command line.
    """
    gpus_per_worker: float = Field(0.0, ge=0, le=1)
    """GPUs of each actor (a fraction shares a GPU); with GPUs a worker computes on ``cuda`` unless ``device:
    cpu``.
    """
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs of each actor."""
    shard_size: int = Field(1024, ge=1)
    """Samples per top-K shard, at most a fair share per worker (rounded up to a whole number of ``data.batch_size``
    batches).
    """
    neurons_per_task: int = Field(16, ge=1)
    """Neurons per relevance range, at most a fair share per worker (rounded up to a whole number of the stage's
    chunks).
    """

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not (value == "auto" or re.fullmatch(r"(ray://)?[\w.\-]+:\d+", value)):
            raise ValueError(f"executor.address must be null, auto, HOST:PORT or ray://HOST:PORT, not {value!r}")
        return value


# ---------------------------------------------------------------------------------------------------
# dictionaries: sparse autoencoders and NMF learned on a layer's activations (polypure.dictionaries)

#: Names a dictionary id may not take: datasets of a relevance target, or the activation space.
_RESERVED_DICTIONARY_IDS = ("neurons", "complete", "activation")


class DictionarySection(_Section):
    """One dictionary learned on a layer's activations, whose concepts make a space named by its ``id``.

    Each position of the layer's output (a pixel of a CNN map, a token of a transformer layer) is a sample; a
    neuron of the layer is decomposed into the concepts' contributions at the position its top-K statistic
    chose (docs/method.md, Dictionary spaces).
    """

    id: str
    """Names the dictionary and its space (``cluster.spaces: [block_2, activation, sae]``): letters, digits, ``_ -
    .``, starting with a letter; not ``activation``, an attribution layer's or an evaluator's name.
    """
    layer: str
    """The layer whose activations it learns; the relevance targets on this layer (and its planted neurons) get its
    space.
    """
    kind: str = "topk_sae"
    """``topk_sae`` (overcomplete's TopKSAE: a linear and batch-norm encoder that keeps the ``top_k`` largest codes,
    on activations centred by their training mean), ``nmf`` (overcomplete's NMF: non-negative codes and concepts,
    for non-negative activations), or a kind registered under the entry-point group ``polypure.dictionaries``. The
    built-in kinds need the extra ``polypure[dict]``.
    """
    n_concepts: int = Field(ge=1)
    """Concepts of the dictionary (its rows)."""
    top_k: int | None = Field(None, ge=1)
    """``topk_sae``: concepts active per position (at most ``n_concepts``); ``null`` = ``max(n_concepts // 10, 1)``."""
    epochs: int = Field(20, ge=1)
    """Training epochs, each checkpointed in the store: passes over the training positions (``topk_sae``), or rounds
    of codes solved for the dictionary, then the dictionary updated for the codes (``nmf``).
    """
    lr: float = Field(5e-4, gt=0)
    """``topk_sae``: the learning rate of Adam."""
    batch_size: int = Field(1024, ge=1)
    """``topk_sae``: positions per optimisation step."""
    max_samples: int = Field(50_000, ge=2)
    """Positions drawn from the data with the run's seed, training and held-out together (every position where the
    data has fewer).
    """
    holdout: float = Field(0.1, gt=0, lt=1)
    """Share of the drawn positions held out of training: the dictionary's R², dead concepts and active concepts per
    position are measured on them.
    """
    store_top: int = Field(32, ge=1)
    """Concepts kept per neuron in its space: those with the largest mean contribution over its references (at most
    ``n_concepts``).
    """
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options of a registered kind (its class reads them); the built-in kinds take none."""

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _group_id(value, "dictionary", _RESERVED_DICTIONARY_IDS,
                         "a space or dataset of every relevance target")

    @model_validator(mode="after")
    def _counts(self):
        if self.top_k is not None and self.top_k > self.n_concepts:
            raise ValueError(f"top_k ({self.top_k}) must be at most n_concepts ({self.n_concepts})")
        return self

    @property
    def concepts_kept(self) -> int:
        """Concepts per neuron in the space: ``store_top``, at most ``n_concepts``."""
        return min(self.store_top, self.n_concepts)

    def signature(self, seed: int) -> dict[str, Any]:
        """What the trained dictionary depends on (``store_top`` and ``id`` only name and cut its space)."""
        return {**self.model_dump(mode="json", exclude={"id", "store_top"}), "seed": seed}


def check_dictionary_ids(config: Config) -> None:
    """Dictionary ids must be unique and must not be an attribution layer's or an evaluator's name (a space's).

    Raises
    ------
    ValueError
        Naming the entry and the clash (pydantic reports it with the key).
    """
    rel = config.relevance
    layers = {layer for t in rel.target_list for layer in t.attribution_layers}
    layers |= {layer for p in rel.planted_list for layer in (p.attribution_layers or [])}
    seen: set[str] = set()
    for i, entry in enumerate(config.dictionaries):
        where = f"dictionaries[{i}]: id {entry.id!r}"
        if entry.id in seen:
            raise ValueError(f"{where} is used twice")
        if entry.id in layers:
            raise ValueError(f"{where} is the name of an attribution layer; give the dictionary another id")
        if entry.id in config.evaluate.references:
            raise ValueError(f"{where} is the name of an evaluator of evaluate.references; give the dictionary "
                             "another id")
        seen.add(entry.id)

# ---------------------------------------------------------------------------------------------------


class Config(_Section):
    """A whole run. Every key, with its type, default and meaning, is listed in the documentation's config reference."""

    name: str = "run"
    """Run name; the default store is ``storage/<name>.h5`` and the default report ``storage/<name>_report``."""
    store: Path | None = None
    """The HDF5 store (a regular file, or nothing yet); ``null`` = ``storage/<name>.h5``. Paths are relative to the
    working directory.
    """
    device: str = "auto"
    """``auto`` (the first CUDA device if any, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    seed: int = 0
    """Seeds random initialisation, clustering and the bootstrap intervals of comparisons."""
    commit_every: float = Field(30.0, ge=0)
    """Seconds between commits of the store on the stages' checkpoints (at least ten times a commit's duration): what a
    ``kill -9`` can cost at most.
    """
    model: ModelSection = Field(default_factory=ModelSection)
    """Which network to explain and where its layers are."""
    data: DataSection | None = None
    """Which images, and how they are prepared for the model; required unless a dataset is passed to
    ``Experiment(dataset=...)``.
    """
    topk: TopKSection = Field(default_factory=TopKSection)
    """Which channels' most-activating samples (references) to find."""
    relevance: RelevanceSection = Field(default_factory=RelevanceSection)
    """Conditional relevance of lower layers to target neurons."""
    dictionaries: list[DictionarySection] = Field(default_factory=list)
    """Dictionaries (sparse autoencoders, NMF) learned on a layer's activations, each a space of the targets on that
    layer: a list of ``{id, layer, kind, n_concepts, ...}``; empty: none.
    """
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    """How each neuron's references are clustered, per space."""
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    """Reference spaces, ground truth and metrics."""
    compare: CompareSection = Field(default_factory=CompareSection)
    """Which per-neuron metrics are compared between spaces, and how."""
    selectivity: SelectivitySection = Field(default_factory=SelectivitySection)
    """The causal test of every split: ablating each cluster's circuit (the ``selectivity`` stage)."""
    report: ReportSection = Field(default_factory=ReportSection)
    """The browsable HTML report written at the end of ``polypure run``."""
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    """Where the top-K, relevance and embedding work runs (a runtime key: it never makes a store stale)."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @model_validator(mode="after")
    def _dictionary_ids(self):
        check_dictionary_ids(self)
        return self

    @model_validator(mode="after")
    def _refs_within_k(self):
        if self.relevance.n_refs > self.topk.k:
            raise ValueError(f"relevance.n_refs ({self.relevance.n_refs}) must be at most topk.k ({self.topk.k})")
        return self

    @property
    def store_path(self) -> Path:
        """Where the HDF5 store goes: ``store``, or ``storage/<name>.h5``."""
        return Path(self.store) if self.store is not None else Path("storage") / f"{self.name}.h5"

    @property
    def report_folder(self) -> Path:
        """Where the report goes: ``report.out``, or :func:`default_report_folder` of the store."""
        return Path(self.report.out) if self.report.out is not None else default_report_folder(self.store_path)

    def to_yaml(self) -> str:
        """The resolved config as YAML text."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def stored_yaml(self) -> str:
        """What the store keeps as its ``config`` attribute: the resolved config without ``executor``.

        Where the work ran is no part of the result: a store written on a Ray cluster is the same file,
        config included, as one written in one process.
        """
        return yaml.safe_dump(self.model_dump(mode="json", exclude={"executor"}), sort_keys=False)


def default_report_folder(store_path: str | Path) -> Path:
    """The report folder of a store when none is given: ``<store without .h5>_report`` next to it."""
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}_report")


# ---------------------------------------------------------------------------------------------------
# loading


def bundled_config_dir() -> Path:
    """The folder holding the configs that ship with polypure (``configs/`` of the source tree)."""
    package = Path(__file__).resolve().parents[1]
    # an installed wheel carries them inside the package; a source checkout has them beside src/
    for candidate in (package / "configs", package.parents[1] / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("the bundled configs are missing from this installation of polypure")


def resolve_config_path(path: str | Path | None) -> Path:
    """Find a config: a file path, the name of a bundled config (``demo``), or None for the demo.

    Raises
    ------
    ConfigError
        If the path does not exist or is not a regular file (a folder, ``/dev/null``, a FIFO).
    """
    if path is None:
        path = "demo"
    candidate = Path(path)
    if kind_of(candidate) == "a regular file":
        return candidate
    # a bundled name wins over a folder of that name in the working directory
    if candidate.suffix == "" and "/" not in str(path):
        bundled = bundled_config_dir() / f"{path}.yaml"
        if bundled.is_file():
            return bundled
    return require_file(candidate, "config file")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. topk.k=20")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values are parsed as YAML) to a raw config mapping."""
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def validation_problems(exc: ValidationError, model: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    """``(key, problem)`` for each error of a validation, each distinct problem once.

    Parameters
    ----------
    exc : pydantic.ValidationError
    model : pydantic model class, optional
        What was validated (default :class:`Config`); an unknown key names the closest key of its section.
    """
    errors = exc.errors()
    # a Union reports one error per branch: where one branch got as far as a real problem (an empty list, a
    # number out of bounds), the other branches' "not a list" / "not 'auto'" say nothing about the input
    real = {_union_prefix(err["loc"]) for err in errors if not _mismatch(err)}
    errors = [err for err in errors if not (_mismatch(err) and _union_prefix(err["loc"]) in real - {None})]
    problems = []
    for err in errors:
        keys = [part for part in err["loc"] if not _is_branch(part)]
        loc = _key_text(keys)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = _close_key([part for part in keys if not isinstance(part, int)], model or Config)
            msg = "unknown key" + (f" (did you mean {close!r}?)" if close else "")
        elif err["type"] == "missing":
            msg = "missing required key"
        elif "input" in err and err["type"] not in ("value_error",) and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        problems.append((loc, msg))
    # a Union reports one error per branch; keep each message once
    return list(dict.fromkeys(problems))


def _key_text(parts: list) -> str:
    """A key as a user writes it, list positions in brackets: ``relevance.targets[0].neurons``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_BUILTIN_BRANCHES = ("str", "int", "float", "bool", "none", "dict", "list", "tuple")


def _is_branch(part) -> bool:
    """Whether a part of an error's location is pydantic's name of a Union branch (``list[int]``), not a key."""
    if not isinstance(part, str):
        return False
    return (part.startswith(("function-", "literal", "constrained-")) or "[" in part or part[:1].isupper()
            or part in _BUILTIN_BRANCHES)


def _union_prefix(loc: tuple) -> tuple | None:
    """The location of the Union an error lies in (the parts before its first branch name), None outside one."""
    for i, part in enumerate(loc):
        if _is_branch(part):
            return tuple(loc[:i])
    return None


def _mismatch(err: dict) -> bool:
    """Whether an error only says that the input is not of a branch's type."""
    return err["type"].endswith(("_type", "_parsing")) or err["type"] in ("literal_error", "int_from_float")


def _section_model(annotation) -> type[BaseModel] | None:
    """The config section class inside a field's annotation (``X``, ``X | None``, ``list[X]``), if any."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def _close_key(loc: list, model: type[BaseModel]) -> str | None:
    """The known key nearest to a misspelled one at ``loc`` (``relevance.n_ref`` -> ``n_refs``), if one is close.

    ``loc`` is the key's location inside ``model`` (:class:`Config`, an evaluator's settings, ...).
    """
    import difflib

    section: type[BaseModel] | None = model
    for part in loc[:-1]:
        field = section.model_fields.get(str(part)) if section is not None else None
        section = _section_model(field.annotation) if field is not None else None
    if section is None or not loc:
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def _join(problems: list[tuple[str, str]]) -> str:
    return "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems)


def format_validation_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line naming each bad key and its problem (``model``: what was validated, see :func:`validation_problems`)."""
    return _join(validation_problems(exc, model))


def _override_for(loc: str, overrides: list[str]) -> str | None:
    """The ``--set`` item that set the key at ``loc`` (or a key inside it), if any.

    The last such item: a later ``--set`` of a key replaces an earlier one.
    """
    for item in reversed(overrides):
        key = item.partition("=")[0].strip()
        if loc and (loc == key or loc.startswith((key + ".", key + "[")) or key.startswith((loc + ".", loc + "["))):
            return item
    return None


def config_from_dict(data: dict, source: str = "config") -> Config:
    """Validate a raw mapping into a :class:`Config`.

    Raises
    ------
    ConfigError
        With one line naming every bad key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config.

    Parameters
    ----------
    path : str or Path or None
        A YAML file, the name of a bundled config (``demo``, ...), or None for the bundled demo.
    overrides : list of str, optional
        ``KEY=VALUE`` items such as ``relevance.neurons=[1,2]``; values are read as YAML.

    Returns
    -------
    Config
    """
    file = resolve_config_path(path)
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{file}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of keys at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        # a bad value given with --set is reported as such, not as if it were in the file
        by_source: dict[str, list[tuple[str, str]]] = {}
        for loc, msg in validation_problems(exc):
            item = _override_for(loc, overrides or [])
            by_source.setdefault(f"--set {item}" if item else str(file), []).append((loc, msg))
        raise ConfigError("; ".join(f"{source}: {_join(problems)}" for source, problems in by_source.items())) from None


def config_differences(old: dict, new: dict, ignore=RUNTIME_KEYS) -> list[str]:
    """Keys whose values differ between two resolved configs, skipping runtime-only keys.

    Returns
    -------
    list of str
        ``"key: old -> new"`` items, in key order.
    """
    out = []

    def walk(a, b, prefix):
        if prefix and any(prefix == key or prefix.startswith(key + ".") for key in ignore):
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            out.append(f"{prefix}: {a!r} -> {b!r}")

    walk(old, new, "")
    return out
