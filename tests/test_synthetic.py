"""Synthetic concept images: determinism and factor bookkeeping."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from polypure import Experiment
from polypure.config.settings import DataSection
from polypure.data.datasets import build_dataset
from polypure.data.synthetic import CLASS_PAIRS, COLOURS, SHAPES, TEXTURES, class_of_shape, render
from polypure.errors import ConfigError


def test_same_seed_same_images_other_seed_other_images():
    a, fa = render(20, size=32, seed=3)
    b, fb = render(20, size=32, seed=3)
    c, _ = render(20, size=32, seed=4)
    assert np.array_equal(a, b) and all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == (20, 32, 32, 3)


def test_factor_ranges_and_independence():
    _, factors = render(2000, size=16, seed=0)
    assert set(np.unique(factors["shape"])) == set(range(len(SHAPES))) and len(SHAPES) >= 6
    assert set(np.unique(factors["colour"])) == set(range(len(COLOURS))) and len(COLOURS) >= 4
    assert set(np.unique(factors["texture"])) == set(range(len(TEXTURES))) and len(TEXTURES) >= 3
    # factors are drawn independently: shape says nothing about colour
    table = np.histogram2d(factors["shape"], factors["colour"], bins=(len(SHAPES), len(COLOURS)))[0]
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    assert ((table - expected) ** 2 / expected).sum() < 80        # chi-square, 35 dof


def test_the_colour_factor_is_the_colour_of_the_shape():
    images, factors = render(60, size=48, seed=1, noise=0.0)
    red, blue = COLOURS.index("red"), COLOURS.index("blue")
    for i in np.flatnonzero(np.isin(factors["colour"], [red, blue]) & (factors["texture"] == 0)):
        pixels = images[i].reshape(-1, 3).astype(int)
        brightest = pixels[np.argsort(pixels.sum(1))[-20:]].mean(0)
        assert (brightest[0] > brightest[2]) == (factors["colour"][i] == red)


def test_labels_merge_pairs_of_shapes():
    mapping = class_of_shape()
    for label, (first, second) in enumerate(CLASS_PAIRS):
        assert mapping[SHAPES.index(first)] == mapping[SHAPES.index(second)] == label
    assert sorted(np.bincount(mapping)) == [2] * len(CLASS_PAIRS)


def test_factors_go_into_the_store(tmp_path):
    from .nets import tiny
    ds = build_dataset(DataSection(kind="synthetic", synthetic={"n": 40, "size": 24, "seed": 2}, image_size=None,
                                   normalize="none"))
    Experiment(model=tiny(), dataset=ds, store=tmp_path / "s.h5", progress=False, topk={"layers": ["c3"], "k": 4},
               relevance={"target_layer": "c3", "attribution_layers": ["c1"], "n_refs": 2}).topk()
    _, factors = render(40, size=24, seed=2)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        for name, names in (("shape", SHAPES), ("colour", COLOURS), ("texture", TEXTURES)):
            np.testing.assert_array_equal(f[f"samples/factors/{name}"][()], factors[name])
            assert list(f[f"samples/factors/{name}"].attrs["values"]) == list(names)
        np.testing.assert_array_equal(f["samples/labels"][()], class_of_shape()[factors["shape"]])
        assert list(f["samples/labels"].attrs["classes"]) == ["|".join(p) for p in CLASS_PAIRS]


def test_bad_synthetic_option_is_named():
    with pytest.raises(ConfigError, match="data.synthetic: sizee: unknown key"):
        build_dataset(DataSection(kind="synthetic", synthetic={"sizee": 3}, image_size=None))
