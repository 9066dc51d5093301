"""Image helpers: thumbnails, grids and UMAP canvases as plain RGB arrays."""

from __future__ import annotations

import numpy as np

from polypure.data.datasets import ArrayDataset
from polypure.viz import imaging


def test_thumbnail_makes_grey_rgb_and_follows_crop_boxes():
    pixels = np.zeros((1, 20, 10), np.uint8)
    pixels[0, 5:10, 2:6] = 255
    ds = ArrayDataset(pixels)
    whole = imaging.thumbnail(ds, 0, size=20)
    assert whole.shape == (20, 20, 3) and whole.dtype == np.uint8
    assert (whole[..., 0] == whole[..., 1]).all()
    assert (whole[:, :5] == 255).all() and (whole[:, -5:] == 255).all()      # 20 x 10 centred on white
    np.testing.assert_array_equal(imaging.thumbnail(ds, 0, (-1, -1, -1, -1), size=20), whole)
    cropped = imaging.thumbnail(ds, 0, (5, 10, 2, 6), size=8)
    assert cropped.shape == (8, 8, 3)
    assert cropped[1:7].min() == 255      # only the white square is left, padded with white


def test_mosaic_lays_thumbnails_out_row_by_row_on_white():
    tiles = [np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)]
    grid = imaging.mosaic(tiles, columns=2, rows=2, gap=1)
    assert grid.shape == (9, 9, 3)
    assert grid[0, 0, 0] == 10 and grid[0, 5, 0] == 20 and grid[5, 0, 0] == 30
    assert (grid[5:, 5:] == 255).all() and (grid[4] == 255).all()          # the empty slot and the gap


def test_umap_canvas_frames_each_thumbnail_in_its_colour_at_its_place():
    thumbs = [np.zeros((6, 6, 3), np.uint8)] * 2
    canvas = imaging.umap_canvas(np.array([[0.0, 0.0], [1.0, 1.0]]), thumbs, ["#ff0000", "#0000ff"], side=40,
                                 border=1)
    assert canvas.shape == (40, 40, 3)
    assert tuple(canvas[39, 0]) == (255, 0, 0)            # lowest point: bottom left, red frame
    assert tuple(canvas[0, 39]) == (0, 0, 255)            # highest point: top right, blue frame
    assert (canvas[33:39, 1:7] == 0).all()                # the thumbnail inside the frame
    assert (canvas[15:25, 15:25] == 255).all()            # white elsewhere
