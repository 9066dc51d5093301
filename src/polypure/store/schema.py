"""The layout of a polypure store (format version 2): every group, dataset and attribute name, in one place.

This module is the one owner of the store's layout: :class:`~polypure.store.hdf5_store.Store` and the other
store modules build every path with the names and functions here, and no other module spells one
(``tests/test_schema_owner.py`` holds this). Renaming anything here changes the file format: raise
:data:`FORMAT_VERSION` and keep reading the old layout.

Schema (paths other tools rely on; the README has the full table)::

    /                      attrs: format="polypure", format_version=2, config, created, polypure_version
    /samples/ids           (N,) UTF-8      stable ids (path relative to the data root, or index:<i>)
    /samples/labels        (N,) int64      -1 where unknown
    /samples/factors/<f>   (N,) int64      generative factors; attr ``values`` names the codes
    /topk/<layer>/indices  (C, K) int64    sample indices by decreasing value
    /topk/<layer>/values   (C, K) float32  attrs: statistic, samples_done, complete
    /relevance/<target>/neurons      (M,) int64      rows shared by every rule variant; attr ``variants``
    /relevance/<target>/<layer>      (M, n_refs, C_layer) float32   the ``default`` variant
    /relevance/<target>/activation   (M, n_refs, C_target) float32
    /relevance/<target>/complete     (M,) bool
    /relevance/<target>/<variant>/<layer>, activation, complete     any other variant (its rule as attrs)
    /planted/<layer>/pairs, truth, modes, scales
    /clusters/<target>/<space>/<method id>       (M, n_refs) int64   -1: noise; attr ``not_clustered``: dead rows
    /embeddings/<evaluator>/<target>             (M, n_refs, D) float32
    /crops/<target>                              (M, n_refs, 4) int64
    /metrics/<target>/<kind>/<key...>            per-neuron metrics; /metrics/summary: the summary table
    /metrics/<target>/selectivity/<space>/<method id>          (M,) float64   causal selectivity of a clustering
    /metrics/<target>/selectivity_null/<space>/<method id>     (M,) float64   the same with random sets
    /metrics/<target>/selectivity_drops/<space>/<method id>    (M, K, 4) float64   per cluster: own, other, nulls
    /metrics/<target>/selectivity_circuits/<space>/<method id> (M, K, m) int64     per cluster: its circuit (channels or concepts)
    /comparisons/<target>                        table: paired comparisons of metrics between spaces
    /dictionaries/<id>                           attrs: kind, layer, signature, epochs_done, complete, quality
    /dictionaries/<id>/dictionary, bias          (n_concepts, C), (C,) float32: a = z D + bias
    /dictionaries/<id>/state/<name>              the encoder's arrays (codes are recomputed from them)
    /dictionaries/<id>/checkpoint/<name>         training state while training (dropped when complete)
    /dictionaries/<id>/spaces/<target>/neurons, concepts, contributions   (M,), (M, T), (M, n_refs, T)

A space is named ``<layer>`` for the ``default`` variant and ``<variant>:<layer>`` for any other
(:func:`polypure.config.settings.space_name`). A version 1 store is a version 2 store with the ``default``
variant alone.

Example
-------
>>> from polypure.store import schema
>>> schema.variant_path("block_3", "lrp")
'relevance/block_3/lrp'
>>> schema.planted_layer(schema.planted_target("block_3"))
'block_3'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from polypure import __version__
from polypure.config.settings import DEFAULT_VARIANT, split_space
from polypure.errors import StoreError

FORMAT = "polypure"
#: Version 2 added rule variants (``/relevance/<target>/<variant>/``); version 1 stores read as one ``default``.
FORMAT_VERSION = 2
#: The dtype of every string dataset and string-array attribute.
STR = h5py.string_dtype("utf-8")

# -- the root -------------------------------------------------------------------------------------

FORMAT_ATTR = "format"
VERSION_ATTR = "format_version"
#: The resolved config the store was last written with, as YAML text.
CONFIG_ATTR = "config"
CREATED_ATTR = "created"
POLYPURE_VERSION_ATTR = "polypure_version"

SAMPLES_GROUP = "samples"
TOPK_GROUP = "topk"
RELEVANCE_GROUP = "relevance"
PLANTED_GROUP = "planted"
CLUSTERS_GROUP = "clusters"
EMBEDDINGS_GROUP = "embeddings"
CROPS_GROUP = "crops"
METRICS_GROUP = "metrics"
COMPARISONS_GROUP = "comparisons"

# -- samples --------------------------------------------------------------------------------------

IDS = "ids"
LABELS = "labels"
SAMPLE_IDS = f"{SAMPLES_GROUP}/{IDS}"
SAMPLE_LABELS = f"{SAMPLES_GROUP}/{LABELS}"
FACTORS = f"{SAMPLES_GROUP}/factors"
#: Attribute of the labels: the class names.
CLASSES_ATTR = "classes"
#: Attribute of a factor: the name of each code.
FACTOR_VALUES_ATTR = "values"

# -- top-K ----------------------------------------------------------------------------------------

INDICES = "indices"
VALUES = "values"
STATISTIC_ATTR = "statistic"
SAMPLES_DONE_ATTR = "samples_done"
COMPLETE_ATTR = "complete"

# -- relevance ------------------------------------------------------------------------------------

NEURONS = "neurons"
COMPLETE = "complete"
#: The space of a target's own activations (beside its attribution layers).
ACTIVATION = "activation"
#: Datasets of a relevance target that are bookkeeping of its rows, not a feature space.
ROW_BOOKKEEPING = (NEURONS, COMPLETE)
#: Attribute of a target: its rule variants in the order they were added (absent: ``default`` alone).
VARIANTS_ATTR = "variants"
ATTRIBUTION_LAYERS_ATTR = "attribution_layers"
#: Attributes of a relevance variant that make its rule; the others belong to the target.
RULE_KEYS = ("composite", "canonizers", "times_activation", "composite_params", "precision")

# -- planted neurons and label sets ---------------------------------------------------------------

#: A planted target is named after its layer: ``block_3@planted``.
PLANTED_SUFFIX = "@planted"
PAIRS = "pairs"
SCALES = "scales"
TRUTH = "truth"
MODES = "modes"
#: Label sets of references: the planted split, and the samples' classes (factors go by their own names).
PLANTED = "planted"
CLASS = "class"

# -- derived results ------------------------------------------------------------------------------

#: Attribute of a derived result: what made it, so that a stage can tell a current result from a stale one.
SIGNATURE_ATTR = "signature"
#: Attribute of a clustering: its space.
SPACE_ATTR = "space"
#: Columns of a crop box (``-1``: the whole image).
CROP_COLUMNS = ("row_start", "row_stop", "col_start", "col_stop")
SUMMARY = f"{METRICS_GROUP}/summary"

# -- causal selectivity (the selectivity stage) ---------------------------------------------------

#: Metric kinds of the selectivity stage, each keyed ``<space>/<method id>`` under ``/metrics/<target>``.
SELECTIVITY = "selectivity"
SELECTIVITY_NULL = "selectivity_null"
SELECTIVITY_DROPS = "selectivity_drops"
SELECTIVITY_CIRCUITS = "selectivity_circuits"
#: Written together, in this order: the stage tells a current result by the signature of the last one.
SELECTIVITY_KINDS = (SELECTIVITY_DROPS, SELECTIVITY_CIRCUITS, SELECTIVITY_NULL, SELECTIVITY)
#: Columns of a neuron's per-cluster drops (attribute ``columns`` of ``selectivity_drops``).
SELECTIVITY_DROP_COLUMNS = ("own", "other", "null_own", "null_other")


# -- dictionaries (sparse autoencoders, NMF) and their spaces -------------------------------------

DICTIONARIES_GROUP = "dictionaries"
#: Datasets of a dictionary: its concepts (rows) over the layer's channels, and the bias added to z D.
DICTIONARY = "dictionary"
BIAS = "bias"
#: Groups of a dictionary: the arrays its kind encodes with, and its training state while it trains.
STATE = "state"
CHECKPOINT = "checkpoint"
SPACES = "spaces"
#: Datasets of a dictionary space of a target: the neuron of each row, its kept concepts, their contributions.
CONCEPTS = "concepts"
CONTRIBUTIONS = "contributions"
KIND_ATTR = "kind"
LAYER_ATTR = "layer"
EPOCHS_DONE_ATTR = "epochs_done"
#: Attributes of a finished dictionary: its quality on the held-out positions.
QUALITY_ATTRS = ("r2", "dead_share", "mean_active", "n_train", "n_heldout")


def dictionary_path(dictionary_id: str, *key: str) -> str:
    """The group of a dictionary, or a dataset or group inside it (``state``, ``checkpoint``, ...)."""
    return join(DICTIONARIES_GROUP, dictionary_id, *key)


def dictionary_space_path(dictionary_id: str, target: str, *dataset: str) -> str:
    """The group of a dictionary's space of one target, or one of its datasets."""
    return join(DICTIONARIES_GROUP, dictionary_id, SPACES, target, *dataset)

# -------------------------------------------------------------------------------------------------


def join(*parts: str) -> str:
    """A store path from its parts."""
    return "/".join(parts)


def topk_path(layer: str) -> str:
    """The group of a layer's top-K (a planted target's too)."""
    return join(TOPK_GROUP, layer)


def relevance_path(target: str) -> str:
    """The group of a relevance target (its rows, and the ``default`` variant's datasets)."""
    return join(RELEVANCE_GROUP, target)


def variant_path(target: str, variant: str) -> str:
    """The group of one rule variant of a target: the target's own for ``default`` (the version 1 layout)."""
    return relevance_path(target) if variant == DEFAULT_VARIANT else join(RELEVANCE_GROUP, target, variant)


def space_path(target: str, space: str, first_variant: str = DEFAULT_VARIANT) -> str:
    """The dataset of a relevance space; ``activation`` is the first variant's (the variants agree on it)."""
    if space == ACTIVATION:
        return join(variant_path(target, first_variant), ACTIVATION)
    variant, layer = split_space(space)
    return join(variant_path(target, variant), layer)


def planted_path(layer: str) -> str:
    """The group of a layer's planted pairs, scales, truth and modes."""
    return join(PLANTED_GROUP, layer)


def clusters_path(target: str, *key: str) -> str:
    """The clusterings of a target, of one of its spaces (``key``: space), or one clustering (space, method)."""
    return join(CLUSTERS_GROUP, target, *key)


def embeddings_path(evaluator: str, *target: str) -> str:
    """An evaluator's embeddings (of every target, or of one)."""
    return join(EMBEDDINGS_GROUP, evaluator, *target)


def crops_path(target: str) -> str:
    """The crop boxes of a target's references."""
    return join(CROPS_GROUP, target)


def metrics_path(target: str, *key: str) -> str:
    """A target's per-neuron metrics: ``/metrics/<target>/<kind>/<key...>`` (fewer parts: a group of them)."""
    return join(METRICS_GROUP, target, *key)


def comparisons_path(target: str) -> str:
    """The table of a target's comparisons."""
    return join(COMPARISONS_GROUP, target)


def derived_paths(target: str) -> tuple[str, ...]:
    """Where the results computed from a target's relevance rows live (embeddings aside: one group per evaluator)."""
    return clusters_path(target), crops_path(target), metrics_path(target), comparisons_path(target)


def planted_target(layer: str) -> str:
    """The store name of a layer's planted virtual neurons: ``<layer>@planted``."""
    return f"{layer}{PLANTED_SUFFIX}"


def planted_layer(target: str) -> str | None:
    """The layer of a planted target (``block_3@planted`` -> ``block_3``), None for a real one."""
    return target.removesuffix(PLANTED_SUFFIX) if target.endswith(PLANTED_SUFFIX) else None


# -- attribute values -----------------------------------------------------------------------------

def header(config_yaml: str, created: str) -> dict[str, Any]:
    """The root attributes of a new store, in the order they are written."""
    return {FORMAT_ATTR: FORMAT, VERSION_ATTR: FORMAT_VERSION, CONFIG_ATTR: config_yaml, CREATED_ATTR: created,
            POLYPURE_VERSION_ATTR: __version__}


def crop_attrs(composite: str) -> dict[str, Any]:
    """The attributes of a target's crop boxes: the composite of the heatmaps they were cut from, the columns."""
    return {"composite": composite, "columns": list(CROP_COLUMNS)}


def decode(value):
    """A stored string as str (h5py gives bytes for some); anything else as it is."""
    return value.decode() if isinstance(value, bytes) else value


def attr_value(value):
    """An attribute value h5py can store: lists of strings become UTF-8 string arrays."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return np.array(list(value), dtype=object).astype(STR)
    return value


def read_attr(value):
    """An attribute as Python data: string arrays become lists of str."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return [decode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return decode(value)


def check_version(path: Path, attrs) -> None:
    """Refuse a store written by a newer polypure, whose layout this one cannot know.

    Raises
    ------
    StoreError
        Naming the store, its format version and the one this polypure reads.
    """
    version = int(attrs.get(VERSION_ATTR, 0))
    if version > FORMAT_VERSION:
        raise StoreError(f"store {str(path)!r} has format version {version}; this polypure ({__version__}) reads up "
                         f"to {FORMAT_VERSION}: upgrade polypure or set another store path")
