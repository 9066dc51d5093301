"""Unit tests of polypure.store.hdf5_store: the Store's typed accessors and the HDF5 schema it owns.

Every store is built directly through the Store API (no model), and checked against numpy arrays built
here and plain h5py reads of the file.
"""

from __future__ import annotations

import datetime as dt

import h5py
import numpy as np
import pytest
import yaml

import polypure
from polypure.errors import ConfigError, StaleResultError, StoreError
from polypure.store.hdf5_store import Store
from polypure.store.schema import ACTIVATION, CLASS, FORMAT_VERSION, PLANTED, STR, planted_layer, planted_target

CONFIG = {"model": {"name": "torchvision:resnet18"}, "data": {"kind": "images", "root": "/data/a"}, "seed": 0,
          "topk": {"layers": ["c3"], "k": 4}}
N, K, C3, N_REFS = 10, 4, 6, 3
LAYERS = {"c1": 2, "c2": 5}
RULE = {"composite": "gradient", "canonizers": ["merge_batchnorm"], "init_rel": "clamp(min=0)",
        "times_activation": True, "n_refs": N_REFS, "layer": "c3", "attribution_layers": ["c1", "c2"]}
FACTOR_VALUES = ["square", "circle", "heart"]


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=True)


def changed(**sections) -> dict:
    return {**CONFIG, **sections}


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store.h5"


@pytest.fixture
def store(path):
    with Store.open_for_run(path, dump(CONFIG)) as s:
        yield s


def topk_arrays(channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of a made-up top-K: values decreasing along K, indices distinct per channel."""
    rng = np.random.default_rng(seed)
    values = -np.sort(-rng.random((channels, K)), axis=1).astype(np.float32)
    indices = np.stack([rng.permutation(N)[:K] for _ in range(channels)]).astype(np.int64)
    return values, indices


def rows(m: int, channels: int, start: float) -> np.ndarray:
    """Distinct float32 rows (m, n_refs, channels)."""
    return (start + np.arange(m * N_REFS * channels, dtype=np.float32)).reshape(m, N_REFS, channels)


def samples(store: Store, labels=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids = [f"index:{i}" for i in range(N)]
    labels = np.arange(N) % 3 if labels is None else labels
    shape = (np.arange(N) * 7) % 3
    store.write_samples(ids, labels, {"shape": (shape, FACTOR_VALUES)}, class_names=["a", "b", "c"])
    return ids, labels, shape


def relevance_target(store: Store, target: str = "c3", neurons=(4, 1, 3), attrs=None, overwrite=False):
    return store.prepare_relevance(target, np.array(neurons), N_REFS, LAYERS, C3, attrs or RULE, overwrite=overwrite)


def fill_rows(store: Store, target: str, m: int, start: float = 0.0) -> dict[str, np.ndarray]:
    """Write every row of a target; returns what was written."""
    arrays = {"c1": rows(m, 2, start), "c2": rows(m, 5, start + 1000), ACTIVATION: rows(m, C3, start + 2000)}
    store.write_relevance_rows(target, np.arange(m), arrays)
    return arrays


def add_derived(store: Store, target: str) -> None:
    """Everything derived from a target's rows: clusters, an embedding, crops, metrics."""
    m = len(store.neurons(target))
    store.write_clusters(target, "c2", "kmeans", np.zeros((m, N_REFS), np.int64), {"method": "kmeans"})
    store.write_embeddings("e1", target, np.zeros((m, N_REFS, 2)), {"signature": "s"})
    store.write_crops(target, np.full((m, N_REFS, 4), -1), "gradient")
    store.write_metric(target, "ari", ["class", "c2", "kmeans"], np.zeros(m))


def derived_paths(target: str) -> list[str]:
    return [f"clusters/{target}", f"embeddings/e1/{target}", f"crops/{target}", f"metrics/{target}"]


def summary_table() -> np.ndarray:
    dtype = np.dtype([("target", STR), ("metric", STR), ("mean", np.float64), ("n", np.int64)])
    return np.array([("c3", "ari", 0.5, 3), ("logits", "nmi", 0.25, 4)], dtype=dtype)


def read_group(path, group: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: ds[()] for name, ds in f[group].items()}


# -- open_for_run ----------------------------------------------------------------------------------------------


def test_open_for_run_creates_the_format_attributes(tmp_path):
    path = tmp_path / "new" / "folder" / "s.h5"
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    Store.open_for_run(path, dump(CONFIG)).close()
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "polypure"
        assert f.attrs["format_version"] == FORMAT_VERSION == 2
        assert yaml.safe_load(f.attrs["config"]) == CONFIG
        assert f.attrs["polypure_version"] == polypure.__version__
        created = dt.datetime.fromisoformat(f.attrs["created"])
        assert created.tzinfo is not None and before <= created <= dt.datetime.now(dt.timezone.utc)
        assert list(f.keys()) == []


def test_the_same_model_data_and_seed_reopen_and_keep_results(path):
    with Store.open_for_run(path, dump(CONFIG)) as s:
        s.write_array("extra/x", np.arange(3))
        created = s.attributes()["created"]
    other_topk = changed(topk={"layers": ["c2"], "k": 9})       # checked result by result, not here
    with Store.open_for_run(path, dump(other_topk)) as s:
        np.testing.assert_array_equal(s.read("extra/x"), np.arange(3))
        assert s.attributes()["created"] == created
        assert s.config() == other_topk                          # the config attribute follows the run
    with h5py.File(path, "r") as f:
        assert yaml.safe_load(f.attrs["config"])["topk"]["k"] == 9


@pytest.mark.parametrize("config, key", [
    (changed(model={"name": "torchvision:resnet34"}), "model.name"),
    (changed(data={"kind": "images", "root": "/data/b"}), "data.root"),
    (changed(seed=1), "seed"),
])
def test_another_model_data_or_seed_is_stale_unless_overwritten(path, config, key):
    with Store.open_for_run(path, dump(CONFIG)) as s:
        s.write_array("extra/x", np.arange(3))
    with pytest.raises(StaleResultError, match=rf"different config \({key}: .*--overwrite") as info:
        Store.open_for_run(path, dump(config))
    assert isinstance(info.value, ConfigError)
    with h5py.File(path, "r") as f:                              # nothing was touched
        assert "extra/x" in f and yaml.safe_load(f.attrs["config"]) == CONFIG
    with Store.open_for_run(path, dump(config), overwrite=True) as s:
        assert "extra/x" not in s and s.config() == config
    with h5py.File(path, "r") as f:                              # a fresh store
        assert list(f.keys()) == [] and f.attrs["format"] == "polypure"


def test_a_file_that_is_not_hdf5_is_a_store_error(path):
    path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(StoreError, match="not an HDF5 file") as info:
        Store.open_for_run(path, dump(CONFIG))
    assert not isinstance(info.value, StaleResultError)
    with pytest.raises(StoreError, match="cannot be opened"):
        Store(path)
    assert path.read_bytes() == b"not an hdf5 file at all"


def test_an_hdf5_file_that_is_not_a_store_is_a_store_error(path):
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(4)
    with pytest.raises(StoreError, match="not a polypure store"):
        Store.open_for_run(path, dump(CONFIG))
    with pytest.raises(StoreError, match="not a polypure store"):
        Store(path)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][()], np.arange(4))


def test_a_newer_format_version_is_refused(path):
    Store.open_for_run(path, dump(CONFIG)).close()
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    for open_store in (lambda: Store(path), lambda: Store(path, "a"), lambda: Store.open_for_run(path, dump(CONFIG))):
        with pytest.raises(StoreError, match=f"format version {FORMAT_VERSION + 1}; .* reads up to {FORMAT_VERSION}"):
            open_store()


def test_a_missing_store_cannot_be_read(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "none.h5")
    assert not (tmp_path / "none.h5").exists()


def test_attributes_and_config(store):
    attrs = store.attributes()
    assert set(attrs) == {"format", "format_version", "created", "polypure_version"}
    assert attrs["format"] == "polypure" and attrs["format_version"] == 2 and isinstance(attrs["format_version"], int)
    assert attrs["polypure_version"] == polypure.__version__
    assert store.config() == CONFIG and yaml.safe_load(store.config_yaml) == CONFIG


def test_config_of_a_store_without_one_is_empty(path):
    with Store(path, "a") as s:
        assert s.config() == {} and s.config_yaml == ""


# -- samples ---------------------------------------------------------------------------------------------------


def test_samples_round_trip(store, path):
    assert not store.has_samples()
    ids = ["cats/ä 1.png", "dogs/2.png", "index:2"]
    labels = np.array([0, -1, 1])
    shape = np.array([2, 0, 1])
    store.write_samples(ids, labels, {"shape": (shape, FACTOR_VALUES)}, class_names=["cat", "dog"])
    assert store.has_samples()
    assert store.sample_ids() == ids
    assert store.labels().dtype == np.int64 and store.labels().tolist() == [0, -1, 1]
    assert store.class_names() == ["cat", "dog"]
    codes, values = store.factors()["shape"]
    assert codes.tolist() == [2, 0, 1] and values == FACTOR_VALUES
    store.close()
    with h5py.File(path, "r") as f:
        assert h5py.check_string_dtype(f["samples/ids"].dtype).encoding == "utf-8"
        assert f["samples/ids"].asstr()[()].tolist() == ids
        assert f["samples/labels"].dtype == np.int64
        assert f["samples/labels"].attrs["classes"].tolist() == ["cat", "dog"]
        assert f["samples/factors/shape"].dtype == np.int64
        assert f["samples/factors/shape"][()].tolist() == [2, 0, 1]
        assert f["samples/factors/shape"].attrs["values"].tolist() == FACTOR_VALUES


def test_samples_without_class_names_or_factors(store):
    store.write_samples(["a", "b"], np.array([-1, -1]))
    assert store.class_names() is None and store.factors() == {}


def test_check_samples_refuses_other_samples(store):
    ids, _, _ = samples(store)
    store.check_samples(ids)
    store.check_samples(tuple(ids))
    for other in (ids[::-1], ids[:-1], ids + ["index:99"]):
        with pytest.raises(StoreError, match="holds results for other samples"):
            store.check_samples(other)


def test_update_labels(store, path):
    samples(store)
    store.update_labels(np.array([5] * N))
    assert store.labels().tolist() == [5] * N
    assert store.class_names() == ["a", "b", "c"]           # the attribute stays
    store.close()
    with h5py.File(path, "r") as f:
        assert f["samples/labels"][()].tolist() == [5] * N


# -- top-K -----------------------------------------------------------------------------------------------------


def test_topk_checkpoints_and_completes(store, path):
    assert store.topk_progress("c3") is None
    with pytest.raises(StoreError, match="no complete top-K for layer 'c3'"):
        store.read_topk("c3")
    values, indices = topk_arrays(C3)
    store.write_topk("c3", values[:, :2], indices[:, :2], "mean", samples_done=5, complete=False)
    v, i, done, complete = store.topk_progress("c3")
    np.testing.assert_array_equal(v, values[:, :2])
    np.testing.assert_array_equal(i, indices[:, :2])
    assert (done, complete) == (5, False)
    with pytest.raises(StoreError, match="no complete top-K for layer 'c3'"):
        store.read_topk("c3")

    store.write_topk("c3", values.astype(np.float64), indices.astype(np.int32), "mean", samples_done=N,
                     complete=True, extra={"truth": np.ones((C3, K), np.int64)})
    v, i = store.read_topk("c3")
    assert v.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(v, values)
    np.testing.assert_array_equal(i, indices)
    assert store.topk_statistic("c3") == "mean"
    np.testing.assert_array_equal(store.topk_payload("c3", "truth"), np.ones((C3, K)))
    with pytest.raises(StoreError, match="no 'topk/c3/other'"):
        store.topk_payload("c3", "other")
    store.close()
    with h5py.File(path, "r") as f:
        group = f["topk/c3"]
        assert group["indices"].dtype == np.int64 and group["values"].dtype == np.float32
        assert group.attrs["statistic"] == "mean"
        assert group.attrs["samples_done"] == N and bool(group.attrs["complete"])
        np.testing.assert_array_equal(group["indices"][()], indices)


# -- relevance: creation and rows ------------------------------------------------------------------------------


def test_prepare_relevance_creates_empty_rows(store, path):
    relevance_target(store)
    assert store.relevance_targets() == ["c3"]
    store.close()
    with h5py.File(path, "r") as f:
        group = f["relevance/c3"]
        assert set(group) == {"neurons", "c1", "c2", ACTIVATION, "complete"}
        assert group["neurons"].dtype == np.int64 and group["neurons"][()].tolist() == [4, 1, 3]
        for name, channels in {**LAYERS, ACTIVATION: C3}.items():
            ds = group[name]
            assert ds.shape == (3, N_REFS, channels) and ds.dtype == np.float32
            assert ds.maxshape == (None, N_REFS, channels)
            assert np.isnan(ds[()]).all()
        assert group["complete"].dtype == bool and not group["complete"][()].any()
        assert group.attrs["composite"] == "gradient"
        assert h5py.check_string_dtype(group.attrs["canonizers"].dtype).encoding == "utf-8"
        assert group.attrs["canonizers"].tolist() == ["merge_batchnorm"]
        assert group.attrs["attribution_layers"].tolist() == ["c1", "c2"]
        assert bool(group.attrs["times_activation"]) and group.attrs["n_refs"] == N_REFS


def test_write_relevance_rows_in_any_order(store):
    relevance_target(store, neurons=range(6))
    expected = {name: np.full((6, N_REFS, c), np.nan, np.float32) for name, c in {**LAYERS, ACTIVATION: C3}.items()}
    written = np.array([4, 0, 2, 3])                      # unsorted, two runs (0) (2, 3, 4)
    arrays = {name: rows(4, data.shape[2], 100 * i) for i, (name, data) in enumerate(expected.items())}
    store.write_relevance_rows("c3", written, arrays)
    for name in expected:
        expected[name][written] = arrays[name]
        np.testing.assert_array_equal(store.relevance("c3", name), expected[name], err_msg=name)
    assert store.complete("c3").tolist() == [True, False, True, True, True, False]
    store.write_relevance_rows("c3", np.array([5]), {name: a[:1] for name, a in arrays.items()})
    assert store.complete("c3").tolist() == [True, False, True, True, True, True]
    np.testing.assert_array_equal(store.relevance("c3", "c2")[5], arrays["c2"][0])


# -- relevance: growth -----------------------------------------------------------------------------------------


def grown_store(store) -> dict[str, np.ndarray]:
    """Target c3 with rows [4, 1, 3] written, a second target and derived results of both; returns c3's data."""
    samples(store)
    relevance_target(store)
    fill_rows(store, "c3", 3)
    relevance_target(store, "logits", neurons=[0, 1])
    fill_rows(store, "logits", 2, start=5000)
    add_derived(store, "c3")
    add_derived(store, "logits")
    store.write_summary(summary_table())
    store.flush()
    return read_group(store.path, "relevance/c3")


def test_the_same_neurons_change_nothing(store):
    before = grown_store(store)
    relevance_target(store, neurons=[3, 4, 1])                      # another order
    relevance_target(store, neurons=[1])                            # fewer, without overwrite: all stay
    store.flush()
    after = read_group(store.path, "relevance/c3")
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].tobytes() == before[name].tobytes(), name
    for path in [*derived_paths("c3"), "metrics/summary"]:
        assert path in store, path


def test_more_neurons_are_appended_in_request_order(store):
    before = grown_store(store)
    relevance_target(store, neurons=[7, 1, 0, 4, 3])
    after = read_group(store.path, "relevance/c3")
    assert after["neurons"].tolist() == [4, 1, 3, 7, 0]
    for name in (*LAYERS, ACTIVATION):
        assert after[name].shape[0] == 5
        assert after[name][:3].tobytes() == before[name].tobytes(), name     # finished rows bit-identical
        assert np.isnan(after[name][3:]).all()
    assert after["complete"].tolist() == [True, True, True, False, False]
    for path in [*derived_paths("c3"), "metrics/summary"]:
        assert path not in store, path
    for path in derived_paths("logits"):                                     # another target's results stay
        assert path in store, path
    np.testing.assert_array_equal(store.neurons("logits"), [0, 1])


def test_overwrite_keeps_exactly_the_asked_rows(store):
    before = grown_store(store)
    relevance_target(store, neurons=[3, 4], overwrite=True)
    after = read_group(store.path, "relevance/c3")
    assert after["neurons"].tolist() == [4, 3]                   # stored order is kept
    for name in (*LAYERS, ACTIVATION):
        assert after[name].tobytes() == before[name][[0, 2]].tobytes(), name
    assert after["complete"].tolist() == [True, True]
    for path in derived_paths("c3"):
        assert path not in store, path
    # the rewritten datasets still grow, with their fill values
    relevance_target(store, neurons=[3, 4, 9])
    after = read_group(store.path, "relevance/c3")
    assert after["neurons"].tolist() == [4, 3, 9] and after["complete"].tolist() == [True, True, False]
    assert np.isnan(after["c2"][2]).all()
    assert store.file["relevance/c3/c2"].maxshape[0] is None


def test_overwrite_drops_and_appends_at_once(store):
    before = grown_store(store)
    relevance_target(store, neurons=[9, 1], overwrite=True)
    after = read_group(store.path, "relevance/c3")
    assert after["neurons"].tolist() == [1, 9]
    assert after["c1"][0].tobytes() == before["c1"][1].tobytes() and np.isnan(after["c1"][1]).all()
    assert after["complete"].tolist() == [True, False]


def test_overwrite_with_the_same_neurons_changes_nothing(store):
    before = grown_store(store)
    relevance_target(store, neurons=[1, 3, 4], overwrite=True)
    after = read_group(store.path, "relevance/c3")
    for name in before:
        assert after[name].tobytes() == before[name].tobytes(), name
    assert "clusters/c3" in store and "metrics/summary" in store


@pytest.mark.parametrize("attrs, named", [
    ({**RULE, "composite": "epsilon_plus"}, "composite: 'gradient' -> 'epsilon_plus'"),
    ({**RULE, "canonizers": []}, "canonizers: ['merge_batchnorm'] -> []"),
    ({**RULE, "n_refs": 5}, "n_refs: 3 -> 5"),
    ({**RULE, "times_activation": False}, "times_activation: True -> False"),
    ({**RULE, "attribution_layers": ["c2"]}, "attribution_layers: ['c1', 'c2'] -> ['c2']"),
])
def test_another_rule_is_stale_and_overwrite_recomputes_it(store, attrs, named):
    before = grown_store(store)
    with pytest.raises(StaleResultError, match=r"relevance of target 'c3' was made with a different config") as info:
        relevance_target(store, attrs=attrs)
    assert named in str(info.value) and "--overwrite" in str(info.value)
    assert isinstance(info.value, ConfigError)
    after = read_group(store.path, "relevance/c3")
    for name in before:                                              # nothing lost
        assert after[name].tobytes() == before[name].tobytes(), name
    assert "clusters/c3" in store

    relevance_target(store, neurons=[2, 5], attrs=attrs, overwrite=True)
    after = read_group(store.path, "relevance/c3")
    assert after["neurons"].tolist() == [2, 5] and not after["complete"].any() and np.isnan(after["c2"]).all()
    assert store.target_attrs("c3") == {**RULE, **attrs}
    for path in [*derived_paths("c3"), "metrics/summary"]:
        assert path not in store, path
    for path in derived_paths("logits"):
        assert path in store, path


def test_another_layer_width_is_stale(store):
    grown_store(store)
    with pytest.raises(StaleResultError, match=r"c2: 5 -> 7 channels"):
        store.prepare_relevance("c3", np.array([4, 1, 3]), N_REFS, {"c1": 2, "c2": 7}, C3, RULE)


def test_a_rule_attribute_the_store_predates_is_not_compared(store):
    grown_store(store)
    del store.file["relevance/c3"].attrs["init_rel"]
    relevance_target(store, attrs={**RULE, "init_rel": "something new"})
    assert "clusters/c3" in store and store.complete("c3").all()


def test_a_fixed_size_target_of_an_older_store_still_grows(store, path):
    """Relevance datasets written without maxshape (polypure before growth) are rewritten on growth."""
    samples(store)
    old = {"c1": rows(2, 2, 0), "c2": rows(2, 5, 50), ACTIVATION: rows(2, C3, 90)}
    group = store.file.create_group("relevance/c3")
    group.create_dataset("neurons", data=np.array([5, 2], np.int64))
    for name, data in old.items():
        group.create_dataset(name, shape=data.shape, dtype=np.float32, chunks=(1, *data.shape[1:]), fillvalue=np.nan)
        group[name][:] = data
    group.create_dataset("complete", shape=(2,), dtype=bool, fillvalue=False)
    group["complete"][:] = True
    for key, value in RULE.items():
        group.attrs[key] = np.array(value, dtype=STR) if isinstance(value, list) else value
    assert group["c2"].maxshape == (2, N_REFS, 5)

    relevance_target(store, neurons=[2, 5, 8])
    after = read_group(path, "relevance/c3")
    assert after["neurons"].tolist() == [5, 2, 8]
    for name, data in old.items():
        assert after[name][:2].tobytes() == data.tobytes(), name
        assert np.isnan(after[name][2]).all(), name
        assert store.file[f"relevance/c3/{name}"].maxshape[0] is None
    assert after["complete"].tolist() == [True, True, False]
    new = {name: data[:1] + 1 for name, data in old.items()}
    store.write_relevance_rows("c3", np.array([2]), new)
    assert store.complete("c3").all()
    np.testing.assert_array_equal(store.relevance("c3", "c1")[2], new["c1"][0])
    assert store.target_attrs("c3")["canonizers"] == ["merge_batchnorm"]


def test_a_fixed_size_target_keeps_a_subset_with_overwrite(store, path):
    group = store.file.create_group("relevance/c3")
    group.create_dataset("neurons", data=np.array([5, 2, 7], np.int64))
    data = rows(3, 2, 0)
    group.create_dataset("c1", data=data)
    group.create_dataset("complete", data=np.array([True, False, True]))
    store.prepare_relevance("c3", np.array([7, 5]), N_REFS, {"c1": 2}, C3, {}, overwrite=True)
    after = read_group(path, "relevance/c3")
    assert after["neurons"].tolist() == [5, 7]
    assert after["c1"].tobytes() == data[[0, 2]].tobytes()
    assert after["complete"].tolist() == [True, True]


# -- targets and their spaces ----------------------------------------------------------------------------------


def test_target_accessors(store):
    samples(store)
    values, indices = topk_arrays(C3)
    store.write_topk("c3", values, indices, "max", N, True)
    relevance_target(store)
    written = fill_rows(store, "c3", 3)
    assert store.attribution_layers("c3") == ["c1", "c2"]
    assert store.spaces("c3") == ["c1", "c2", ACTIVATION]
    assert store.neurons("c3").tolist() == [4, 1, 3]
    assert store.complete("c3").tolist() == [True, True, True]
    assert store.n_refs("c3") == N_REFS
    expected = np.array([[indices[n, r] for r in range(N_REFS)] for n in (4, 1, 3)])
    np.testing.assert_array_equal(store.reference_indices("c3"), expected)
    np.testing.assert_array_equal(store.features("c3", "c2"), written["c2"])
    np.testing.assert_array_equal(store.features("c3", "c2", row=1), written["c2"][1])
    np.testing.assert_array_equal(store.features("c3", ACTIVATION), written[ACTIVATION])
    np.testing.assert_array_equal(store.relevance("c3", "c1"), written["c1"])
    embedding = np.arange(3 * N_REFS * 2, dtype=np.float32).reshape(3, N_REFS, 2)
    store.write_embeddings("e1", "c3", embedding, {"signature": "s"})
    np.testing.assert_array_equal(store.features("c3", "e1"), embedding)
    np.testing.assert_array_equal(store.features("c3", "e1", row=2), embedding[2])
    for space in ("c1", "c2", ACTIVATION, "e1"):
        assert store.has_space("c3", space), space
    for target, space in (("c3", "c3"), ("c3", "e2"), ("logits", "c2"), ("logits", "e1")):
        assert not store.has_space(target, space), (target, space)
        with pytest.raises(StoreError, match=f"no space {space!r} for target {target!r}"):
            store.features(target, space)
    assert store.target_attrs("c3") == RULE


def test_target_spaces(store):
    relevance_target(store)
    store.prepare_relevance("logits", np.array([0, 1]), N_REFS, {"c3": C3}, 4, {"attribution_layers": ["c3"]})
    store.write_embeddings("e1", "logits", np.zeros((2, N_REFS, 2)), {})
    assert store.target_spaces() == {"c3": ["c1", "c2", ACTIVATION], "logits": ["c3", ACTIVATION]}
    assert store.target_spaces(["c2", "e1", ACTIVATION]) == {"c3": ["c2", ACTIVATION], "logits": ["e1", ACTIVATION]}
    assert store.target_spaces([]) == {"c3": [], "logits": []}
    with pytest.raises(ConfigError, match="cluster.spaces: 'c9' is neither"):
        store.target_spaces(["c2", "c9"])


def test_target_spaces_of_an_empty_store(store):
    assert store.target_spaces() == {}
    with pytest.raises(ConfigError, match="'c2'"):
        store.target_spaces(["c2"])


def test_planted_names():
    assert planted_target("block_3") == "block_3@planted"
    assert planted_layer("block_3@planted") == "block_3"
    assert planted_layer("block_3") is None
    assert planted_layer(planted_target("a@b")) == "a@b"


def test_planted_targets(store):
    relevance_target(store)
    relevance_target(store, planted_target("c3"), neurons=[0, 1])
    assert sorted(store.relevance_targets()) == ["c3", "c3@planted"]
    assert store.planted_targets() == ["c3@planted"]


# -- planted pairs ---------------------------------------------------------------------------------------------


def test_planted_pairs_settings_truth_and_modes(store, path):
    assert not store.has_planted_pairs("c3")
    assert store.planted_settings("c3") == {} and store.planted_modes("c3") is None
    pairs = np.array([[0, 3], [2, 5]], np.int64)
    scales = np.array([[1.5, 2.0], [0.5, 0.25]], np.float32)
    store.write_planted_pairs("c3", pairs, scales, {"pairs_asked": 3, "seed": 1, "max_overlap": 0.5})
    assert store.has_planted_pairs("c3")
    p, s = store.planted_pairs("c3")
    np.testing.assert_array_equal(p, pairs)
    np.testing.assert_array_equal(s, scales)
    assert store.planted_settings("c3") == {"pairs_asked": 3, "seed": 1, "max_overlap": 0.5}
    truth = np.array([[0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]])
    store.write_planted_truth("c3", truth, ["sum", "sum", "max", "max"])
    assert store.planted_modes("c3") == ["sum", "sum", "max", "max"]
    store.close()
    with h5py.File(path, "r") as f:
        assert f["planted/c3/pairs"].dtype == np.int64 and f["planted/c3/truth"].dtype == np.int64
        np.testing.assert_array_equal(f["planted/c3/truth"][()], truth)
        assert f["planted/c3/modes"].asstr()[()].tolist() == ["sum", "sum", "max", "max"]
        assert f["planted/c3"].attrs["pairs_asked"] == 3 and f["planted/c3"].attrs["max_overlap"] == 0.5


# -- labels of references --------------------------------------------------------------------------------------


def test_known_labels_of_a_real_target(store):
    _, labels, shape = samples(store)
    values, indices = topk_arrays(C3)
    store.write_topk("c3", values, indices, "max", N, True)
    relevance_target(store)
    refs = indices[[4, 1, 3]]
    known = store.known_labels("c3")
    assert list(known) == ["shape", CLASS]
    np.testing.assert_array_equal(known["shape"], shape[refs[:, :N_REFS]])
    np.testing.assert_array_equal(known[CLASS], labels[refs[:, :N_REFS]])
    full = store.known_labels("c3", full_topk=True)
    assert full["shape"].shape == (3, K)
    np.testing.assert_array_equal(full[CLASS], labels[refs])


def test_known_labels_without_classes(store):
    store.write_samples([f"index:{i}" for i in range(N)], np.full(N, -1))
    values, indices = topk_arrays(C3)
    store.write_topk("c3", values, indices, "max", N, True)
    relevance_target(store)
    assert store.known_labels("c3") == {}
    assert store.label_sets() == [PLANTED]


def planted_store(store, neurons, n_refs_truth=N_REFS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A planted target of c3 with 4 virtual neurons whose top-K carries its truth payload."""
    _, labels, _ = samples(store)
    values, indices = topk_arrays(4, seed=1)
    truth_k = (indices + np.arange(4)[:, None]) % 2
    target = planted_target("c3")
    store.write_topk(target, values, indices, "max", N, True, extra={"truth": truth_k})
    store.write_planted_truth("c3", truth_k[:, :n_refs_truth], ["sum", "sum", "max", "max"])
    store.prepare_relevance(target, np.array(neurons), N_REFS, LAYERS, 4, {"attribution_layers": ["c1", "c2"]})
    return labels, indices, truth_k


def test_known_labels_of_a_planted_target(store):
    labels, indices, truth_k = planted_store(store, neurons=range(4))
    known = store.known_labels("c3@planted")
    assert list(known) == [PLANTED, "shape", CLASS]
    np.testing.assert_array_equal(known[PLANTED], truth_k[:, :N_REFS])
    np.testing.assert_array_equal(known[CLASS], labels[indices[:, :N_REFS]])
    full = store.known_labels("c3@planted", full_topk=True)
    np.testing.assert_array_equal(full[PLANTED], truth_k)
    np.testing.assert_array_equal(full[CLASS], labels[indices])


def test_planted_labels_follow_the_target_rows(store):
    """Rows of a target are its ``neurons``; the planted truth must be taken in that order too."""
    labels, indices, truth_k = planted_store(store, neurons=[2, 0])
    known = store.known_labels("c3@planted")
    np.testing.assert_array_equal(known[CLASS], labels[indices[[2, 0], :N_REFS]])
    np.testing.assert_array_equal(known[PLANTED], truth_k[[2, 0], :N_REFS])


def test_planted_labels_have_the_targets_n_refs(store):
    """A target recomputed with more references still gets a planted label per reference.

    ``/planted/<layer>/truth`` keeps the n_refs of the run that chose the pairs (``--overwrite`` after
    ``relevance.n_refs`` grew).
    """
    labels, indices, truth_k = planted_store(store, neurons=range(4), n_refs_truth=N_REFS - 1)
    known = store.known_labels("c3@planted")
    assert known[PLANTED].shape == known[CLASS].shape == (4, N_REFS)
    np.testing.assert_array_equal(known[PLANTED], truth_k[:, :N_REFS])


def test_label_sets(store):
    assert store.label_sets() == [PLANTED]
    samples(store)
    assert store.label_sets() == [PLANTED, "shape", CLASS]


# -- embeddings, crops, clusters -------------------------------------------------------------------------------


def test_embeddings(store, path):
    assert store.embedding_names() == [] and not store.has_embeddings("e1", "c3")
    data = np.arange(3 * N_REFS * 4, dtype=np.float64).reshape(3, N_REFS, 4)
    store.write_embeddings("e1", "c3", data, {"view": "crop", "signature": "abc"})
    store.write_embeddings("e2", "c3", data[:, :, :2], {"signature": "xyz"})
    assert store.embedding_names() == ["e1", "e2"]
    assert store.has_embeddings("e1", "c3") and store.has_embeddings("e1", "c3", "abc")
    assert not store.has_embeddings("e1", "c3", "other") and not store.has_embeddings("e1", "logits")
    out = store.embeddings("e1", "c3")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data)
    store.close()
    with h5py.File(path, "r") as f:
        assert f["embeddings/e1/c3"].attrs["view"] == "crop" and f["embeddings/e1/c3"].attrs["signature"] == "abc"


def test_crops(store, path):
    assert store.crop_boxes("c3") is None
    boxes = np.array([[[0, 4, 1, 5], [-1, -1, -1, -1]]])
    store.write_crops("c3", boxes, "epsilon_plus")
    np.testing.assert_array_equal(store.crop_boxes("c3"), boxes)
    store.close()
    with h5py.File(path, "r") as f:
        ds = f["crops/c3"]
        assert ds.dtype == np.int64 and ds.attrs["composite"] == "epsilon_plus"
        assert ds.attrs["columns"].tolist() == ["row_start", "row_stop", "col_start", "col_stop"]


def test_clusters(store, path):
    assert store.clusterings("c3") == [] and store.cluster_methods("c3") == []
    assert store.cluster_labels("c3", "c2", "kmeans") is None and not store.has_clusters("c3", "c2", "kmeans")
    a = np.array([[0, 1, 1], [-1, 0, 0]])
    b = np.array([[1, 1, 0], [0, 0, 0]])
    store.write_clusters("c3", "c2", "kmeans", a, {"method": "kmeans", "params": "{}", "signature": "s1"})
    store.write_clusters("c3", "c2", "hdbscan", b, {"method": "hdbscan", "signature": "s2"})
    store.write_clusters("c3", ACTIVATION, "kmeans", b, {"method": "kmeans"})
    assert sorted(store.clusterings("c3")) == [(ACTIVATION, "kmeans"), ("c2", "hdbscan"), ("c2", "kmeans")]
    assert store.cluster_methods("c3") == ["kmeans", "hdbscan"]      # first seen, once each
    np.testing.assert_array_equal(store.cluster_labels("c3", "c2", "kmeans"), a)
    np.testing.assert_array_equal(store.cluster_labels("c3", "c2", "kmeans", row=1), a[1])
    assert store.has_clusters("c3", "c2", "kmeans") and store.has_clusters("c3", "c2", "kmeans", "s1")
    assert not store.has_clusters("c3", "c2", "kmeans", "s2")
    assert not store.has_clusters("c3", ACTIVATION, "kmeans", "s1")      # stored without a signature
    assert not store.has_clusters("c3", "c1", "kmeans")
    store.close()
    with h5py.File(path, "r") as f:
        ds = f["clusters/c3/c2/kmeans"]
        assert ds.dtype == np.int64 and ds.attrs["space"] == "c2" and ds.attrs["method"] == "kmeans"


# -- metrics ---------------------------------------------------------------------------------------------------


def test_metrics(store, path):
    assert store.metric("c3", "ari", "class", "c2", "kmeans") is None
    assert store.metric_keys("c3", "ari") == [] and store.metric_entries("c3") == []
    ari = np.array([0.5, np.nan, 1.0])
    store.write_metric("c3", "ari", ["class", "c2", "kmeans"], ari, attrs={"note": "x"})
    store.write_metric("c3", "ari", ["class", ACTIVATION, "kmeans"], ari * 2)
    store.write_metric("c3", "ari", ["shape", "c2", "kmeans"], ari / 2)
    store.write_metric("c3", "cluster_distances", ["c1", "c2", "kmeans"], np.ones((3, 2)))
    store.write_metric("c3", "degenerate", ["c2"], ["constant", "", "one-hot"])
    store.write_metric("c3", "cluster_status", ["c2", "kmeans"], np.array(["all-noise", "", "ä"], dtype=STR))
    store.write_metric("logits", "mixture", ["class"], np.array([1, 2], np.int64))

    np.testing.assert_array_equal(store.metric("c3", "ari", "class", "c2", "kmeans"), ari)
    np.testing.assert_array_equal(store.metric("c3", "cluster_distances", "c1", "c2", "kmeans"), np.ones((3, 2)))
    degenerate = store.metric("c3", "degenerate", "c2")
    assert degenerate.dtype.kind == "U" and degenerate.tolist() == ["constant", "", "one-hot"]
    assert store.metric("c3", "cluster_status", "c2", "kmeans").tolist() == ["all-noise", "", "ä"]

    assert store.metric_keys("c3", "ari") == ["class", "shape"]
    assert store.metric_keys("c3", "ari", "class") == [ACTIVATION, "c2"]
    assert store.metric_keys("c3", "ari", "class", "c2") == ["kmeans"]
    assert store.metric_keys("c3", "ari", "nope") == []

    entries = {(kind, key): values for kind, key, values in store.metric_entries("c3")}
    assert set(entries) == {("ari", ("class", "c2", "kmeans")), ("ari", ("class", ACTIVATION, "kmeans")),
                            ("ari", ("shape", "c2", "kmeans")), ("cluster_distances", ("c1", "c2", "kmeans")),
                            ("degenerate", ("c2",)), ("cluster_status", ("c2", "kmeans"))}
    np.testing.assert_array_equal(entries[("ari", ("shape", "c2", "kmeans"))], ari / 2)
    assert [kind for kind, _, _ in store.metric_entries("logits")] == ["mixture"]
    store.close()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["metrics/c3/ari/class/c2/kmeans"][()], ari)
        assert f["metrics/c3/ari/class/c2/kmeans"].attrs["note"] == "x"
        assert h5py.check_string_dtype(f["metrics/c3/degenerate/c2"].dtype).encoding == "utf-8"


def test_summary_table(store, path):
    assert store.summary_table() is None
    table = summary_table()
    store.write_summary(table)
    rows = store.summary_table()
    assert rows.dtype.names == ("target", "metric", "mean", "n")
    assert [r["target"].decode() for r in rows] == ["c3", "logits"]
    np.testing.assert_array_equal(rows["mean"], [0.5, 0.25])
    store.close()
    with h5py.File(path, "r") as f:
        assert f["metrics/summary"]["n"].tolist() == [3, 4]


# -- dropping --------------------------------------------------------------------------------------------------


def layered_store(store) -> None:
    """Top-K of c3, c3@planted and logits, planted pairs of c3, and three targets with derived results."""
    samples(store)
    for name, channels in (("c3", C3), ("c3@planted", 4), ("logits", 4)):
        store.write_topk(name, *topk_arrays(channels), "max", N, True)
    store.write_planted_pairs("c3", np.array([[0, 1]]), np.ones((1, 2)), {"seed": 1})
    store.write_planted_truth("c3", np.zeros((4, N_REFS)), ["sum"] * 4)
    for target, neurons in (("c3", [4, 1, 3]), ("c3@planted", range(4)), ("logits", [0, 2])):
        relevance_target(store, target, neurons=neurons)
        add_derived(store, target)
    store.write_summary(summary_table())


def test_drop_topk_drops_everything_chosen_from_it(store, path):
    layered_store(store)
    store.drop_topk("c3")
    store.close()
    with h5py.File(path, "r") as f:
        for gone in ("topk/c3", "topk/c3@planted", "planted/c3", "relevance/c3", "relevance/c3@planted",
                     *derived_paths("c3"), *derived_paths("c3@planted"), "metrics/summary"):
            assert gone not in f, gone
        for kept in ("samples/ids", "topk/logits", "relevance/logits", *derived_paths("logits")):
            assert kept in f, kept
        assert f["relevance/logits/neurons"][()].tolist() == [0, 2]


def test_drop_planted_keeps_the_real_layer(store, path):
    layered_store(store)
    store.drop_planted("c3")
    store.close()
    with h5py.File(path, "r") as f:
        for gone in ("planted/c3", "topk/c3@planted", "relevance/c3@planted", *derived_paths("c3@planted"),
                     "metrics/summary"):
            assert gone not in f, gone
        for kept in ("topk/c3", "relevance/c3", *derived_paths("c3"), "relevance/logits", *derived_paths("logits")):
            assert kept in f, kept


def test_drop_derived_and_drop(store):
    layered_store(store)
    store.drop_derived("logits")
    for gone in (*derived_paths("logits"), "metrics/summary"):
        assert gone not in store, gone
    assert "embeddings/e1/c3" in store and "relevance/logits" in store
    store.drop("relevance/logits")
    store.drop("relevance/logits")                       # absent: nothing happens
    assert "relevance/logits" not in store
    with pytest.raises(StoreError, match="no 'relevance/logits/neurons'"):
        store.read("relevance/logits/neurons")


def test_a_closed_store_reopens_read_only(path):
    with Store.open_for_run(path, dump(CONFIG)) as s:
        samples(s)
    s.close()                                            # closing twice is harmless
    with Store(path) as r:
        assert r.sample_ids()[0] == "index:0"
        with pytest.raises((OSError, ValueError, KeyError)):
            r.write_array("x/y", np.arange(2))
