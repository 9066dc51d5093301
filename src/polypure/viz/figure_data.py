"""What the figures of :mod:`polypure.viz.figures` read from a store.

Each figure function draws from one reader's result alone (``distance_inputs`` for
:func:`~polypure.viz.figures.distance_matrices`, ``umap_inputs`` for :func:`~polypure.viz.figures.neuron_umap`,
...), so a hash of that result tells whether a figure drawn before is still up to date: the report asks
:func:`inputs` and redraws only what changed. The readers also hold the few choices of what a figure shows
that are made from data (the order of spaces and references, the forest plot's lines).

Example
-------
>>> from polypure.viz import figure_data, figures                           # doctest: +SKIP
>>> figure_data.inputs(figures.space_bars, "storage/demo.h5", "block_3", "clip")["layers"]  # doctest: +SKIP
['block_0', 'block_1', 'block_2']
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import yaml

from polypure.store.hdf5_store import Store

#: Lines of a forest plot at the most; a longer table shows each group's largest differences.
FOREST_LINES = 48


@contextlib.contextmanager
def opened(store):
    """A :class:`Store` for ``store`` (a Store, used as is, or a path, opened read-only and closed after)."""
    if isinstance(store, Store):
        yield store
        return
    with Store(store, "r") as st:
        yield st


def references(store: Store, target: str) -> list[str]:
    """Reference spaces with distance correlations stored for a target, in the config's order.

    ``clip``, ``dinov2``, ... in the order of the store config's ``evaluate.references``, then any others.
    """
    found = store.metric_keys(target, "distance_correlation")
    if not found:
        return []
    try:
        listed = (store.config().get("evaluate") or {}).get("references") or []
    except (yaml.YAMLError, AttributeError):
        listed = []
    # the config's order (the first reference is the main one), then any others the store holds
    return [r for r in listed if r in found] + [r for r in found if r not in listed]


def correlations(store: Store, target: str, reference: str) -> dict[str, np.ndarray]:
    """Per-neuron distance correlation with ``reference`` of every stored space.

    Returns
    -------
    dict of str to ndarray
        Space -> (M,) float64, in the order attribution layers, ``activation``, other spaces (such as
        another reference, DINOv2).
    """
    stored = store.metric_keys(target, "distance_correlation", reference)
    order = [s for s in store.spaces(target) if s in stored]
    order += sorted(s for s in stored if s not in order)
    return {space: store.metric(target, "distance_correlation", reference, space) for space in order}


def crop_boxes(store: Store, target: str, view: str = "auto") -> np.ndarray | None:
    """The crop boxes of a target's references (M, n_refs, 4) for the chosen view, or None for full images.

    ``view`` is ``auto`` (crops where the store has them), ``crop`` or ``full``.
    """
    if view not in ("auto", "crop", "full"):
        raise ValueError(f"view must be auto, crop or full, not {view!r}")
    return None if view == "full" else store.crop_boxes(target)


def _features(store: Store, target: str, space: str, row: int) -> np.ndarray:
    return np.asarray(store.features(target, space, row), np.float64)


# ---------------------------------------------------------------------------------------------------
# one reader per figure: the figure is drawn from its result alone


def distance_inputs(store: Store, target: str, neuron_row: int, reference: str) -> dict:
    """What :func:`~polypure.viz.figures.distance_matrices` draws: one neuron's features per space."""
    corr = correlations(store, target, reference)
    spaces = store.spaces(target)
    return {"neuron": int(store.neurons(target)[neuron_row]),
            "reference": _features(store, target, reference, neuron_row),
            "features": {space: _features(store, target, space, neuron_row) for space in spaces},
            "corr": {space: float(corr[space][neuron_row]) if space in corr else float("nan") for space in spaces}}


def scatter_inputs(store: Store, target: str, reference: str) -> dict:
    """What :func:`~polypure.viz.figures.correlation_scatter` draws."""
    return {"layers": store.relevance_spaces(target), "corr": correlations(store, target, reference),
            "neurons": store.neurons(target)}


def bars_inputs(store: Store, target: str, reference: str) -> dict:
    """What :func:`~polypure.viz.figures.space_bars` draws."""
    return {"corr": correlations(store, target, reference), "layers": store.relevance_spaces(target)}


def umap_inputs(store: Store, target: str, neuron_row: int, method: str = "kmeans",
                spaces: Sequence[str] | None = None, view: str = "auto") -> dict:
    """What :func:`~polypure.viz.figures.neuron_umap` draws (less the images, which come from the dataset)."""
    spaces = list(spaces) if spaces is not None else store.spaces(target)
    boxes = crop_boxes(store, target, view)
    return {"neuron": int(store.neurons(target)[neuron_row]),
            "refs": store.reference_indices(target)[neuron_row],
            "features": {space: _features(store, target, space, neuron_row) for space in spaces},
            "labels": {space: store.cluster_labels(target, space, method, neuron_row) for space in spaces},
            "boxes": boxes[neuron_row] if boxes is not None else None}


def truth_inputs(store: Store) -> dict:
    """What :func:`~polypure.viz.figures.ground_truth_table` draws: the ARI rows of the summary table."""
    from polypure.evaluation import summary

    targets = store.relevance_targets()
    return {"records": [r for r in summary.read(store) if str(r["metric"]).startswith("ARI")], "targets": targets,
            "layers": {target: store.relevance_spaces(target) for target in targets}}


def forest_inputs(store: Store, metric: str) -> dict:
    """What :func:`~polypure.viz.figures.comparison_forest` draws: at most :data:`FOREST_LINES` comparisons."""
    from polypure.evaluation import comparisons

    rows, attrs = comparisons.read(store)
    rows = [r for r in rows if r["metric"] == metric]
    total = len(rows)
    if total > FOREST_LINES:
        # a leaderboard has hundreds of lines: each group keeps its largest differences, so the plot stays legible
        groups = list(dict.fromkeys((r["target"], r["group"]) for r in rows))
        each = max(1, FOREST_LINES // len(groups))
        rows = [r for g in groups for r in sorted(
            (r for r in rows if (r["target"], r["group"]) == g),
            key=lambda r: -r["mean_diff"] if np.isfinite(r["mean_diff"]) else np.inf)[:each]]
    return {"rows": rows, "confidence": attrs.get("confidence", 0.95), "total": total}


def paired_inputs(store: Store, metric: str) -> dict:
    """The per-neuron values behind the stored comparisons of a metric in its first target, group and method."""
    from polypure.evaluation import summary

    rows = forest_inputs(store, metric)["rows"]
    if not rows:
        return {"rows": []}
    first = rows[0]
    rows = [r for r in rows if (r["target"], r["group"], r["method"]) == (first["target"], first["group"],
                                                                           first["method"])]
    try:
        polysemantic_by = (store.config().get("evaluate") or {}).get("polysemantic_by")
    except (yaml.YAMLError, AttributeError):
        polysemantic_by = None
    mask = dict(summary.groups(store, first["target"], polysemantic_by)).get(first["group"])
    values = {}
    for kind, of, space, method, array, _ in summary.metric_entries(store, first["target"]):
        if f"{kind} {of}" == metric and method == first["method"] and mask is not None:
            values[space] = np.asarray(array, np.float64)[mask]
    return {"rows": rows, "values": values, "group": first["group"], "method": first["method"]}


def selectivity_inputs(store: Store, target: str, neuron_row: int, method: str = "kmeans") -> dict:
    """What :func:`~polypure.viz.figures.selectivity_bars` draws: one neuron's causal test per tested space.

    Returns
    -------
    dict
        ``neuron``, ``method`` and ``spaces``: per space with a stored selectivity of the method's clustering
        (in the target's order), its ``selectivity`` and ``null`` and the per-cluster ``drops`` (K, 4)
        (own, other, null own, null other).
    """
    from polypure.store import schema

    stored = [space for space in store.metric_keys(target, schema.SELECTIVITY)
              if method in store.metric_keys(target, schema.SELECTIVITY, space)]
    order = [s for s in store.spaces(target) if s in stored] + sorted(s for s in stored if s not in store.spaces(target))
    spaces = {}
    for space in order:
        spaces[space] = {
            "selectivity": float(store.metric(target, schema.SELECTIVITY, space, method)[neuron_row]),
            "null": float(store.metric(target, schema.SELECTIVITY_NULL, space, method)[neuron_row]),
            "drops": np.asarray(store.metric(target, schema.SELECTIVITY_DROPS, space, method)[neuron_row], np.float64)}
    return {"neuron": int(store.neurons(target)[neuron_row]), "method": method, "spaces": spaces}


#: The reader of each figure function of :mod:`polypure.viz.figures`, by the function's name (names, not the
#: functions: the figures import this module).
READERS: dict[str, Callable[..., dict]] = {
    "distance_matrices": distance_inputs, "correlation_scatter": scatter_inputs, "space_bars": bars_inputs,
    "neuron_umap": umap_inputs, "ground_truth_table": truth_inputs, "comparison_forest": forest_inputs,
    "paired_scatter": paired_inputs, "selectivity_bars": selectivity_inputs}


def inputs(figure, store, *args, **kwargs) -> dict:
    """The store data a figure function draws from, for the same arguments (less the output folder).

    Parameters
    ----------
    figure : callable or str
        :func:`~polypure.viz.figures.distance_matrices`, :func:`~polypure.viz.figures.correlation_scatter`,
        :func:`~polypure.viz.figures.space_bars`, :func:`~polypure.viz.figures.neuron_umap` (without its
        ``dataset`` argument), :func:`~polypure.viz.figures.ground_truth_table`,
        :func:`~polypure.viz.figures.comparison_forest`, :func:`~polypure.viz.figures.paired_scatter` or
        :func:`~polypure.viz.figures.selectivity_bars`, or its name.
    store : Store or str or Path
    *args, **kwargs
        The figure's arguments between ``store`` and ``out_dir`` (``neuron_umap``: also ``method``,
        ``spaces`` and ``view``; ``selectivity_bars``: also ``method``; ``ground_truth_table``: none).

    Returns
    -------
    dict
        Everything the figure reads, as numbers, strings and arrays: a hash of it changes whenever the
        figure would.

    Examples
    --------
    >>> inputs("space_bars", "storage/demo.h5", "block_3", "clip")["layers"]     # doctest: +SKIP
    ['block_0', 'block_1', 'block_2']
    """
    name = figure if isinstance(figure, str) else getattr(figure, "__name__", figure)
    if name not in READERS:
        raise ValueError(f"{name!r} is not a figure of polypure.viz.figures")
    with opened(store) as st:
        return READERS[name](st, *args, **kwargs)
