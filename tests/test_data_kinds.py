"""Data kinds come from a registry: the built-ins, and kinds that packages add through ``polypure.datasets``."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from polypure import Experiment
from polypure.config.settings import DataSection, config_from_dict
from polypure.data.datasets import DATASETS, ArrayDataset, FactoryDataset, build_dataset
from polypure.errors import ConfigError

from .helpers import doc_page
from .nets import tiny

GUIDE = doc_page("how-to/data-kind.md")

#: A second package: a kind that returns a plain torch dataset, one whose module is missing, and one that
#: tries to take the reserved name.
OTHER_PACKAGE = '''
import torch


class Pixels(torch.utils.data.Dataset):
    def __init__(self, n):
        self.images = torch.rand(n, 3, 20, 20, generator=torch.Generator().manual_seed(0))
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


def pixels(data, **geometry):
    return Pixels(data.kwargs.get("n", 10))


def nothing(data, **geometry):
    return None
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Install, as far as entry points go, the data-kind guide's kind and :data:`OTHER_PACKAGE`."""
    python, = re.findall(r"```python\n(.*?)```", GUIDE, flags=re.DOTALL)
    toml, = re.findall(r"```toml\n(.*?)```", GUIDE, flags=re.DOTALL)
    # the table's lines as pyproject.toml has them (tomllib is Python 3.11+, polypure runs on 3.10)
    assert toml.startswith('[project.entry-points."polypure.datasets"]\n')
    entries = dict(re.findall(r'^([\w-]+) = "([\w.]+:\w+)"$', toml, flags=re.MULTILINE))
    site = tmp_path / "site"
    (site / "my_data_kinds-1.0.dist-info").mkdir(parents=True)
    (site / "my_data_kinds-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: my-data-kinds\nVersion: 1.0\n")
    lines = [f"{name} = {target}" for name, target in entries.items()]
    lines += ["pixels = other_kinds:pixels", "nothing = other_kinds:nothing", "broken = no_such_module:kind",
              "memory = other_kinds:pixels"]
    (site / "my_data_kinds-1.0.dist-info" / "entry_points.txt").write_text(
        "[polypure.datasets]\n" + "\n".join(lines) + "\n")
    for target in entries.values():
        (site / (target.split(":")[0] + ".py")).write_text(python)
    (site / "other_kinds.py").write_text(OTHER_PACKAGE)
    monkeypatch.syspath_prepend(str(site))
    # the registry reads the entry points once; let it read them again, and forget them afterwards
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
    monkeypatch.setattr(DATASETS, "_plugins_loaded", False)
    return entries


def test_the_builtin_kinds_are_registered():
    assert {"imagefolder", "images", "npz", "synthetic", "memory"} <= set(DATASETS.names())


def test_unknown_kind_lists_the_builtins_in_the_old_words():
    with pytest.raises(ConfigError, match=re.escape(
            "data.kind: unknown data kind 'imagefolders'; use imagefolder, images, npz, synthetic or "
            "python:MODULE:FACTORY")):
        config_from_dict({"data": {"kind": "imagefolders"}})


def test_unknown_kind_lists_the_plugins_too(plugins):
    assert list(plugins) == ["checkerboards"]
    with pytest.raises(ConfigError, match="use broken, checkerboards, imagefolder, images, nothing, npz, pixels, "
                                          "synthetic or python:MODULE:FACTORY"):
        config_from_dict({"data": {"kind": "checkerboard"}})


def test_a_plugin_kind_is_built_from_the_data_section(plugins):
    cfg = config_from_dict({"data": {"kind": "checkerboards", "kwargs": {"n": 10, "size": 24}, "image_size": 16,
                                     "limit": 6}})
    ds = build_dataset(cfg.data)
    assert isinstance(ds, ArrayDataset) and len(ds) == 6
    assert ds.ids == [f"index:{i}" for i in range(6)]
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 3, 0, 1])
    assert ds.class_names == ["period 2", "period 4", "period 8", "period 16"]
    # the geometry reached the dataset: 24 pixels resized to round(16 * 256 / 224) = 18, centre-cropped to 16
    assert ds.view(0).shape == (3, 16, 16) and ds.resize == 18
    # and normalize: auto gave RGB data ImageNet's statistics, as for the built-ins
    assert ds.mean is not None and ds[0][0].min() < 0


def test_a_plugin_kind_runs_topk_from_a_config(plugins, tmp_path):
    exp = Experiment(model=tiny(), store=tmp_path / "s.h5", progress=False,
                     data={"kind": "checkerboards", "kwargs": {"n": 24, "size": 20}, "image_size": None,
                           "num_workers": 0},
                     topk={"layers": ["c3"], "k": 4},
                     relevance={"target_layer": "c3", "attribution_layers": ["c1"], "n_refs": 2})
    exp.topk()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["samples/labels"][()], np.arange(24) % 4)
        assert list(f["samples/labels"].attrs["classes"]) == ["period 2", "period 4", "period 8", "period 16"]
        assert f["topk/c3/indices"].shape == (16, 4) and f["topk/c3"].attrs["complete"]


def test_a_plugin_kind_may_return_a_torch_dataset(plugins):
    ds = build_dataset(DataSection(kind="pixels", kwargs={"n": 6}, image_size=12, normalize="none"))
    assert isinstance(ds, FactoryDataset)
    np.testing.assert_array_equal(ds.labels, [0, 1, 0, 1, 0, 1])
    assert ds[0][0].shape == (3, 12, 12) and 0 <= ds[0][0].min() and ds[0][0].max() <= 1


def test_what_is_not_a_dataset_is_a_config_error(plugins):
    with pytest.raises(ConfigError, match="data.kind: nothing returned NoneType, not a dataset"):
        build_dataset(DataSection(kind="nothing"))


def test_a_broken_plugin_fails_when_its_kind_is_used(plugins):
    assert config_from_dict({"data": {"kind": "broken"}}).data.kind == "broken"
    with pytest.raises(ConfigError, match="data kind plugin 'broken' \\(no_such_module:kind\\) failed to load"):
        build_dataset(DataSection(kind="broken"))
    assert isinstance(build_dataset(DataSection(kind="checkerboards", image_size=None)), ArrayDataset)


def test_memory_stays_reserved(plugins):
    with pytest.raises(ConfigError, match="stands for a dataset passed from Python"):
        build_dataset(DataSection(kind="memory"))
