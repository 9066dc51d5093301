"""Must-show 3: a run stopped after some neurons and started again writes the same store."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from polypure import Experiment
from polypure.attribution import relevance_plan
from polypure.store.hdf5_store import Store

from .helpers import random_images
from .nets import tiny

SETTINGS = dict(
    data={"batch_size": 8},
    topk={"layers": ["c3"], "k": 6, "checkpoint_every": 1},
    relevance={"targets": [{"layer": "c3", "neurons": "all", "attribution_layers": ["c1", "c2"]},
                           {"layer": "logits", "neurons": [0, 2, 3], "attribution_layers": ["c2", "c3"]}],
               "n_refs": 4, "batch_size": 8,
               "planted": {"pairs": 3, "layer": "c3", "mode": ["sum", "max"], "seed": 1}},
)


def contents(path):
    """Every dataset and attribute of a store, except when it was created."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = {k: v for k, v in f.attrs.items() if k != "created"}
        # the two stores differ in their own path, nothing else
        out["/"]["config"] = out["/"]["config"].replace(str(path), "STORE")

        def visit(name, obj):
            attrs = dict(obj.attrs)
            out[name] = (obj[()] if isinstance(obj, h5py.Dataset) else None, attrs)
        f.visititems(visit)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "/":
            assert {k: str(v) for k, v in a[key].items()} == {k: str(v) for k, v in b[key].items()}
            continue
        (da, aa), (db, ab) = a[key], b[key]
        if da is not None:
            np.testing.assert_array_equal(da, db, err_msg=key)
        assert {k: str(v) for k, v in aa.items()} == {k: str(v) for k, v in ab.items()}, key


def make(path):
    return Experiment(model=tiny(seed=4), dataset=random_images(30, 24, seed=5), store=path, progress=False,
                      **SETTINGS)


@pytest.mark.parametrize("stop_after", [1, 3])
def test_interrupted_relevance_resumes_to_the_same_store(tmp_path, monkeypatch, stop_after):
    make(tmp_path / "whole.h5").run(["topk", "relevance"])

    original = Store.write_relevance_rows
    calls = {"n": 0}

    def interrupted(self, target, rows, arrays, **kwargs):
        original(self, target, rows, arrays, **kwargs)
        calls["n"] += 1
        if calls["n"] == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(Store, "write_relevance_rows", interrupted)
    # written every two passes' worth of neurons (whole targets at once by default, at this size); the rerun
    # shares forward passes over all the neurons left, and still writes the same numbers
    monkeypatch.setattr(relevance_plan, "SHARE_PASSES", 2)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "resumed.h5").run(["topk", "relevance"])
    monkeypatch.setattr(Store, "write_relevance_rows", original)
    monkeypatch.undo()

    with h5py.File(tmp_path / "resumed.h5", "r") as f:
        done = f["relevance/c3/complete"][()]
        assert 0 < done.sum() < len(done)        # really stopped part-way

    make(tmp_path / "resumed.h5").run(["topk", "relevance"])
    assert_same(contents(tmp_path / "whole.h5"), contents(tmp_path / "resumed.h5"))


def test_interrupted_topk_resumes_to_the_same_store(tmp_path, monkeypatch):
    make(tmp_path / "whole.h5").run(["topk"])
    original = Store.write_topk
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Store, "write_topk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "resumed.h5").run(["topk"])
    monkeypatch.setattr(Store, "write_topk", original)
    with h5py.File(tmp_path / "resumed.h5", "r") as f:
        assert not f["topk/c3"].attrs["complete"]
        assert 0 < f["topk/c3"].attrs["samples_done"] < 30
    make(tmp_path / "resumed.h5").run(["topk"])
    assert_same(contents(tmp_path / "whole.h5"), contents(tmp_path / "resumed.h5"))


def test_a_different_config_is_refused_unless_overwriting(tmp_path):
    from polypure.errors import StoreError
    make(tmp_path / "s.h5").run(["topk"])
    changed = Experiment(model=tiny(seed=4), dataset=random_images(30, 24, seed=5), store=tmp_path / "s.h5",
                         progress=False, **{**SETTINGS, "topk": {**SETTINGS["topk"], "k": 5}})
    with pytest.raises(StoreError, match=r"different config \(topk.k: 6 -> 5\).*--overwrite"):
        changed.topk()
    changed.overwrite = True
    changed.topk()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["topk/c3/indices"].shape == (16, 5)
