"""Datasets: images with stable ids, labels, and the two views polypure needs of each sample.

Every dataset here gives, for sample ``i``,

* ``view(i)``: the image after resizing and cropping, as floats in [0, 1] (what evaluators embed and
  what figures show),
* ``dataset[i]``: ``(view normalised for the model, label)`` (what the explained model sees),

except :class:`WrappedDataset`, a dataset passed from Python, whose items go to the model as they are
and whose ``view`` un-does the normalisation it is told the items carry. All of them have ``ids``
(stable strings: the path relative to the data root, or ``index:<i>``), ``labels`` (int64, -1 where
unknown) and, for generated data, ``factors`` (name -> per-sample codes and value names).

:func:`build_dataset` makes the dataset a config's ``data`` section describes, with the factory that
:data:`DATASETS` holds for its kind; packages add kinds through the entry-point group ``polypure.datasets``.

Example
-------
>>> from polypure.data.datasets import ArrayDataset
>>> import numpy as np
>>> ds = ArrayDataset(np.zeros((4, 28, 28), np.uint8), labels=np.arange(4))
>>> ds[2][0].shape, ds.ids[2]
(torch.Size([1, 28, 28]), 'index:2')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from polypure.config.paths import require_file, require_folder
from polypure.config.selection import check_count
from polypure.errors import ConfigError, PolypureError
from polypure.registry import Registry

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PolypureDataset(Dataset):
    """Base class: ids, labels, optional factors, a [0, 1] view and a normalised model input per sample.

    Parameters
    ----------
    ids : sequence of str
        Stable sample ids.
    labels : array-like of int, optional
        Class per sample, -1 where unknown.
    mean, std : sequence of float, optional
        Normalisation for the model input; None keeps the [0, 1] view.
    image_size : int, optional
        Output side after the centre crop; None keeps the native size.
    resize : int, optional
        Side the short edge is resized to before cropping (default: ``image_size``).
    """

    def __init__(self, ids: Sequence[str], labels=None, mean=None, std=None,
                 image_size: int | None = None, resize: int | None = None):
        self.ids = list(ids)
        n = len(self.ids)
        self.labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(n)
        self.factors: dict[str, tuple[np.ndarray, list[str]]] = {}
        self.class_names: list[str] | None = None
        self.image_size = image_size
        self.resize = resize if resize is not None else image_size
        self.set_normalization(mean, std)

    def set_normalization(self, mean=None, std=None) -> None:
        """Set (or with None, remove) the normalisation applied to model inputs."""
        if (mean is None) != (std is None):
            raise ConfigError("data.normalize: give both mean and std")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        """Return the number of samples."""
        return len(self.ids)

    def _raw(self, index: int) -> torch.Tensor:
        """Return the image as float (C, H, W) in [0, 1], before resizing."""
        raise NotImplementedError

    def _geometry(self, img: torch.Tensor) -> torch.Tensor:
        if self.image_size is None:
            return img
        if min(img.shape[-2:]) != self.resize:
            img = TF.resize(img, self.resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
        if tuple(img.shape[-2:]) != (self.image_size, self.image_size):
            img = TF.center_crop(img, [self.image_size, self.image_size])
        return img

    #: Whether :meth:`view` can give pixels (a dataset passed from Python may not know how).
    has_pixels = True
    #: Whether the labels are the ones the items carry, known once the top-K pass has read every item.
    labels_from_items = False
    #: What decides the pixels beyond the data config, for telling stale embeddings apart (None: nothing).
    pixels_signature = None

    def view(self, index: int) -> torch.Tensor:
        """Return the sample as the model sees it before normalisation: float (C, H, W) in [0, 1]."""
        return self._geometry(self._raw(index)).clamp(0, 1)

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """Apply the model normalisation to a view (or a batch of views)."""
        if self.mean is None:
            return img
        if img.shape[-3] != self.mean.shape[0] and self.mean.shape[0] != 1:
            raise PolypureError(f"data.normalize has {self.mean.shape[0]} channels but the images have "
                                f"{img.shape[-3]}")
        return (img - self.mean) / self.std

    def __getitem__(self, index: int):
        """Return ``(view normalised for the model, label)`` of sample ``index``."""
        if index < 0 or index >= len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return self.normalize(self.view(index)), int(self.labels[index])

    def subset(self, count: int) -> PolypureDataset:
        """Keep the first ``count`` samples (in place) and return self."""
        keep = min(count, len(self))
        self._keep(keep)
        self.ids = self.ids[:keep]
        self.labels = self.labels[:keep]
        self.factors = {k: (codes[:keep], names) for k, (codes, names) in self.factors.items()}
        return self

    def _keep(self, count: int) -> None:
        """Drop per-sample storage beyond ``count`` (subclasses with their own storage override)."""


def to_rgb(img: Image.Image) -> torch.Tensor:
    """An image of any PIL mode as (3, H, W) float RGB in [0, 1].

    Greyscale, palette, CMYK and RGBA images go through PIL's RGB conversion (alpha dropped). 16- and
    32-bit greyscale images are scaled by their type's range first: PIL's own conversion would clip them
    to 255, a white image.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max(initial=0) <= 65535 else float(2**32 - 1)
        grey = torch.as_tensor(np.clip(array / top, 0, 1), dtype=torch.float32)
        return grey.unsqueeze(0).expand(3, -1, -1).contiguous()
    return TF.pil_to_tensor(img.convert("RGB")).float().div_(255)


class FileDataset(PolypureDataset):
    """Images read from files (any format PIL reads), converted to RGB.

    Parameters
    ----------
    root : Path
        Folder the ids are relative to.
    files : sequence of Path
        The image files, in sample order.
    **kwargs
        See :class:`PolypureDataset`.
    """

    def __init__(self, root: Path, files: Sequence[Path], **kwargs):
        self.root = Path(root)
        self.files = [Path(f) for f in files]
        super().__init__([f.relative_to(self.root).as_posix() for f in self.files], **kwargs)

    def _raw(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except (OSError, ValueError) as exc:
            # refused, not skipped: a skipped file would shift every later sample index the store records
            raise ConfigError(f"image {str(path)!r} (sample {index}) cannot be read: {exc}; replace or remove "
                              "it") from None

    def _keep(self, count: int) -> None:
        self.files = self.files[:count]


class ArrayDataset(PolypureDataset):
    """Images held in a uint8 array of shape (N, H, W) or (N, H, W, C).

    Parameters
    ----------
    images : numpy.ndarray
        uint8 pixels.
    labels : array-like, optional
        Class per image.
    ids : sequence of str, optional
        Default ``index:<i>``.
    **kwargs
        See :class:`PolypureDataset`.
    """

    def __init__(self, images: np.ndarray, labels=None, ids=None, **kwargs):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise PolypureError(f"image array must be uint8 of shape (N, H, W) or (N, H, W, C), "
                                f"got {images.dtype} {images.shape}")
        self.images = images
        ids = ids if ids is not None else [f"index:{i}" for i in range(len(images))]
        super().__init__(ids, labels=labels, **kwargs)

    def _raw(self, index: int) -> torch.Tensor:
        img = torch.from_numpy(np.ascontiguousarray(self.images[index]))
        img = img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1)
        return img.float().div_(255)

    def _keep(self, count: int) -> None:
        self.images = self.images[:count]


#: The data settings that apply to a dataset passed from Python; every other ``data`` key describes data
#: polypure builds itself.
MEMORY_DATA_KEYS = ("batch_size", "num_workers")


def _item_label(item) -> int:
    """Return the integer class an ``(image, label, ...)`` item carries, else -1."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        return -1
    label = item[1]
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point() \
            and label.dtype != torch.bool:
        return int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return int(label)
    return -1


class _ItemDataset(PolypureDataset):
    """Base of the wrappers of a user's torch dataset whose items are ``image`` or ``(image, label, ...)``.

    Ids come from the dataset's ``ids`` attribute, generative factors from ``factors``, and labels from
    ``labels`` or ``targets`` where it has one. Without those attributes the labels are the ones the items
    carry: ``dataset[i]`` returns them, the top-K pass (which reads every item anyway) writes them to the
    store as they stream past, and :attr:`labels` holds -1 until then (:attr:`labels_from_items` is True).
    """

    def __init__(self, dataset: Dataset, **kwargs):
        self.dataset = dataset
        n = len(dataset)
        ids = list(getattr(dataset, "ids", [f"index:{i}" for i in range(n)]))
        labels = getattr(dataset, "labels", getattr(dataset, "targets", None))
        self.labels_from_items = labels is None
        super().__init__(ids, labels=None if labels is None else np.asarray(labels), **kwargs)
        self.factors = dict(getattr(dataset, "factors", {}) or {})

    def _item(self, index: int) -> tuple[torch.Tensor, int]:
        """Return the item's image as a tensor (a PIL image becomes float in [0, 1]) and its label."""
        if index < 0 or index >= len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        item = self.dataset[index]
        img = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(img, Image.Image):
            img = TF.pil_to_tensor(img.convert("RGB")).float().div_(255)
        if not isinstance(img, torch.Tensor) or img.ndim != 3:
            raise PolypureError(f"dataset item {index} is not an image tensor (C, H, W)")
        label = _item_label(item) if self.labels_from_items else int(self.labels[index])
        return img, label

    def _keep(self, count: int) -> None:
        self.dataset = torch.utils.data.Subset(self.dataset, range(count))


class FactoryDataset(_ItemDataset):
    """The dataset of a ``data.kind: python:MODULE:FACTORY`` factory: items are pixels that polypure prepares.

    Images are float in [0, 1] (or PIL images); like image files they are resized and cropped by
    ``data.image_size`` and normalised by ``data.normalize``.

    Parameters
    ----------
    dataset : torch Dataset
        Items ``image`` or ``(image, label, ...)``.
    **kwargs
        See :class:`PolypureDataset`.
    """

    def _raw(self, index: int) -> torch.Tensor:
        return self._item(index)[0].float()

    def __getitem__(self, index: int):
        """Return the item's image resized, cropped and normalised like image files, and its label."""
        img, label = self._item(index)
        return self.normalize(self._geometry(img.float()).clamp(0, 1)), label


def no_pixels_message(needs: str) -> str:
    """Return the one line that says how to let an in-memory dataset give pixels to ``needs``."""
    return (f"{needs} needs the images as pixels in [0, 1], but the in-memory dataset's items go to the model as "
            "they are and polypure cannot tell how to turn them back: pass Experiment(..., mean=..., std=...) "
            "(the normalisation the items carry), to_pixels=<callable>, or to_pixels='identity' if they already "
            "are pixels")


class WrappedDataset(_ItemDataset):
    """A user's torch dataset passed as ``Experiment(dataset=...)``: items go to the model as they are.

    ``dataset[i]`` is the item's image exactly as the dataset yields it (a copy, cast to ``dtype``; a
    PIL image becomes float in [0, 1]): polypure resizes, normalises and clamps nothing, and never changes
    the dataset's own tensors. Evaluators, crops and thumbnails need the images as pixels in [0, 1];
    :meth:`view` gets them from ``mean`` and ``std`` (the items are ``(pixels - mean) / std``) or from
    ``to_pixels``. With neither, :meth:`view` raises :class:`~polypure.errors.ConfigError` saying what to
    pass. Labels, ids and factors: see :class:`_ItemDataset`.

    Parameters
    ----------
    dataset : torch Dataset
        Items ``image`` or ``(image, label, ...)``, images (C, H, W) tensors prepared for the model.
    mean, std : sequence of float, optional
        The normalisation the items carry, per channel (or one value for all).
    to_pixels : callable or "identity", optional
        ``to_pixels(image) -> pixels`` (float (C, H, W), clamped to [0, 1] afterwards; it gets a float32
        copy of the item's image), or ``"identity"`` when the items already are pixels (float in [0, 1],
        or uint8, which is divided by 255).
    dtype : torch.dtype
        What the model computes in: items are cast to it (uint8 values stay 0..255, float64 is rounded).

    Examples
    --------
    >>> import torch
    >>> from polypure.data.datasets import WrappedDataset
    >>> items = torch.utils.data.TensorDataset((torch.ones(2, 3, 4, 4) - 0.5) / 0.25, torch.tensor([1, 0]))
    >>> ds = WrappedDataset(items, mean=[0.5], std=[0.25])
    >>> ds[0][0].max().item(), ds.view(0).max().item(), ds.labels_from_items
    (2.0, 1.0, True)
    """

    def __init__(self, dataset: Dataset, mean=None, std=None, to_pixels=None, dtype: torch.dtype = torch.float32):
        if to_pixels is not None and mean is not None:
            raise ConfigError("give either mean and std or to_pixels, not both: both say how to get pixels from "
                              "the items")
        if not (to_pixels is None or callable(to_pixels) or (isinstance(to_pixels, str) and to_pixels == "identity")):
            raise ConfigError(f"to_pixels must be a callable or 'identity', not {to_pixels!r}")
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std (the items are (pixels - mean) / std)")
        if mean is not None and len(mean) != len(std):
            raise ConfigError("mean and std must have the same length")
        if std is not None and any(float(s) <= 0 for s in std):
            raise ConfigError("std must be positive")
        super().__init__(dataset, mean=mean, std=std)
        self.to_pixels = to_pixels
        self.dtype = dtype

    @property
    def has_pixels(self) -> bool:
        """Whether :meth:`view` can give pixels: given ``mean`` and ``std`` or ``to_pixels``."""
        return self.mean is not None or self.to_pixels is not None

    @property
    def pixels_signature(self) -> dict[str, Any] | None:
        """How :meth:`view` makes pixels, for telling stale embeddings apart (None where it cannot)."""
        if self.mean is not None:
            return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}
        if callable(self.to_pixels):
            fn = self.to_pixels
            return {"to_pixels": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"}
        return None if self.to_pixels is None else {"to_pixels": self.to_pixels}

    def __getitem__(self, index: int):
        """Return the item's image as the dataset yields it (a copy, cast to ``dtype``) and its label."""
        img, label = self._item(index)
        # a copy: whatever the model, hooks or composites do to their input must not reach the user's tensors
        return img.detach().to(self.dtype, copy=True), label

    def view(self, index: int) -> torch.Tensor:
        """Return the item's image as float (C, H, W) pixels in [0, 1], made from a copy of it."""
        if not self.has_pixels:
            raise ConfigError(no_pixels_message("the pixel view (for evaluators, crops and thumbnails)"))
        img, _ = self._item(index)
        raw = img.detach()
        img = raw.to(torch.float32, copy=True)
        if self.mean is not None:
            if img.shape[0] != self.mean.shape[0] and self.mean.shape[0] != 1:
                raise ConfigError(f"mean and std have {self.mean.shape[0]} values but the images have "
                                  f"{img.shape[0]} channels")
            img = img * self.std + self.mean
        elif callable(self.to_pixels):
            img = torch.as_tensor(self.to_pixels(img)).to(torch.float32)
        elif not raw.is_floating_point():
            img = img / 255
        return img.clamp(0, 1)


# ---------------------------------------------------------------------------------------------------
# building from the config

#: Data kinds by name, as ``data.kind`` names them; plugins register under the entry-point group
#: ``polypure.datasets``. Each entry is a factory ``factory(data, **geometry)``: ``data`` is the
#: :class:`~polypure.config.settings.DataSection`, ``geometry`` the ``image_size`` and ``resize`` keyword arguments of
#: :class:`PolypureDataset`. It returns a :class:`PolypureDataset` (made with ``**geometry``), or a torch
#: dataset of ``image`` or ``(image, label, ...)`` items with pixels in [0, 1], which :func:`build_dataset`
#: wraps in a :class:`FactoryDataset`.
DATASETS = Registry("data kind", group="polypure.datasets")
# by name, not by import: the synthetic data is built on this module
DATASETS.register_lazy("synthetic", "polypure.data.synthetic:synthetic_dataset")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(root: Path, **kwargs) -> FileDataset:
    """One subfolder per class (sorted names give class indices), like torchvision's ImageFolder."""
    root = require_folder(root, "data.root: folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    if not files:
        raise ConfigError(f"data.root: no images in class subfolders of {str(root)!r}")
    ds = FileDataset(root, files, labels=labels, **kwargs)
    ds.class_names = classes
    return ds


def prefix_labels(names: Sequence[str], classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class indices from file-name prefixes (the text before the first ``_``).

    The class index is the position of the prefix in ``classes`` if given, else in the sorted list of
    distinct prefixes. For ImageNet files named ``<wnid>_<name>`` with all 1000 classes present this is
    the usual ImageNet order (``n01440764`` is class 0).
    """
    prefixes = [Path(name).name.split("_", 1)[0] for name in names]
    order = list(classes) if classes is not None else sorted(set(prefixes))
    position = {p: i for i, p in enumerate(order)}
    return np.array([position.get(p, -1) for p in prefixes], np.int64), order


def flat_images(root: Path, labels: str = "none", classes: Path | None = None, **kwargs) -> FileDataset:
    """All images of one folder, sorted by file name; labels from name prefixes or none."""
    root = require_folder(root, "data.root: folder")
    files = _image_files(root)
    if not files:
        raise ConfigError(f"data.root: no images in {str(root)!r}")
    ds = FileDataset(root, files, **kwargs)
    if labels == "prefix":
        order = None
        if classes is not None:
            text = require_file(classes, "data.classes: file").read_text()
            order = [line.split()[0] for line in text.splitlines() if line.strip()]
        ds.labels, ds.class_names = prefix_labels([f.name for f in files], order)
    return ds


def npz_images(path: Path, images_key: str, labels_key: str | None, **kwargs) -> ArrayDataset:
    """Images (and labels) from arrays in a ``.npz`` file."""
    path = require_file(path, "data.path: file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.path: {str(path)!r} is not a readable .npz file: {exc}") from None
    with archive:
        if images_key not in archive:
            raise ConfigError(f"data.images_key: {str(path)!r} has no array {images_key!r} "
                              f"(it has {', '.join(archive.files)})")
        images = archive[images_key]
        labels = None
        if labels_key is not None and labels_key in archive:
            labels = archive[labels_key]
        elif labels_key is not None and labels_key != "labels":
            raise ConfigError(f"data.labels_key: {str(path)!r} has no array {labels_key!r} "
                              f"(it has {', '.join(archive.files)})")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ConfigError(f"data.images_key: {images_key!r} in {str(path)!r} must be uint8 (N, H, W) or "
                          f"(N, H, W, C), got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"data.labels_key: {len(labels)} labels for {len(images)} images in {str(path)!r}")
    return ArrayDataset(images, labels=labels, **kwargs)


@DATASETS.register("imagefolder")
def _imagefolder_kind(data, **geometry) -> FileDataset:
    """``data.kind: imagefolder``: class subfolders of ``data.root``."""
    return image_folder(data.root, **geometry)


@DATASETS.register("images")
def _images_kind(data, **geometry) -> FileDataset:
    """``data.kind: images``: one flat folder ``data.root``, labels from file-name prefixes with ``labels: prefix``."""
    return flat_images(data.root, labels="prefix" if data.labels == "prefix" else "none", classes=data.classes,
                       **geometry)


@DATASETS.register("npz")
def _npz_kind(data, **geometry) -> ArrayDataset:
    """``data.kind: npz``: arrays ``data.images_key`` and ``data.labels_key`` of the file ``data.path``."""
    return npz_images(data.path, data.images_key, data.labels_key, **geometry)


@DATASETS.register("memory")
def _memory_kind(data, **geometry):
    """``data.kind: memory``: reserved (no plugin may take it) for the dataset passed to an Experiment."""
    raise ConfigError("data.kind 'memory' stands for a dataset passed from Python (Experiment(dataset=...))")


def _as_dataset(made, kind: str, geometry: dict[str, Any]) -> PolypureDataset:
    """Return what a data factory made as a polypure dataset, wrapping a torch dataset in a :class:`FactoryDataset`."""
    if isinstance(made, PolypureDataset):
        return made
    if not (hasattr(made, "__getitem__") and hasattr(made, "__len__")):
        raise ConfigError(f"data.kind: {kind} returned {type(made).__name__}, not a dataset")
    return FactoryDataset(made, **geometry)


def resolve_normalization(spec, model_preprocessing: dict[str, Any] | None, channels: int):
    """(mean, std) for ``data.normalize``; ``auto`` takes the model's own, else ImageNet for RGB data."""
    if spec == "none":
        return None, None
    if spec == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if spec == "auto":
        if model_preprocessing and "mean" in model_preprocessing:
            return tuple(model_preprocessing["mean"]), tuple(model_preprocessing["std"])
        return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (None, None)
    return tuple(spec.mean), tuple(spec.std)


def build_dataset(cfg, model=None) -> PolypureDataset:
    """Build the dataset a :class:`~polypure.config.settings.DataSection` describes.

    The kind is ``python:MODULE:FACTORY`` (called with ``data.kwargs``) or a name of :data:`DATASETS`
    (called with the section and the geometry).

    Parameters
    ----------
    cfg : polypure.config.settings.DataSection
    model : polypure.models.factory.ExplainedModel, optional
        Supplies the normalisation when ``normalize`` is ``auto``.

    Returns
    -------
    PolypureDataset
    """
    geometry = {"image_size": cfg.image_size, "resize": cfg.resize_to}
    if cfg.kind.startswith("python:"):
        from polypure.registry import import_factory
        made = import_factory(cfg.kind.split(":", 1)[1], "data.kind")(**cfg.kwargs)
    else:
        made = DATASETS.get(cfg.kind)(cfg, **geometry)
    ds = _as_dataset(made, cfg.kind, geometry)
    if len(ds) == 0:
        raise ConfigError(f"data: the dataset ({cfg.kind}) is empty")
    if cfg.limit is not None:
        # a limit past the samples there are is refused, not read as "all of them"
        check_count(cfg.limit, len(ds), "data.limit", f"samples of the {cfg.kind} data")
        ds.subset(cfg.limit)
    channels = ds.view(0).shape[0]
    mean, std = resolve_normalization(cfg.normalize, getattr(model, "preprocessing", None), channels)
    ds.set_normalization(mean, std)
    if mean is not None and len(mean) not in (1, channels):
        raise ConfigError(f"data.normalize: {len(mean)} channels given but the images have {channels}")
    return ds

