"""Image helpers that are not figures: thumbnails of samples, grids of them, and UMAP canvases.

:mod:`polypure.viz.figures` draws with these, and the report writes its thumbnail files with
:func:`thumbnail`. Every function returns an RGB uint8 array; nothing here touches a store or matplotlib's
figures.

Example
-------
>>> import numpy as np
>>> from polypure.data.datasets import ArrayDataset
>>> from polypure.viz.imaging import mosaic, thumbnail
>>> thumb = thumbnail(ArrayDataset(np.zeros((2, 28, 28), np.uint8)), 1, size=16)
>>> thumb.shape, mosaic([thumb] * 3, columns=2, rows=2, gap=1).shape
((16, 16, 3), (33, 33, 3))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def thumbnail(dataset, sample_index: int, crop_box=None, size: int = 64) -> np.ndarray:
    """A sample's view as a square RGB uint8 thumbnail.

    Parameters
    ----------
    dataset : polypure.data.datasets.PolypureDataset
        Supplies ``view(i)``: float (C, H, W) in [0, 1].
    sample_index : int
    crop_box : sequence of 4 int, optional
        (row start, row stop, column start, column stop) as in ``/crops/<target>``; -1 or an empty box
        means the whole image.
    size : int
        Side of the thumbnail in pixels; the image is fitted inside and centred on white.

    Returns
    -------
    ndarray, shape (size, size, 3), uint8
    """
    from PIL import Image

    img = dataset.view(int(sample_index))
    img = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, np.float32)
    if img.ndim == 2:
        img = img[None]
    img = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
    if crop_box is not None and min(int(v) for v in crop_box) >= 0:
        r1, r2, c1, c2 = (int(v) for v in crop_box)
        cut = img[:, r1:r2, c1:c2]
        # the embed stage falls back to the whole image for an empty crop; show what it embedded
        if cut.size and cut.any():
            img = cut
    pixels = (np.clip(img.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)
    h, w = pixels.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(pixels).resize(new, Image.Resampling.LANCZOS if scale < 1
                                                        else Image.Resampling.NEAREST))
    out = np.full((size, size, 3), 255, np.uint8)
    top, left = (size - new[1]) // 2, (size - new[0]) // 2
    out[top:top + new[1], left:left + new[0]] = resized
    return out


def mosaic(images: Sequence[np.ndarray], columns: int = 4, rows: int = 2, gap: int = 2) -> np.ndarray:
    """Square thumbnails laid out in a grid on white (empty slots stay white)."""
    size = images[0].shape[0] if len(images) else 8
    out = np.full((rows * size + (rows - 1) * gap, columns * size + (columns - 1) * gap, 3), 255, np.uint8)
    for i, img in enumerate(images[:rows * columns]):
        r, c = divmod(i, columns)
        out[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = img
    return out


def umap_canvas(coords: np.ndarray, thumbs: Sequence[np.ndarray], colours: Sequence[str], side: int = 380,
                border: int = 2) -> np.ndarray:
    """Thumbnails pasted at their 2-D positions on a white square, each framed in its colour.

    Parameters
    ----------
    coords : ndarray, shape (n, 2)
        Positions (any scale; y grows upwards as in a plot).
    thumbs : sequence of ndarray (t, t, 3) uint8
    colours : sequence of matplotlib colours
    side : int
        Canvas side in pixels.
    border : int
        Frame width in pixels.

    Returns
    -------
    ndarray, shape (side, side, 3), uint8
    """
    from matplotlib.colors import to_rgb

    canvas = np.full((side, side, 3), 255, np.uint8)
    if not len(coords):
        return canvas
    t = thumbs[0].shape[0] + 2 * border
    lo, hi = coords.min(0), coords.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    free = side - t
    cols = np.rint((coords[:, 0] - lo[0]) / span[0] * free).astype(int)
    rows = np.rint((hi[1] - coords[:, 1]) / span[1] * free).astype(int)
    for r, c, img, colour in zip(rows, cols, thumbs, colours):
        canvas[r:r + t, c:c + t] = np.rint(np.array(to_rgb(colour)) * 255).astype(np.uint8)
        canvas[r + border:r + t - border, c + border:c + t - border] = img
    return canvas


def shrink(img: np.ndarray, size: int) -> np.ndarray:
    """A square thumbnail resized to ``size`` pixels (returned as is when it has that size)."""
    from PIL import Image

    if img.shape[0] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))
