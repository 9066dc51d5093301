"""Every method of the Store that changes the file is one whole write, marked ``@writes``.

h5py's writing calls (datasets and groups created, deleted, resized or written, attributes set or
deleted) are watched while each public method of the Store is called on a small store filled through
its own API. Every write a method makes must happen inside that method's own
:func:`~polypure.store.hdf5_store.writes` mark: one made outside any mark, or inside only the marks of
the methods it calls (two whole writes where there should be one), is reported. A public method added
to the Store must be added to :data:`CALLS`, so that a new writer cannot go unchecked; and undecorated
writers on a subclass are caught.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable

import h5py
import numpy as np
import pytest
import yaml

from polypure.store.hdf5_store import Store, writes
from polypure.store.schema import ACTIVATION, SELECTIVITY_KINDS, STR, planted_target

#: The h5py methods that change a file.
WRITERS = {
    h5py.Group: ("create_group", "create_dataset", "create_dataset_like", "require_dataset", "__setitem__",
                 "__delitem__", "copy", "move"),
    h5py.Dataset: ("resize", "__setitem__", "write_direct"),
    h5py.AttributeManager: ("__setitem__", "__delitem__", "create", "modify"),
}
#: The code every method marked ``@writes`` runs in; its ``method`` is the marked method.
GUARD = writes(lambda self: None).__code__
#: The marked methods a call may write inside, where not its own (a class method has no mark of its own).
GUARDED_BY = {"open_for_run": {"_write_header", "write_config"}}

CONFIG = yaml.safe_dump({"model": {"name": "m"}, "data": {"kind": "images", "root": "/d"}, "seed": 0})
N, K, N_REFS, M = 8, 4, 3, 3
LAYERS = {"c1": 2, "c2": 3}
C3 = 4
RULE = {"composite": "gradient", "canonizers": [], "n_refs": N_REFS, "layer": "c3", "attribution_layers": ["c1", "c2"]}
PLANTED = planted_target("c3")
QUALITY = {"r2": 0.5, "dead_share": 0.25, "mean_active": 1.5, "n_train": 6, "n_heldout": 2}


def relevance_rows(m: int) -> dict[str, np.ndarray]:
    return {name: np.ones((m, N_REFS, width), np.float32) for name, width in {**LAYERS, ACTIVATION: C3}.items()}


def table() -> np.ndarray:
    return np.array([("c3", 0.5)], dtype=[("target", STR), ("mean", np.float64)])


def build(path) -> None:
    """A store with something in every group, written through the Store's own methods."""
    rng = np.random.default_rng(0)
    indices = np.stack([rng.permutation(N)[:K] for _ in range(C3)]).astype(np.int64)
    values = -np.sort(-rng.random((C3, K)), axis=1).astype(np.float32)
    with Store.open_for_run(path, CONFIG) as s:
        s.write_samples([f"index:{i}" for i in range(N)], np.arange(N) % 2, {"shape": (np.arange(N) % 3, list("abc"))},
                        class_names=["a", "b"])
        s.write_topk("c3", values, indices, "max", N, True)
        s.write_planted_pairs("c3", np.array([[0, 1], [2, 3]]), np.ones((2, 2)), {"seed": 0})
        s.write_topk(PLANTED, values[:2], indices[:2], "max", N, True, extra={"truth": np.zeros((2, K), np.int64)})
        s.write_planted_truth("c3", np.zeros((2, N_REFS)), ["sum", "max"])
        for variant, composite in (("default", "gradient"), ("lrp", "epsilon")):
            s.prepare_relevance("c3", np.arange(M), N_REFS, LAYERS, C3, {**RULE, "composite": composite},
                                variant=variant)
            s.write_relevance_rows("c3", np.arange(M), relevance_rows(M), variant=variant)
        s.prepare_relevance(PLANTED, np.arange(2), N_REFS, LAYERS, C3, RULE)
        s.write_embeddings("e1", "c3", np.zeros((M, N_REFS, 2)), {"signature": "s"})
        s.write_crops("c3", np.full((M, N_REFS, 4), -1), "gradient")
        s.write_clusters("c3", "c2", "kmeans", np.zeros((M, N_REFS)), {"signature": "s"})
        s.write_metric("c3", "ari", ["class", "c2", "kmeans"], np.zeros(M))
        s.write_summary(table())
        s.write_comparisons("c3", table(), {"seed": 0})
        s.write_dictionary_checkpoint("d1", {"kind": "nmf", "layer": "c3"}, {"dictionary": np.ones((2, C3))}, 1)
        s.write_dictionary("d1", np.ones((2, C3)), np.zeros(C3), {"w": np.ones(3)}, QUALITY)
        s.write_dictionary_space("d1", "c3", np.arange(M), np.zeros((M, 2)), np.ones((M, N_REFS, 2)), {"signature": "s"})
        s.write_dictionary_checkpoint("d2", {"kind": "nmf", "layer": "c3"}, {"dictionary": np.ones((2, C3))}, 1)


def reopen_with_another_topk(s: Store) -> None:
    fresh = s.path.with_name("fresh.h5")
    Store.open_for_run(fresh, CONFIG).close()
    Store.open_for_run(fresh, CONFIG + "topk: {k: 9}\n").close()


def grow_then_shrink(s: Store) -> None:
    """A neuron appended (the datasets resized), then one no longer asked for dropped (the datasets rewritten)."""
    s.prepare_relevance("c3", np.arange(M + 1), N_REFS, LAYERS, C3, RULE)
    s.prepare_relevance("c3", np.array([2, 0, 3]), N_REFS, LAYERS, C3, RULE, overwrite=True)


#: One call of every public method and property of the Store, on a store made by :func:`build`.
CALLS: dict[str, Callable[[Store], object]] = {
    "open_for_run": reopen_with_another_topk,
    "write_config": lambda s: s.write_config(CONFIG + "topk: {k: 9}\n"),
    "close": lambda s: s.close(),
    "flush": lambda s: s.flush(),
    "config_yaml": lambda s: s.config_yaml,
    "attributes": lambda s: s.attributes(),
    "config": lambda s: s.config(),
    # samples
    "has_samples": lambda s: s.has_samples(),
    "write_samples": lambda s: s.write_samples([f"index:{i}" for i in range(N)], np.zeros(N),
                                               {"size": (np.zeros(N), ["small"])}, class_names=["a"]),
    "sample_ids": lambda s: s.sample_ids(),
    "check_samples": lambda s: s.check_samples(s.sample_ids()),
    "class_names": lambda s: s.class_names(),
    "labels": lambda s: s.labels(),
    "update_labels": lambda s: s.update_labels(np.ones(N)),
    "factors": lambda s: s.factors(),
    # top-K
    "topk_progress": lambda s: s.topk_progress("c3"),
    "write_topk": lambda s: s.write_topk("c2", np.zeros((2, K)), np.zeros((2, K)), "mean", 4, False),
    "topk_statistic": lambda s: s.topk_statistic("c3"),
    "read_topk": lambda s: s.read_topk("c3"),
    "topk_payload": lambda s: s.topk_payload(PLANTED, "truth"),
    "prepare_relevance": grow_then_shrink,
    "drop_variant": lambda s: (s.drop_variant("c3", "lrp"), s.drop_variant("c3", "default")),
    "write_relevance_rows": lambda s: s.write_relevance_rows("c3", np.array([2, 0]), relevance_rows(2)),
    "relevance_targets": lambda s: s.relevance_targets(),
    "target_attrs": lambda s: s.target_attrs("c3"),
    "variant_attrs": lambda s: s.variant_attrs("c3", "lrp"),
    "attribution_layers": lambda s: s.attribution_layers("c3"),
    "variants": lambda s: s.variants("c3"),
    "variant_spaces": lambda s: s.variant_spaces("c3", "lrp"),
    "relevance_spaces": lambda s: s.relevance_spaces("c3"),
    "spaces": lambda s: s.spaces("c3"),
    "embedding_spaces": lambda s: s.embedding_spaces("c3"),
    "baseline_space": lambda s: s.baseline_space("c3"),
    "target_spaces": lambda s: s.target_spaces(["c2", "e1"]),
    "neurons": lambda s: s.neurons("c3"),
    "complete": lambda s: s.complete("c3"),
    "n_refs": lambda s: s.n_refs("c3"),
    "reference_indices": lambda s: s.reference_indices("c3"),
    "relevance": lambda s: s.relevance("c3", "lrp:c1"),
    "space_shape": lambda s: s.space_shape("c3", "e1"),
    "has_space": lambda s: s.has_space("c3", "c2"),
    "features": lambda s: s.features("c3", ACTIVATION, row=1),
    # invalidation
    "drop": lambda s: s.drop("metrics/summary"),
    "drop_derived": lambda s: s.drop_derived("c3"),
    "drop_planted": lambda s: s.drop_planted("c3"),
    "drop_topk": lambda s: s.drop_topk("c3"),
    # planted neurons and labels of references
    "planted_targets": lambda s: s.planted_targets(),
    "has_planted_pairs": lambda s: s.has_planted_pairs("c3"),
    "write_planted_pairs": lambda s: s.write_planted_pairs("c3", np.array([[1, 2]]), np.ones((1, 2)), {"seed": 1}),
    "planted_pairs": lambda s: s.planted_pairs("c3"),
    "planted_settings": lambda s: s.planted_settings("c3"),
    "write_planted_truth": lambda s: s.write_planted_truth("c3", np.ones((2, N_REFS)), ["max", "max"]),
    "planted_modes": lambda s: s.planted_modes("c3"),
    "label_sets": lambda s: s.label_sets(),
    "known_labels": lambda s: s.known_labels(PLANTED),
    # embeddings, crops, clusters
    "embedding_names": lambda s: s.embedding_names(),
    "has_embeddings": lambda s: s.has_embeddings("e1", "c3", "s"),
    "embedding_attrs": lambda s: s.embedding_attrs("e1", "c3"),
    "embeddings": lambda s: s.embeddings("e1", "c3"),
    "write_embeddings": lambda s: s.write_embeddings("e2", "c3", np.ones((M, N_REFS, 2)), {"signature": "t"}),
    "write_crops": lambda s: s.write_crops("c3", np.zeros((M, N_REFS, 4)), "epsilon"),
    "crop_boxes": lambda s: s.crop_boxes("c3"),
    "has_clusters": lambda s: s.has_clusters("c3", "c2", "kmeans", "s"),
    "write_clusters": lambda s: s.write_clusters("c3", "c1", "kmeans", np.ones((M, N_REFS)), {"signature": "t"}),
    "cluster_labels": lambda s: s.cluster_labels("c3", "c2", "kmeans", row=0),
    "cluster_attrs": lambda s: s.cluster_attrs("c3", "c2", "kmeans"),
    "clusterings": lambda s: s.clusterings("c3"),
    "cluster_methods": lambda s: s.cluster_methods("c3"),
    # metrics, summary, comparisons
    "write_metric": lambda s: s.write_metric("c3", "nmi", ["class", "c2", "kmeans"], np.ones(M), {"n": 1}),
    "metric": lambda s: s.metric("c3", "ari", "class", "c2", "kmeans"),
    "metric_attrs": lambda s: s.metric_attrs("c3", "ari", "class", "c2", "kmeans"),
    "write_selectivity": lambda s: s.write_selectivity("c3", "c2", "kmeans", {kind: np.zeros((M, 2)) for kind in
                                                                              SELECTIVITY_KINDS}, {"signature": "s"}),
    "metric_keys": lambda s: s.metric_keys("c3", "ari"),
    "metric_entries": lambda s: s.metric_entries("c3"),
    "write_summary": lambda s: s.write_summary(table()),
    "summary_table": lambda s: s.summary_table(),
    "write_comparisons": lambda s: s.write_comparisons("c3", table(), {"seed": 1}),
    "drop_comparisons": lambda s: s.drop_comparisons(),
    "comparison_targets": lambda s: s.comparison_targets(),
    "comparisons": lambda s: s.comparisons("c3"),
    # dictionaries and their spaces
    "dictionary_ids": lambda s: s.dictionary_ids(),
    "dictionary_attrs": lambda s: s.dictionary_attrs("d1"),
    "dictionary_checkpoint": lambda s: s.dictionary_checkpoint("d2"),
    "dictionary_arrays": lambda s: s.dictionary_arrays("d1"),
    "write_dictionary_checkpoint": lambda s: s.write_dictionary_checkpoint("d2", {"kind": "nmf"},
                                                                           {"dictionary": np.zeros((2, C3))}, 2),
    "write_dictionary": lambda s: s.write_dictionary("d2", np.ones((2, C3)), np.zeros(C3), {}, QUALITY),
    "drop_dictionary": lambda s: s.drop_dictionary("d1"),
    "dictionary_spaces": lambda s: s.dictionary_spaces("c3"),
    "dictionary_space_attrs": lambda s: s.dictionary_space_attrs("d1", "c3"),
    "dictionary_space": lambda s: s.dictionary_space("d1", "c3"),
    "dictionary_concepts": lambda s: s.dictionary_concepts("d1", "c3"),
    "write_dictionary_space": lambda s: s.write_dictionary_space("d1", PLANTED, np.arange(2), np.zeros((2, 2)),
                                                                 np.ones((2, N_REFS, 2)), {"signature": "t"}),
    # any path
    "write_array": lambda s: s.write_array("extra/x", ["a", "b"], attrs={"note": "n"}),
    "read": lambda s: s.read("samples/labels"),
}


def public_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("writes") / "built.h5"
    build(path)
    return path


Writes = list[tuple[str, frozenset[str]]]


@pytest.fixture
def watched(monkeypatch) -> Writes:
    """Every h5py write made from now on: (the h5py method, the names of the marked methods it is inside)."""
    seen: Writes = []

    def watch(cls, name):
        original = getattr(cls, name)

        def watching(*args, **kwargs):
            inside = set()
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code is GUARD:
                    inside.add(frame.f_locals["method"].__name__)
                frame = frame.f_back
            seen.append((f"{cls.__name__}.{name}", frozenset(inside)))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, watching)

    for cls, names in WRITERS.items():
        for name in names:
            watch(cls, name)
    return seen


def run_each(cls: type[Store], calls: dict[str, Callable[[Store], object]], built, tmp_path,
             seen: Writes) -> dict[str, Writes]:
    """The h5py writes of each call, each made on a fresh copy of the built store."""
    out = {}
    for name, call in calls.items():
        copy = tmp_path / f"{name}.h5"
        shutil.copy(built, copy)
        with cls(copy, "a") as store:
            seen.clear()
            call(store)
            out[name] = list(seen)
    return out


def unguarded(writes_by_call: dict[str, Writes]) -> dict[str, list[str]]:
    """The calls that wrote outside their own mark, with the h5py methods they wrote by."""
    out = {}
    for name, found in writes_by_call.items():
        bad = sorted({method for method, inside in found if not inside & GUARDED_BY.get(name, {name})})
        if bad:
            out[name] = bad
    return out


def test_every_public_method_of_the_store_is_called():
    assert set(CALLS) == public_names(Store), "add each new public method of Store to CALLS"


def test_no_method_of_the_store_writes_outside_a_guarded_write(built, tmp_path, watched):
    by_call = run_each(Store, CALLS, built, tmp_path, watched)
    assert unguarded(by_call) == {}
    # the watch sees the Store's writes: every writer wrote through the watched methods, the readers not at all
    writers = {name for name in CALLS if name.startswith(("write_", "update_", "prepare_", "drop", "open_"))}
    assert {name for name, found in by_call.items() if found} == writers
    assert {method for name in writers for method, _ in by_call[name]} >= {
        "Group.create_dataset", "Group.__delitem__", "Dataset.resize", "Dataset.__setitem__",
        "AttributeManager.__setitem__", "AttributeManager.__delitem__"}


class Careless(Store):
    """A subclass with writers that forgot the mark, and one that has it."""

    def set_note(self, text: str) -> None:
        self.file.attrs["note"] = text

    def add_table(self) -> None:
        self.file.create_dataset("extra/table", data=np.arange(3))

    def forget_summary(self) -> None:
        del self.file["metrics/summary"]

    def grow_neurons(self) -> None:
        self.file["relevance/c3/neurons"].resize(M + 1, axis=0)

    def zero_labels(self) -> None:
        self.file["samples/labels"][:] = 0

    def write_pair(self) -> None:
        # two whole writes, each marked, where the pair should be one
        self.write_array("extra/a", np.arange(2))
        self.write_array("extra/b", np.arange(2))

    @writes
    def write_note(self, text: str) -> None:
        self.file.attrs["note"] = text


def test_an_undecorated_writer_is_caught(built, tmp_path, watched):
    calls = {"set_note": lambda s: s.set_note("x"), "add_table": lambda s: s.add_table(),
             "forget_summary": lambda s: s.forget_summary(), "grow_neurons": lambda s: s.grow_neurons(),
             "zero_labels": lambda s: s.zero_labels(), "write_pair": lambda s: s.write_pair(),
             "write_note": lambda s: s.write_note("x")}
    by_call = run_each(Careless, calls, built, tmp_path, watched)
    caught = unguarded(by_call)
    assert list(caught) == ["set_note", "add_table", "forget_summary", "grow_neurons", "zero_labels", "write_pair"]
    for name, method in (("set_note", "AttributeManager.__setitem__"), ("add_table", "Group.create_dataset"),
                         ("forget_summary", "Group.__delitem__"), ("grow_neurons", "Dataset.resize"),
                         ("zero_labels", "Dataset.__setitem__"), ("write_pair", "Group.create_dataset")):
        assert method in caught[name]
    # each of write_pair's writes is inside write_array's mark, but not inside one of its own
    assert all(inside == {"write_array"} for _, inside in by_call["write_pair"])
    assert by_call["write_note"] and all(inside == {"write_note"} for _, inside in by_call["write_note"])
