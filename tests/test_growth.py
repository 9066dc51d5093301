"""A study grows; only a change that invalidates finished work is refused (exit 2)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import polypure.attribution.relevance_plan
import polypure.attribution.topk
from polypure import Experiment
from polypure.cli import main
from polypure.errors import ConfigError, StaleResultError

from .helpers import random_images
from .nets import tiny


def make(store, neurons="0:4", targets=None, overwrite=False, **sections):
    relevance = {"targets": targets or [{"layer": "c3", "neurons": neurons, "attribution_layers": ["c1", "c2"]}],
                 "n_refs": 4, "batch_size": 8, **sections.pop("relevance", {})}
    return Experiment(model=tiny(seed=4), dataset=random_images(20, 16, seed=5), store=store, progress=False,
                      overwrite=overwrite, topk={"layers": ["c3"], "k": 6, **sections.pop("topk", {})},
                      relevance=relevance, **sections)


@pytest.fixture
def computed(monkeypatch):
    """Records the neurons each relevance pass computes and counts top-K passes."""
    log = {"neurons": [], "topk": 0}
    compute, collect = polypure.attribution.relevance_plan.compute_target, polypure.attribution.topk.collect_topk

    def counting_compute(dataset, plan, refs, todo, *args, **kwargs):
        log["neurons"] += plan.neurons[todo].tolist()
        return compute(dataset, plan, refs, todo, *args, **kwargs)

    def counting_collect(*args, **kwargs):
        log["topk"] += 1
        return collect(*args, **kwargs)

    monkeypatch.setattr(polypure.attribution.relevance_plan, "compute_target", counting_compute)
    monkeypatch.setattr(polypure.attribution.topk, "collect_topk", counting_collect)
    return log


def relevance(store, target="c3"):
    with h5py.File(store, "r") as f:
        group = f[f"relevance/{target}"]
        return {name: group[name][()] for name in group}


def test_the_same_neurons_in_another_notation_compute_nothing(tmp_store, computed):
    make(tmp_store, "0:4").run(["topk", "relevance"])
    computed["neurons"].clear()
    make(tmp_store, [0, 1, 2, 3]).run(["topk", "relevance"])
    make(tmp_store, [3, 1]).run(["topk", "relevance", "cluster"])
    assert computed["neurons"] == [] and computed["topk"] == 1
    assert relevance(tmp_store)["neurons"].tolist() == [0, 1, 2, 3]      # fewer neurons: nothing is dropped


def test_more_neurons_compute_only_the_new_ones_and_equal_a_fresh_store(tmp_path, computed):
    grown = tmp_path / "grown.h5"
    make(grown, "0:4").run(["topk", "relevance", "cluster"])
    computed["neurons"].clear()
    make(grown, "0:6").run(["topk", "relevance"])
    assert computed["neurons"] == [4, 5] and computed["topk"] == 1
    with h5py.File(grown, "r") as f:
        assert "clusters/c3" not in f                     # clusters of the old rows are gone, not mismatched
    make(grown, "0:6").run(["cluster"])
    fresh = tmp_path / "fresh.h5"
    make(fresh, "0:6").run(["topk", "relevance", "cluster"])
    a, b = relevance(grown), relevance(fresh)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with h5py.File(grown, "r") as f, h5py.File(fresh, "r") as g:
        np.testing.assert_array_equal(f["clusters/c3/c1/kmeans"][()], g["clusters/c3/c1/kmeans"][()])


def test_another_target_computes_only_that_target(tmp_store, computed):
    first = [{"layer": "c3", "neurons": "0:3", "attribution_layers": ["c1", "c2"]}]
    make(tmp_store, targets=first).run(["topk", "relevance"])
    computed["neurons"].clear()
    both = [*first, {"layer": "logits", "neurons": "all", "attribution_layers": ["c3"]}]
    make(tmp_store, targets=both, topk={"layers": ["c3", "logits"]}).run(["topk", "relevance"])
    assert computed["neurons"] == [0, 1, 2, 3]         # the four logits, nothing of c3
    assert computed["topk"] == 2                        # the second pass covered only the new layer


def test_a_new_rule_is_refused_with_exit_2_and_overwrite_redoes_only_relevance(tmp_store, computed):
    make(tmp_store).run(["topk", "relevance", "cluster"])
    before = relevance(tmp_store)
    with pytest.raises(StaleResultError, match=r"relevance of target 'c3' .*composite: 'gradient' -> "
                                               r"'epsilon_plus'.*--overwrite") as info:
        make(tmp_store, relevance={"composite": "epsilon_plus"}).run(["topk", "relevance"])
    assert isinstance(info.value, ConfigError)
    np.testing.assert_array_equal(relevance(tmp_store)["c1"], before["c1"])   # nothing lost
    computed["neurons"].clear()
    topk_passes = computed["topk"]
    make(tmp_store, relevance={"composite": "epsilon_plus"}, overwrite=True).run(["topk", "relevance"])
    assert computed["topk"] == topk_passes           # top-K did not change, so it was not redone
    assert computed["neurons"] == [0, 1, 2, 3]
    with h5py.File(tmp_store, "r") as f:
        assert f["relevance/c3"].attrs["composite"] == "epsilon_plus"
        assert "clusters/c3" not in f


def test_overwrite_with_fewer_neurons_drops_the_others(tmp_store, computed):
    make(tmp_store, "0:4").run(["topk", "relevance"])
    before = relevance(tmp_store)
    computed["neurons"].clear()
    make(tmp_store, [1, 3], overwrite=True).run(["topk", "relevance"])
    after = relevance(tmp_store)
    assert computed["neurons"] == []
    assert after["neurons"].tolist() == [1, 3]
    np.testing.assert_array_equal(after["c2"], before["c2"][[1, 3]])


def test_a_new_k_is_refused_and_overwrite_recomputes_what_depends_on_it(tmp_store, computed):
    make(tmp_store).run(["topk", "relevance"])
    with pytest.raises(StaleResultError, match=r"top-K of 'c3' .*topk.k: 6 -> 5"):
        make(tmp_store, topk={"k": 5}).run(["topk"])
    computed["neurons"].clear()
    make(tmp_store, topk={"k": 5}, overwrite=True).run(["topk", "relevance"])
    assert computed["neurons"] == [0, 1, 2, 3]
    with h5py.File(tmp_store, "r") as f:
        assert f["topk/c3/indices"].shape == (16, 5)


def test_the_command_line_exits_2_for_a_stale_store(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = tmp_path / "c.yaml"
    config.write_text(f"store: {tmp_path / 's.h5'}\nmodel: {{name: torchvision:resnet18}}\n"
                      f"data: {{kind: images, root: {images}, image_size: 16, num_workers: 0}}\n"
                      "topk: {layers: [block_3], k: 4}\n"
                      "relevance: {target_layer: block_3, neurons: '0:2', attribution_layers: [block_2], n_refs: 2}\n")
    assert main(["run", str(config), "-q", "--stages", "topk,relevance"]) == 0
    assert main(["relevance", str(config), "-q", "--set", "relevance.neurons=[0, 1]"]) == 0
    capsys.readouterr()
    assert main(["relevance", str(config), "-q", "--set", "relevance.composite=epsilon_plus"]) == 2
    err = capsys.readouterr().err
    assert "relevance of target 'block_3' was made with a different config" in err and err.count("\n") == 1
    assert main(["relevance", str(config), "-q", "--set", "model.name=torchvision:resnet34"]) == 2
    assert "model.name: 'torchvision:resnet18' -> 'torchvision:resnet34'" in capsys.readouterr().err
