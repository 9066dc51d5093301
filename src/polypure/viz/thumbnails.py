"""The report's images: the store's samples, found only when needed, and a thumbnail file per reference.

:class:`Images` finds the dataset behind a store (passed in, or rebuilt from the store's config) and says
why there is none; :class:`Thumbs` writes each reference's thumbnail into ``thumbs/`` of the report unless
the manifest says it is up to date, and describes a sample for a tooltip.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from polypure.errors import PolypureError
from polypure.store.hdf5_store import Store
from polypure.viz import imaging
from polypure.viz.report_cache import Outputs, digest

if TYPE_CHECKING:
    from polypure.viz.report_model import Target

log = logging.getLogger("polypure")

#: Side in pixels of the thumbnail files shown in the cluster grids.
THUMB_SIZE = 80


def _rebuild_dataset(store: Store):
    """The store's data rebuilt from its config, or None and the reason it cannot be."""
    from polypure.config.settings import config_from_dict
    from polypure.data.datasets import build_dataset

    try:
        cfg = config_from_dict(store.config())
    except Exception as exc:  # any unreadable config only costs the thumbnails
        return None, f"the store's config cannot be read ({exc})"
    if cfg.data is None:
        return None, "the store's config has no data section"
    if cfg.data.kind == "memory":
        return None, ("the store was made from a dataset passed from Python (data.kind: memory); pass it as "
                      "write_report(..., dataset=...) to see images")
    if cfg.data.kind.startswith("python:"):
        # a store is data: code it names is never run by reading it (a store from elsewhere could name any code)
        return None, (f"the store's data is made by code ({cfg.data.kind}), which a report does not run; pass the "
                      "dataset as write_report(..., dataset=...) to see images")
    try:
        dataset = build_dataset(cfg.data)
    except Exception as exc:  # a missing folder or file only costs the thumbnails
        return None, f"the data of the store's config cannot be loaded ({exc})"
    return dataset, None


def _check_dataset(store: Store, dataset):
    """The dataset if it holds the store's samples and can show them, else None and why."""
    if dataset is not None and not getattr(dataset, "has_pixels", True):
        from polypure.data.datasets import no_pixels_message
        return None, no_pixels_message("a thumbnail")
    if dataset is None or not store.has_samples():
        return dataset, None
    stored = store.sample_ids()
    ids = list(getattr(dataset, "ids", []))
    if len(dataset) != len(stored) or (ids and ids != stored):
        return None, (f"the dataset ({len(dataset)} samples) does not hold the store's {len(stored)} samples "
                      "in the same order")
    return dataset, None


class Images:
    """The store's samples for thumbnails, looked for only when an image has to be drawn.

    Building a dataset from the store's config can take seconds (the demo renders 3000 images), and a
    report whose images are all up to date needs none: a previous write that found the same data
    (config and sample ids) is trusted instead.

    Parameters
    ----------
    store : Store
    dataset : PolypureDataset or callable or None
        The samples, a function without arguments that returns them, or None (rebuilt from the config).
    previous : dict
        What the previous write's manifest kept of the data (:meth:`state`).
    """

    def __init__(self, store: Store, dataset, previous: dict):
        self.store = store
        self.given = dataset
        section = {}
        try:
            section = store.config().get("data") or {}
        except (yaml.YAMLError, AttributeError):
            pass
        self.key = digest(section, store.sample_ids() if store.has_samples() else [])
        self.resolved = False
        self.dataset = None
        self.why: str | None = None
        self.assumed = previous.get("key") == self.key and previous.get("available") is True

    def get(self):
        """The dataset, or None (then :attr:`why` says why)."""
        if not self.resolved:
            self.resolved = True
            given = self.given() if callable(self.given) else self.given
            if given is None:
                self.dataset, self.why = _rebuild_dataset(self.store)
            else:
                self.dataset, self.why = _check_dataset(self.store, given)
        return self.dataset

    @property
    def available(self) -> bool:
        """Whether there are images (trusted from the previous write while nothing has to be drawn)."""
        if not self.resolved and self.assumed:
            return True
        return self.get() is not None

    def state(self) -> dict:
        """What the manifest keeps of the data: its key and whether it was found."""
        return {"key": self.key, "available": self.dataset is not None if self.resolved else self.assumed}


class Thumbs:
    """Writes each reference thumbnail (when not up to date) and knows its file; describes samples.

    Parameters
    ----------
    out : Path
        The report folder.
    images : Images
    store : Store
    outputs : Outputs
        Records each thumbnail in the manifest.
    code : str
        The drawing code's key (:func:`polypure.viz.report_cache.code_key`).
    """

    def __init__(self, out: Path, images: Images, store: Store, outputs: Outputs, code: str):
        self.out = out
        self.images = images
        self.outputs = outputs
        self.code = code
        self.done: dict[str, str | None] = {}
        self.ids = store.sample_ids() if store.has_samples() else []
        self.labels = store.labels() if store.has_samples() else np.zeros(0, np.int64)
        self.classes = store.class_names() if store.has_samples() else None
        self.factors = store.factors()

    def file(self, target: Target, row: int, position: int) -> str | None:
        """Path (relative to the report) of a reference's thumbnail, drawn unless up to date."""
        sample = int(target.refs[row, position])
        box = target.boxes[row, position] if target.boxes is not None else None
        cropped = box is not None and min(int(v) for v in box) >= 0
        name = f"thumbs/{target.slug}/{row}_{position}.png" if cropped else f"thumbs/{sample}.png"
        if name not in self.done:
            self.done[name] = self._draw(name, sample, box if cropped else None)
        return self.done[name]

    def _draw(self, name: str, sample: int, box) -> str | None:
        path = self.out / name
        key = digest("thumbnail", self.code, self.images.key, sample, box)
        entry = self.outputs.cached([path], key)
        if entry is not None:
            return None if entry.get("error") else name
        dataset = self.images.get()
        if dataset is None:
            return None
        from PIL import Image

        try:
            pixels = imaging.thumbnail(dataset, sample, box, size=THUMB_SIZE)
        except (PolypureError, OSError) as exc:
            # an unreadable image costs its thumbnail, not the report
            log.warning("report: no thumbnail of sample %d: %s", sample, exc)
            self.outputs.record([path], key, f"{type(exc).__name__}: {exc}")
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        self.outputs.record([path], key)
        return name

    def describe(self, sample: int) -> str:
        """``sample 12 (id) · class · factor=value`` for a tooltip."""
        parts = [f"sample {sample}"]
        if sample < len(self.ids):
            parts[0] += f" ({self.ids[sample]})"
        if sample < len(self.labels) and self.labels[sample] >= 0:
            label = int(self.labels[sample])
            parts.append(f"class {self.classes[label] if self.classes and label < len(self.classes) else label}")
        for name, (codes, values) in self.factors.items():
            code = int(codes[sample])
            parts.append(f"{name}={values[code] if code < len(values) else code}")
        return " · ".join(parts)
