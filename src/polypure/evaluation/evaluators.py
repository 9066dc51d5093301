"""Evaluators: embed reference images in a space whose distances mean visual similarity.

The seed paper measures disentanglement against CLIP; PURE also against DINOv2. An evaluator turns
samples into vectors, which become reference spaces for the distance correlation and PURE's cluster
distances, and spaces to cluster in. Built in:

* ``clip`` -- an open_clip image tower; ``pooling: tokens`` (default for ViTs) is the mean of the last
  hidden states over all tokens, before the final layer norm (PURE's choice with Hugging Face's
  ``CLIPVisionModel``), ``pooling: embed`` the projected image embedding;
* ``dinov2`` -- a timm DINOv2 ViT, mean of the final normed tokens (``last_hidden_state.mean(1)`` in
  Hugging Face terms), at 224 px after resizing to 256 like DINOv2's own processor;
* ``labels`` -- one-hot vectors of a label set (``class`` or a generative factor such as ``shape``).

Images are the dataset's views (resized and cropped, in [0, 1], before the explained model's
normalisation); each evaluator applies its own preprocessing, and grey images become RGB. With
``view: crop`` each reference is first cropped to where the neuron's CRP heatmap is (docs/method.md, Crops).

Write your own by subclassing :class:`Evaluator` and registering it under the entry-point group
``polypure.evaluators``.

Example
-------
>>> from polypure.evaluation.evaluators import make_evaluator
>>> clip = make_evaluator("clip", {"model": "ViT-B-32", "pretrained": None})   # random weights, offline
>>> clip.view
'full'
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from polypure.config.paths import names_a_file, require_file
from polypure.errors import ConfigError
from polypure.models.hub import fetch, quiet_logs
from polypure.registry import Registry

#: Evaluator classes by name; plugins register under the entry-point group ``polypure.evaluators``.
EVALUATORS = Registry("evaluator", group="polypure.evaluators")


class EvaluatorSettings(BaseModel):
    """Settings every evaluator takes.

    A second space from the same evaluator takes a name of its own and names the implementation with
    ``evaluator:`` (``clip_crop: {evaluator: clip, view: crop}``).
    """

    model_config = ConfigDict(extra="forbid")

    view: Literal["full", "crop"] = "full"
    """``full`` (whole images) or ``crop`` (each reference cropped to where the neuron's heatmap is, as PURE does)."""
    crop_composite: str = "epsilon_plus_flat"
    """The composite of the input heatmaps that the ``crop`` view crops to."""
    device: str | None = None
    """Where the evaluator runs (``cpu``, ``cuda:1``); ``null`` = the run's ``device``."""


class Evaluator:
    """Base class: maps samples to vectors.

    Subclasses define ``Settings`` (a pydantic model extending :class:`EvaluatorSettings`) and
    :meth:`embed_images`; evaluators that do not look at pixels override :meth:`embed_samples`.

    Parameters
    ----------
    name : str
        The name it is used under in the config (also its store path ``/embeddings/<name>``).
    **settings
        Validated against ``Settings``.
    """

    Settings: ClassVar[type[EvaluatorSettings]] = EvaluatorSettings
    image_based: ClassVar[bool] = True

    def __init__(self, name: str, **settings: Any):
        self.name = name
        try:
            self.settings = self.Settings.model_validate(settings)
        except ValidationError as exc:
            from polypure.config.settings import format_validation_error
            raise ConfigError(f"evaluate.{name}: {format_validation_error(exc, self.Settings)}") from None
        if self.view == "crop" and not self.image_based:
            raise ConfigError(f"evaluate.{name}: view 'crop' needs an image evaluator")
        self.device = torch.device(self.settings.device) if self.settings.device else torch.device("cpu")

    @property
    def view(self) -> str:
        """``full`` (whole images) or ``crop`` (PURE's crops)."""
        return self.settings.view

    def signature(self) -> dict[str, Any]:
        """What determines the embedding (a stored embedding with another signature is recomputed)."""
        return {"evaluator": type(self).__name__, **self.settings.model_dump(mode="json", exclude={"device"})}

    def embed_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Embed images given as float (3, H, W) tensors in [0, 1], sizes may differ: (B, D)."""
        raise NotImplementedError

    def embed_samples(self, dataset, indices: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Embed dataset samples by index: (len(indices), D) float32."""
        out = []
        for start in range(0, len(indices), batch_size):
            images = [as_rgb(dataset.view(int(i))) for i in indices[start:start + batch_size]]
            vectors = self.embed_images(images)
            out.append(vectors.detach().float().cpu().numpy() if isinstance(vectors, torch.Tensor) else vectors)
        if not out:
            return np.zeros((0, 0), np.float32)
        try:
            return np.concatenate(out)
        except (ValueError, TypeError):
            # not arrays of one width: handed on as they are, for the embed stage to name the problem in one line
            return out


def as_rgb(image: torch.Tensor) -> torch.Tensor:
    """Grey (1, H, W) images become RGB; others pass through."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def prepare(images: list[torch.Tensor], resize: int, crop: int, mean, std,
            interpolation=InterpolationMode.BICUBIC) -> torch.Tensor:
    """Resize the short side, centre-crop and normalise a list of [0, 1] images into one batch."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    batch = []
    for img in images:
        img = TF.resize(img, resize, interpolation=interpolation, antialias=True)
        img = TF.center_crop(img, [crop, crop]).clamp(0, 1)
        batch.append((img - mean) / std)
    return torch.stack(batch)


@contextlib.contextmanager
def seeded(seed: int = 0):
    """Random initialisation from a fixed seed, the caller's random state left as it was.

    An evaluator with random weights (a test, a benchmark, a control) gives the same embeddings in every
    process: in a rerun, and on every worker of a Ray run.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _is_file(value) -> bool:
    return isinstance(value, str) and names_a_file(value)


# ---------------------------------------------------------------------------------------------------


class ClipSettings(EvaluatorSettings):
    """Settings of the CLIP evaluator (``evaluate.clip``)."""

    model: str = "ViT-B-32"
    """The open_clip architecture (``ViT-B-32``; ``ViT-B-32-quickgelu`` for the OpenAI weights from a file)."""
    pretrained: str | None = "openai"
    """An open_clip pretrained tag (``openai``), a local weights file, or ``null`` = random weights."""
    pooling: Literal["auto", "tokens", "embed"] = "auto"
    """``tokens`` (the mean of the last hidden states over all tokens, ViTs only), ``embed`` (the projected image
    embedding), or ``auto``: ``tokens`` for a ViT tower, else ``embed``.
    """

    @field_validator("pretrained")
    @classmethod
    def _pretrained_file(cls, value: str | None) -> str | None:
        # a file is checked with the config, before any work; a tag is fetched when the evaluator loads
        if _is_file(value):
            require_file(value, "file")
        return value


@EVALUATORS.register("clip")
class ClipEvaluator(Evaluator):
    """An open_clip image tower (``model``, ``pretrained`` tag, local checkpoint file, or null = random)."""

    Settings = ClipSettings

    def _load(self):
        if getattr(self, "_model", None) is not None:
            return
        import open_clip

        s = self.settings
        if s.model not in open_clip.list_models():
            raise ConfigError(f"evaluate.{self.name}.model: open_clip has no model {s.model!r}")
        if s.pretrained is None or _is_file(s.pretrained):
            if isinstance(s.pretrained, str):
                require_file(s.pretrained, f"evaluate.{self.name}.pretrained: file")
            with quiet_logs(), seeded():
                model = open_clip.create_model(s.model, pretrained=None)
            if s.pretrained is not None:
                from polypure.models.factory import apply_state_dict, load_state_dict_file
                apply_state_dict(model, load_state_dict_file(s.pretrained), s.pretrained)
        else:
            model = fetch(lambda: open_clip.create_model(s.model, pretrained=s.pretrained),
                          what=f"open_clip {s.model}", tag=s.pretrained, key=f"evaluate.{self.name}.pretrained")
        self._visual = model.visual.eval().to(self.device)
        cfg = open_clip.get_model_preprocess_cfg(model)
        self._size = int(cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"])
        self._mean, self._std = cfg["mean"], cfg["std"]
        pooling = s.pooling
        if pooling == "auto":
            pooling = "tokens" if hasattr(self._visual, "transformer") else "embed"
        if pooling == "tokens" and not hasattr(self._visual, "transformer"):
            raise ConfigError(f"evaluate.{self.name}.pooling: 'tokens' needs a ViT image tower; {s.model} has none")
        self._pooling = pooling
        self._model = model

    def embed_images(self, images):
        """CLIP embeddings of [0, 1] images: (len(images), D)."""
        self._load()
        x = prepare(images, self._size, self._size, self._mean, self._std).to(self.device)
        with torch.no_grad():
            if self._pooling == "embed":
                return self._visual(x)
            tokens = {}
            handle = self._visual.transformer.register_forward_hook(lambda m, a, out: tokens.setdefault("x", out))
            try:
                self._visual(x)
            finally:
                handle.remove()
            hidden = tokens["x"]
            # open_clip keeps (batch, tokens, width); older versions used (tokens, batch, width)
            if hidden.shape[0] != x.shape[0]:
                hidden = hidden.transpose(0, 1)
            return hidden.mean(1)


class Dinov2Settings(EvaluatorSettings):
    """Settings of the DINOv2 evaluator (``evaluate.dinov2``)."""

    model: str = "vit_base_patch14_dinov2.lvd142m"
    """The timm DINOv2 model."""
    pretrained: bool | str | None = True
    """``true`` = the hub weights, a local weights file, or ``false`` / ``null`` = random weights."""
    image_size: int = 224
    """Side of the centre crop the model sees."""
    resize: int = 256
    """Side the short edge is resized to before the crop."""

    @field_validator("pretrained")
    @classmethod
    def _pretrained_file(cls, value: bool | str | None) -> bool | str | None:
        # a string is a local file (true fetches the hub weights): checked with the config, before any work
        if isinstance(value, str):
            require_file(value, "file")
        return value


@EVALUATORS.register("dinov2")
class Dinov2Evaluator(Evaluator):
    """A timm DINOv2 ViT (``pretrained``: true = the hub weights, a local file, or false/null = random)."""

    Settings = Dinov2Settings

    def _load(self):
        if getattr(self, "_model", None) is not None:
            return
        import timm

        s = self.settings
        if not timm.is_model(s.model):
            raise ConfigError(f"evaluate.{self.name}.model: timm has no model {s.model!r}")
        kwargs = {"img_size": s.image_size, "num_classes": 0}
        if isinstance(s.pretrained, str):
            require_file(s.pretrained, f"evaluate.{self.name}.pretrained: file")
            # timm reads the file without pickle and resamples the position embedding to image_size
            model = timm.create_model(s.model, pretrained=True, pretrained_cfg_overlay={"file": s.pretrained},
                                      **kwargs)
        elif s.pretrained:
            model = fetch(lambda: timm.create_model(s.model, pretrained=True, **kwargs),
                          what=f"timm {s.model}", tag="pretrained", key=f"evaluate.{self.name}.pretrained")
        else:
            with seeded():
                model = timm.create_model(s.model, pretrained=False, **kwargs)
        cfg = model.pretrained_cfg or {}
        self._mean = cfg.get("mean", (0.485, 0.456, 0.406))
        self._std = cfg.get("std", (0.229, 0.224, 0.225))
        self._model = model.eval().to(self.device)

    def embed_images(self, images):
        """DINOv2 embeddings of [0, 1] images: (len(images), D)."""
        self._load()
        s = self.settings
        x = prepare(images, s.resize, s.image_size, self._mean, self._std).to(self.device)
        with torch.no_grad():
            return self._model.forward_features(x).mean(1)


class LabelsSettings(EvaluatorSettings):
    """Settings of the labels evaluator (``evaluate.labels``)."""

    of: str = "class"
    """The label set: ``class`` (the dataset's labels) or a generative factor (``shape``)."""


@EVALUATORS.register("labels")
class LabelsEvaluator(Evaluator):
    """One-hot vectors of a label set: ``of: class`` (the dataset labels) or a factor (``shape``)."""

    Settings = LabelsSettings
    image_based = False

    def embed_samples(self, dataset, indices, batch_size=32):
        """One-hot vectors of the samples' labels (no pixels needed)."""
        of = self.settings.of
        if of == "class":
            codes = np.asarray(dataset.labels)
            if (codes[indices] < 0).any():
                raise ConfigError(f"evaluate.{self.name}.of: some references have no class label")
        elif of in dataset.factors:
            codes = dataset.factors[of][0]
        else:
            known = ", ".join(["class", *dataset.factors]) or "class"
            raise ConfigError(f"evaluate.{self.name}.of: {of!r} is not a label of this data (known: {known})")
        width = int(codes.max()) + 1
        return np.eye(width, dtype=np.float32)[codes[np.asarray(indices)]]


def make_evaluator(name: str, settings: dict[str, Any] | None = None) -> Evaluator:
    """Build the evaluator used as ``name`` in the config.

    ``settings`` may name the implementation with ``evaluator:`` (so that ``clip_crop: {evaluator: clip,
    view: crop}`` is a second CLIP space); otherwise ``name`` itself is the registered implementation.
    """
    settings = dict(settings or {})
    implementation = settings.pop("evaluator", name)
    cls = EVALUATORS.get(implementation)
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
        raise ConfigError(f"evaluator {implementation!r} is not a polypure.evaluation.evaluators.Evaluator subclass")
    return cls(name, **settings)


def evaluator_names(config, relevance_spaces: set[str] = frozenset()) -> list[str]:
    """Evaluators to run: the references, then evaluator spaces named in ``cluster.spaces``."""
    names = list(config.evaluate.references)
    for space in config.cluster.spaces or []:
        if space not in relevance_spaces and space != "activation" and space not in names:
            names.append(space)
    return names
