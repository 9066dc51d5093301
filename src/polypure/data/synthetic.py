"""Synthetic concept images with known factors: shape, colour, texture (``data.kind: synthetic``).

Each image shows one shape on a noisy grey background. Shape, colour and texture are independent
factors drawn per image; position, size, rotation, background level, colour tint and pixel noise are
jitter. The same seed always gives the same images. The factors of every sample go into the store
(``/samples/factors/<factor>``), so that clustering can be scored against them.

Class labels merge pairs of unrelated shapes (:data:`CLASS_PAIRS`) and ignore colour and texture: a
classifier of these labels needs a logit per pair of shapes, which is polysemantic by construction.

Example
-------
>>> from polypure.data.synthetic import render
>>> images, factors = render(8, size=32, seed=0)
>>> images.shape, sorted(factors)
((8, 32, 32, 3), ['colour', 'shape', 'texture'])
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polypure.config.settings import DataSection, format_validation_error
from polypure.data.datasets import ArrayDataset
from polypure.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "crescent", "bar")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
TEXTURES = ("solid", "stripes", "dots", "checker")
#: Each class is two shapes that share nothing visual; colour and texture do not matter.
CLASS_PAIRS = (("circle", "cross"), ("square", "star"), ("triangle", "ring"), ("crescent", "bar"))

_RGB = np.array([(1.0, 0.12, 0.1), (0.12, 0.78, 0.15), (0.15, 0.3, 1.0), (1.0, 0.88, 0.1),
                 (0.9, 0.12, 0.9), (0.1, 0.88, 0.9)], np.float32)


class SyntheticSpec(BaseModel):
    """Options of ``data.synthetic``."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(3000, ge=1)
    """Number of images."""
    size: int = Field(64, ge=16)
    """Side of the images in pixels."""
    seed: int = 0
    """Seeds the factors, placements and noise of the images."""
    noise: float = Field(0.04, ge=0)
    """Standard deviation of the pixel noise."""


def class_of_shape() -> np.ndarray:
    """Class index of every shape index."""
    out = np.empty(len(SHAPES), np.int64)
    for label, pair in enumerate(CLASS_PAIRS):
        for shape in pair:
            out[SHAPES.index(shape)] = label
    return out


def class_names() -> list[str]:
    """Name of every class: its two shapes joined by ``|``."""
    return ["|".join(pair) for pair in CLASS_PAIRS]


def _box(x, y, hx, hy):
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _polygon(x, y, n, apothem):
    angles = 2 * np.pi * np.arange(n) / n + np.pi / 2
    return np.max(np.stack([x * np.cos(a) + y * np.sin(a) for a in angles]), axis=0) - apothem


def _shape_distance(shape: str, x, y):
    """Approximate signed distance (negative inside) of a unit-sized shape in local coordinates."""
    r = np.hypot(x, y)
    if shape == "circle":
        return r - 0.85
    if shape == "square":
        return _box(x, y, 0.72, 0.72)
    if shape == "triangle":
        return _polygon(x, y, 3, 0.48)
    if shape == "cross":
        return np.minimum(_box(x, y, 0.9, 0.28), _box(x, y, 0.28, 0.9))
    if shape == "star":
        phi = np.arctan2(y, x)
        return r - (0.38 + 0.6 * np.abs(np.cos(2.5 * phi)) ** 3)
    if shape == "ring":
        return np.abs(r - 0.65) - 0.2
    if shape == "crescent":
        return np.maximum(r - 0.88, -(np.hypot(x - 0.45, y) - 0.68))
    if shape == "bar":
        return _box(x, y, 0.95, 0.3)
    raise ValueError(shape)


def _texture(texture: str, u, v):
    """1 where the texture shows the full colour, 0 where it shows the darker shade."""
    if texture == "solid":
        return np.ones_like(u)
    if texture == "stripes":
        return (np.sin(2 * np.pi * u / 0.42) > 0).astype(np.float32)
    if texture == "dots":
        du, dv = (u / 0.5) % 1 - 0.5, (v / 0.5) % 1 - 0.5
        return (np.hypot(du, dv) > 0.25).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u / 0.4) + np.floor(v / 0.4)) % 2).astype(np.float32)
    raise ValueError(texture)


def render(n: int, size: int = 64, seed: int = 0, noise: float = 0.04) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Generate ``n`` images and their factors.

    Parameters
    ----------
    n : int
    size : int
        Side in pixels.
    seed : int
    noise : float
        Standard deviation of the pixel noise.

    Returns
    -------
    images : ndarray (n, size, size, 3) uint8
    factors : dict of str to ndarray (n,) int64
        ``shape``, ``colour``, ``texture`` codes (indices into :data:`SHAPES`, :data:`COLOURS`, :data:`TEXTURES`).
    """
    rng = np.random.default_rng(seed)
    factors = {"shape": rng.integers(0, len(SHAPES), n), "colour": rng.integers(0, len(COLOURS), n),
               "texture": rng.integers(0, len(TEXTURES), n)}
    scale = rng.uniform(0.17, 0.27, n) * size
    cx = rng.uniform(0, 1, n) * (size - 2 * scale) + scale
    cy = rng.uniform(0, 1, n) * (size - 2 * scale) + scale
    theta = rng.uniform(0, 2 * np.pi, n)
    background = rng.uniform(0.05, 0.4, n)
    tint = rng.uniform(-0.08, 0.08, (n, 3))
    images = np.empty((n, size, size, 3), np.uint8)
    grid = np.arange(size, dtype=np.float32) + 0.5
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    for i in range(n):
        dx, dy = (gx - cx[i]) / scale[i], (gy - cy[i]) / scale[i]
        c, s = np.cos(theta[i]), np.sin(theta[i])
        u, v = c * dx + s * dy, -s * dx + c * dy
        distance = _shape_distance(SHAPES[factors["shape"][i]], u, v)
        # one pixel of soft edge, in local units
        mask = np.clip(0.5 - distance * scale[i], 0, 1)[..., None]
        pattern = _texture(TEXTURES[factors["texture"][i]], u, v)[..., None]
        colour = np.clip(_RGB[factors["colour"][i]] + tint[i], 0, 1)
        fill = colour * (0.3 + 0.7 * pattern)
        img = background[i] * (1 - mask) + fill * mask + rng.normal(0, noise, (size, size, 1))
        images[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, {k: v.astype(np.int64) for k, v in factors.items()}


def synthetic_dataset(data: DataSection, **geometry) -> ArrayDataset:
    """Build the dataset of ``data.kind: synthetic``, with labels, factors and class names.

    Registered as the data kind ``synthetic`` (:data:`polypure.data.datasets.DATASETS`).

    Parameters
    ----------
    data : polypure.config.settings.DataSection
        Its ``synthetic`` mapping holds the options (n, size, seed, noise).
    **geometry
        ``image_size`` and ``resize`` of :class:`polypure.data.datasets.PolypureDataset`.

    Returns
    -------
    polypure.data.datasets.ArrayDataset
    """
    try:
        spec = SyntheticSpec.model_validate(data.synthetic or {})
    except ValidationError as exc:
        raise ConfigError(f"data.synthetic: {format_validation_error(exc, SyntheticSpec)}") from None
    images, factors = render(spec.n, spec.size, spec.seed, spec.noise)
    ds = ArrayDataset(images, labels=class_of_shape()[factors["shape"]], **geometry)
    ds.factors = {"shape": (factors["shape"], list(SHAPES)), "colour": (factors["colour"], list(COLOURS)),
                  "texture": (factors["texture"], list(TEXTURES))}
    ds.class_names = class_names()
    return ds
