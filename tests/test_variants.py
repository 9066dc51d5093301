"""Several attribution rules (variants) in one store, sharing the top-K and the references."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

import polypure.attribution.relevance_plan
import polypure.attribution.topk
from polypure import Experiment
from polypure.cli import main
from polypure.config.settings import load_config, space_name, split_space
from polypure.errors import ConfigError, StaleResultError
from polypure.store.hdf5_store import Store

from .helpers import random_images
from .nets import tiny

GRADIENT = {"id": "gxa", "composite": "gradient"}
LRP = {"id": "lrp", "composite": "epsilon_plus"}
PLANTED = {"pairs": 3, "layer": "c3", "mode": ["sum", "max"], "seed": 1}


def make(store, variants=None, overwrite=False, planted=True, **relevance):
    rel = {"targets": [{"layer": "c3", "neurons": "0:4", "attribution_layers": ["c1", "c2"]}],
           "n_refs": 4, "batch_size": 8, **relevance}
    if variants is not None:
        rel["variants"] = variants
    if planted:
        rel["planted"] = PLANTED
    return Experiment(model=tiny(seed=4), dataset=random_images(20, 16, seed=5), store=store, progress=False,
                      overwrite=overwrite, topk={"layers": ["c3"], "k": 6}, relevance=rel)


@pytest.fixture
def computed(monkeypatch):
    """Records (target, composite, neurons) of every relevance pass and counts top-K passes."""
    log = {"passes": [], "topk": 0}
    compute, collect = polypure.attribution.relevance_plan.compute_target, polypure.attribution.topk.collect_topk

    def counting_compute(dataset, plan, refs, todo, engine, *args, **kwargs):
        composite = type(engine.composite).__name__ if engine.composite is not None else "gradient"
        log["passes"].append((plan.name, composite, plan.neurons[todo].tolist()))
        return compute(dataset, plan, refs, todo, engine, *args, **kwargs)

    def counting_collect(*args, **kwargs):
        log["topk"] += 1
        return collect(*args, **kwargs)

    monkeypatch.setattr(polypure.attribution.relevance_plan, "compute_target", counting_compute)
    monkeypatch.setattr(polypure.attribution.topk, "collect_topk", counting_collect)
    return log


def datasets(path, group):
    """Every dataset under a group, by its path inside the group."""
    out = {}
    with h5py.File(path, "r") as f:
        f[group].visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                            else None)
    return out


def test_space_names_round_trip():
    assert space_name("default", "c2") == "c2" and split_space("c2") == ("default", "c2")
    assert space_name("lrp", "c2") == "lrp:c2" and split_space("lrp:c2") == ("lrp", "c2")


def test_two_variants_equal_two_single_variant_stores_bit_for_bit(tmp_path):
    both = tmp_path / "both.h5"
    make(both, [GRADIENT, LRP]).run(["topk", "relevance", "cluster"])
    singles = {}
    for variant in (GRADIENT, LRP):
        singles[variant["id"]] = tmp_path / f"{variant['id']}.h5"
        make(singles[variant["id"]], composite=variant["composite"]).run(["topk", "relevance"])
    for target in ("c3", "c3@planted"):
        stored = datasets(both, f"relevance/{target}")
        assert set(stored) == {"neurons", "gxa/c1", "gxa/c2", "gxa/activation", "gxa/complete",
                               "lrp/c1", "lrp/c2", "lrp/activation", "lrp/complete"}, target
        for vid, single in singles.items():
            alone = datasets(single, f"relevance/{target}")
            np.testing.assert_array_equal(stored["neurons"], alone["neurons"])
            for name in ("c1", "c2", "activation", "complete"):
                # bit for bit: the same bytes, NaN patterns included
                assert stored[f"{vid}/{name}"].tobytes() == alone[name].tobytes(), (target, vid, name)
        # the rules really differ: the comparison is not between two copies of one thing
        assert not np.allclose(stored["gxa/c1"], stored["lrp/c1"])
    with Store(both) as store:
        assert store.variants("c3") == ["gxa", "lrp"]
        assert store.spaces("c3") == ["gxa:c1", "gxa:c2", "lrp:c1", "lrp:c2", "activation"]
        assert store.baseline_space("c3") == "gxa:c2"
        assert store.variant_attrs("c3", "lrp")["composite"] == "epsilon_plus"
        assert store.variant_attrs("c3", "gxa")["composite"] == "gradient"
        np.testing.assert_array_equal(store.features("c3", "lrp:c2"), datasets(singles["lrp"], "relevance/c3")["c2"])
        np.testing.assert_array_equal(store.features("c3", "activation"), store.relevance("c3", "gxa:activation"))
        assert sorted(store.clusterings("c3")) == sorted(
            (space, "kmeans") for space in ["gxa:c1", "gxa:c2", "lrp:c1", "lrp:c2", "activation"])
        assert store.attributes()["format_version"] == 2


def test_adding_a_variant_computes_only_that_variant(tmp_path, computed):
    path = tmp_path / "s.h5"
    make(path).run(["topk", "relevance", "cluster"])                  # no variants: the rule 'default'
    before = datasets(path, "relevance/c3")
    computed["passes"].clear()
    passes = computed["topk"]
    make(path, [{"id": "default", "composite": "gradient"}, LRP]).run(["topk", "relevance", "cluster"])
    assert computed["topk"] == passes                                  # the top-K was not redone
    assert [(t, c) for t, c, _ in computed["passes"]] == [("c3", "EpsilonPlus"), ("c3@planted", "EpsilonPlus")]
    assert computed["passes"][0][2] == [0, 1, 2, 3]
    after = datasets(path, "relevance/c3")
    for name, value in before.items():                                 # the default variant is untouched
        assert after[name].tobytes() == value.tobytes(), name
    with Store(path) as store:
        assert store.spaces("c3") == ["c1", "c2", "lrp:c1", "lrp:c2", "activation"]
        assert ("c1", "kmeans") in store.clusterings("c3") and ("lrp:c1", "kmeans") in store.clusterings("c3")
    computed["passes"].clear()
    make(path, [{"id": "default", "composite": "gradient"}, LRP]).run(["relevance"])
    assert computed["passes"] == []


def test_a_changed_variant_is_refused_naming_it_and_overwrite_redoes_only_it(tmp_path, computed):
    path = tmp_path / "s.h5"
    make(path, [GRADIENT, LRP], planted=False).run(["topk", "relevance", "cluster"])
    before = datasets(path, "relevance/c3")
    changed = [GRADIENT, {"id": "lrp", "composite": "epsilon_alpha2_beta1"}]
    with pytest.raises(StaleResultError, match=r"target 'c3', variant 'lrp', was made with a different config "
                                               r"\(composite: 'epsilon_plus' -> 'epsilon_alpha2_beta1'\)"):
        make(path, changed, planted=False).run(["relevance"])
    assert all(datasets(path, "relevance/c3")[k].tobytes() == v.tobytes() for k, v in before.items())
    computed["passes"].clear()
    make(path, changed, planted=False, overwrite=True).run(["relevance"])
    assert [(t, c) for t, c, _ in computed["passes"]] == [("c3", "EpsilonAlpha2Beta1")]
    after = datasets(path, "relevance/c3")
    for name in ("gxa/c1", "gxa/c2", "gxa/activation"):
        assert after[name].tobytes() == before[name].tobytes(), name
    assert not np.array_equal(after["lrp/c1"], before["lrp/c1"])
    with Store(path) as store:
        assert store.variants("c3") == ["gxa", "lrp"]                 # its place in the list is kept
        assert ("gxa:c1", "kmeans") in store.clusterings("c3")        # other variants' clusters stay
        assert not any(space.startswith("lrp:") for space, _ in store.clusterings("c3"))


def test_overwrite_without_a_variant_drops_it(tmp_path):
    path = tmp_path / "s.h5"
    make(path, [GRADIENT, LRP], planted=False).run(["topk", "relevance", "cluster"])
    make(path, [GRADIENT], planted=False, overwrite=True).run(["relevance"])
    with Store(path) as store:
        assert store.variants("c3") == ["gxa"] and "relevance/c3/lrp" not in store
        assert all(not space.startswith("lrp:") for space, _ in store.clusterings("c3"))


def test_a_version_1_store_reads_as_the_default_variant_and_grows(tmp_path, computed):
    path = tmp_path / "s.h5"
    make(path, planted=False).run(["topk", "relevance"])
    with h5py.File(path, "a") as f:                                    # what polypure 0.x wrote
        f.attrs["format_version"] = 1
        assert "variants" not in f["relevance/c3"].attrs     # the default alone: the version 1 layout
    with Store(path) as store:
        assert store.variants("c3") == ["default"] and store.spaces("c3") == ["c1", "c2", "activation"]
        assert store.complete("c3").all()
    make(path, [{"id": "default", "composite": "gradient"}, LRP], planted=False).run(["relevance"])
    with Store(path) as store:
        assert store.variants("c3") == ["default", "lrp"] and store.attributes()["format_version"] == 2


@pytest.mark.parametrize("relevance, message", [
    ({"variants": [GRADIENT, GRADIENT]}, "relevance.variants: id 'gxa' is used twice"),
    ({"variants": [GRADIENT], "composite": "epsilon_plus"},
     "give either relevance.variants or relevance.composite, not both"),
    ({"variants": [{"id": "a/b"}]}, "variant id 'a/b': use letters"),
    ({"variants": [{"id": "neurons"}]}, "variant id 'neurons' is reserved"),
    ({"variants": []}, "relevance.variants: give at least one variant"),
])
def test_bad_variants_are_refused_with_one_line(relevance, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"relevance.{key}={value!r}".replace("'", '"') if not isinstance(value, str)
                           else f"relevance.{key}={value}" for key, value in relevance.items()])


@pytest.mark.parametrize("variant, message", [
    ({"id": "lrp", "composite": "epsilon_plsu"}, r"relevance.variants\[1\] \(lrp\).composite: unknown composite"),
    ({"id": "lrp", "composite": "epsilon_plus", "canonizers": ["resnt"]},
     r"relevance.variants\[1\] \(lrp\).canonizers: unknown canonizer 'resnt'"),
    ({"id": "block_2", "composite": "epsilon_plus"}, r"relevance.variants\[1\]: id 'block_2' is the name of an "
                                                     "attribution layer"),
])
def test_a_bad_variant_stops_before_any_work_with_exit_2(tmp_path, capsys, variant, message):
    variants = repr([GRADIENT, variant]).replace("'", '"')
    code = main(["topk", "demo", "--set", f"store={tmp_path / 's.h5'}", f"relevance.variants={variants}",
                 "data.synthetic.n=40"])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "s.h5").exists()


def test_variants_that_act_alike_are_named(tmp_path, caplog):
    alike = [GRADIENT, {"id": "again", "composite": "gradient"}, LRP]
    with caplog.at_level(logging.INFO, logger="polypure"):
        make(tmp_path / "s.h5", alike, planted=False).run(["topk", "relevance"])
    named = [r.getMessage() for r in caplog.records if "gave the same relevance" in r.getMessage()]
    assert named == ["relevance c3: variants gxa, again gave the same relevance at every attribution layer, bit "
                     "for bit (their rules act alike on the modules between the target and its attribution layers)"]
