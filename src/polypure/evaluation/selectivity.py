"""Is the split real? The causal selectivity of a neuron's clustering (docs/method.md, Causal selectivity).

For a neuron, an attribution layer ``L`` and a clustering of its references (made in the relevance space
of ``L``):

* the *circuit* of cluster ``c`` is the ``m`` channels of ``L`` with the largest mean relevance over the
  references of ``c`` (:func:`circuits`; equal means go to the smaller channel index);
* ablating it (zeroing those channels of ``L`` for the forward pass from ``L`` to the neuron) drops the
  neuron's activation ``a`` on each reference to ``a'``; the *relative drop* is ``(a - a') / a`` on the
  references with ``a > 0`` (:func:`relative_drops`; ``a`` and ``a'`` are clamped at 0, so a drop is at
  most 1, and negative where the ablation raises the activation);
* the *own drop* of ``c`` is the mean relative drop over the references of ``c``, the *other drop* the
  mean over the references of every other cluster, both under ``c``'s ablation;
* the *selectivity* is own drop minus other drop, averaged over the clusters (:func:`score`): near 1
  when each cluster's circuit carries that cluster's references and nothing else (the split is real, in
  the network's own computation), near 0 when a circuit drops every reference alike;
* its *null* replaces each circuit with a random set of ``m`` channels of ``L``: per cluster, in the order
  of the cluster labels, ``null_draws`` sets drawn by ``rng.choice(C, m, replace=False)`` from
  ``numpy.random.default_rng([seed, neuron])`` (:func:`random_sets`), their own and other drops averaged
  over the draws. (Drawing them per cluster matters: with the same sets for both clusters of a 2-way split,
  own minus other would cancel exactly and the null would be 0 by construction.)

In a dictionary space (:mod:`polypure.dictionaries`) the space's dimensions are the neuron's kept concepts
instead of channels: the circuit is ``m`` of them, the null draws from them, and ablating them subtracts
their terms from the dictionary's layer (:class:`~polypure.attribution.ablation.ConceptSubtraction`).

Noise (label -1) is not a cluster: its references are neither own nor other. A cluster is *left out* of
the averages when it has no reference with ``a > 0`` on its own side, or none on the other side (the
only cluster besides noise, or one whose other references all leave the neuron silent): its drops are
NaN, and the selectivity (and the null) of a neuron none of whose clusters is left in is NaN.

Example
-------
>>> import numpy as np
>>> from polypure.evaluation.selectivity import score
>>> labels = np.array([0, 0, 1, 1])
>>> base = np.ones(4)
>>> ablated = {0: np.array([0., 0., 1., 1.]), 1: np.array([1., 1., 0., 0.])}
>>> null = {0: [np.full(4, .5)], 1: [np.full(4, .5)]}
>>> result = score(labels, base, ablated, null)
>>> float(result.selectivity), float(result.null)
(1.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from polypure.store.schema import SELECTIVITY_DROP_COLUMNS

#: Columns of a neuron's per-cluster drops (:attr:`Split.drops`), as the store keeps them.
DROP_COLUMNS = SELECTIVITY_DROP_COLUMNS


@dataclass
class Split:
    """The causal test of one neuron's clustering.

    Attributes
    ----------
    selectivity, null : float
        Own drop minus other drop averaged over the clusters left in, for the circuits and for random
        sets; NaN where no cluster is left in.
    drops : ndarray, shape (K, 4)
        Per cluster label ``0..K-1``: own and other drop of the circuit, and of the random sets (averaged
        over the draws), the columns of :data:`DROP_COLUMNS`; NaN for a cluster left out or a label
        the clustering does not use.
    circuits : ndarray, shape (K, m) int64
        Per cluster label, its circuit's channels by decreasing mean relevance; -1 for an unused label.
    """

    selectivity: float
    null: float
    drops: np.ndarray
    circuits: np.ndarray


def clusters(labels: np.ndarray) -> list[int]:
    """The cluster labels of a clustering, ascending, noise (-1) left out."""
    return sorted(int(c) for c in np.unique(labels) if c >= 0)


def circuits(relevance: np.ndarray, labels: np.ndarray, m: int) -> dict[int, np.ndarray]:
    """Per cluster, the ``m`` channels with the largest mean relevance over its references.

    Parameters
    ----------
    relevance : ndarray, shape (n_refs, C)
        The neuron's relevance vectors at the layer.
    labels : ndarray, shape (n_refs,)
    m : int
        At most ``C``.

    Returns
    -------
    dict of int to ndarray (m,) int64
        By decreasing mean relevance; equal means go to the smaller channel index.
    """
    relevance = np.asarray(relevance, np.float64)
    return {c: np.argsort(-relevance[labels == c].mean(axis=0), kind="stable")[:m].astype(np.int64)
            for c in clusters(labels)}


def random_sets(seed: int, neuron: int, channels: int, m: int, labels: np.ndarray, draws: int
                ) -> dict[int, list[np.ndarray]]:
    """The random sets of the null: ``draws`` sets of ``m`` of ``channels`` per cluster.

    Drawn from ``numpy.random.default_rng([seed, neuron])``, cluster by cluster in label order, each
    set by ``rng.choice(channels, m, replace=False)``: the same neuron, seed and clusters give the same
    sets in every space of the same width (a dictionary space's width is the concepts each neuron keeps) and
    for every clustering with the same labels.
    """
    rng = np.random.default_rng([int(seed), int(neuron)])
    return {c: [rng.choice(channels, m, replace=False).astype(np.int64) for _ in range(draws)]
            for c in clusters(labels)}


def relative_drops(base: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """``(base - ablated) / base`` where ``base > 0``, NaN elsewhere (both already clamped at 0)."""
    base = np.asarray(base, np.float64)
    ablated = np.asarray(ablated, np.float64)
    out = np.full(base.shape, np.nan)
    active = base > 0
    out[active] = (base[active] - ablated[active]) / base[active]
    return out


def _sides(labels: np.ndarray, cluster: int, drops: np.ndarray) -> tuple[float, float]:
    """Mean drop over the cluster's references and over the other clusters' (noise neither), NaN where empty."""
    own = drops[labels == cluster]
    other = drops[(labels >= 0) & (labels != cluster)]
    own, other = own[np.isfinite(own)], other[np.isfinite(other)]
    return (float(own.mean()) if own.size else np.nan), (float(other.mean()) if other.size else np.nan)


def score(labels: np.ndarray, base: np.ndarray, ablated: dict[int, np.ndarray],
          null: dict[int, list[np.ndarray]], circuit_channels: dict[int, np.ndarray] | None = None,
          m: int | None = None) -> Split:
    """The selectivity of one clustering from the neuron's activations with and without each ablation.

    Parameters
    ----------
    labels : ndarray, shape (n_refs,)
        The clustering (-1: noise).
    base : ndarray, shape (n_refs,)
        The neuron's activation on each reference, clamped at 0.
    ablated : dict of int to ndarray (n_refs,)
        Per cluster, the activation on every reference with the cluster's circuit ablated.
    null : dict of int to list of ndarray (n_refs,)
        Per cluster, the activation on every reference under each random set.
    circuit_channels : dict of int to ndarray, optional
        The circuits, kept in :attr:`Split.circuits`.
    m : int, optional
        Width of :attr:`Split.circuits` (default: the circuits' size, or 0).

    Returns
    -------
    Split
    """
    labels = np.asarray(labels)
    found = clusters(labels)
    width = m if m is not None else len(next(iter((circuit_channels or {}).values()), []))
    size = found[-1] + 1 if found else 0
    drops = np.full((size, len(DROP_COLUMNS)), np.nan)
    chosen = np.full((size, width), -1, np.int64)
    own_minus_other, null_minus_other = [], []
    for c in found:
        if circuit_channels is not None:
            chosen[c, :len(circuit_channels[c])] = circuit_channels[c]
        own, other = _sides(labels, c, relative_drops(base, ablated[c]))
        draws = [_sides(labels, c, relative_drops(base, values)) for values in null[c]]
        if not (np.isfinite(own) and np.isfinite(other)):
            continue
        null_own = float(np.mean([d[0] for d in draws]))
        null_other = float(np.mean([d[1] for d in draws]))
        drops[c] = own, other, null_own, null_other
        own_minus_other.append(own - other)
        null_minus_other.append(null_own - null_other)
    return Split(float(np.mean(own_minus_other)) if own_minus_other else np.nan,
                 float(np.mean(null_minus_other)) if null_minus_other else np.nan, drops, chosen)


@dataclass
class Plan:
    """The ablations one neuron's clusterings need in one space, each distinct keep mask once.

    Attributes
    ----------
    keep : ndarray of bool, shape (A, C)
        Row 0 keeps everything (the neuron's own activation); the others each zero one circuit or random set.
    circuits : dict of str to dict of int to ndarray
        Per clustering, per cluster, its circuit.
    circuit_rows, null_rows : dict of str to dict
        Per clustering, per cluster, the row of ``keep`` of its circuit, and those of its random sets.
    """

    keep: np.ndarray
    circuits: dict[str, dict[int, np.ndarray]]
    circuit_rows: dict[str, dict[int, int]]
    null_rows: dict[str, dict[int, list[int]]]


def plan(relevance: np.ndarray, clusterings: dict[str, np.ndarray], m: int, draws: int, seed: int, neuron: int
         ) -> Plan:
    """The ablations of every clustering of one neuron in one space: its circuits and random sets.

    The same set drawn for two clusterings with the same labels, or a circuit two clusters share, is one row.
    Arguments as :func:`measure`.
    """
    channels = relevance.shape[1]
    masks: list[np.ndarray] = []            # each distinct keep mask once, in first-seen order
    rows: dict[bytes, int] = {}             # a mask's row in ``masks``

    def row(channel_set: np.ndarray | None) -> int:
        keep = np.ones(channels, bool)
        if channel_set is not None:
            keep[channel_set] = False
        if keep.tobytes() not in rows:
            rows[keep.tobytes()] = len(masks)
            masks.append(keep)
        return rows[keep.tobytes()]

    row(None)
    found = Plan(np.zeros((0, channels), bool), {}, {}, {})
    for name, labels in clusterings.items():
        chosen = circuits(relevance, labels, m)
        sets = random_sets(seed, neuron, channels, m, labels, draws)
        found.circuits[name] = chosen
        found.circuit_rows[name] = {c: row(chosen[c]) for c in chosen}
        found.null_rows[name] = {c: [row(s) for s in sets[c]] for c in chosen}
    found.keep = np.stack(masks)
    return found


def scores(found: Plan, clusterings: dict[str, np.ndarray], values: np.ndarray, m: int) -> dict[str, Split]:
    """Every clustering's :class:`Split` from the neuron's activations (A, n_refs) under ``found.keep``."""
    out = {}
    for name, labels in clusterings.items():
        chosen = found.circuits[name]
        ablated = {c: values[found.circuit_rows[name][c]] for c in chosen}
        null = {c: [values[r] for r in found.null_rows[name][c]] for c in chosen}
        out[name] = score(labels, values[0], ablated, null, chosen, m)
    return out


def measure(ablate: Callable[[np.ndarray], np.ndarray], relevance: np.ndarray, clusterings: dict[str, np.ndarray],
            m: int, draws: int, seed: int, neuron: int) -> dict[str, Split]:
    """Every clustering of one neuron at one layer, with all ablations in one call of ``ablate``.

    :func:`plan`, then ``ablate``, then :func:`scores` (the stage plans several neurons before ablating).

    Parameters
    ----------
    ablate : callable
        ``ablate(keep) -> (A, n_refs)``: the neuron's activation (clamped at 0) on each reference with
        the channels where ``keep`` (A, C) is False zeroed; :class:`polypure.attribution.ablation.Ablation`.
    relevance : ndarray, shape (n_refs, C)
        The neuron's relevance at the layer (in a dictionary space: its concepts' contributions).
    clusterings : dict of str to ndarray (n_refs,)
        Labels by name (cluster method id).
    m, draws : int
        Circuit size (at most ``C``) and random sets per cluster.
    seed, neuron : int
        Seed the random sets (:func:`random_sets`).

    Returns
    -------
    dict of str to Split
    """
    found = plan(relevance, clusterings, m, draws, seed, neuron)
    return scores(found, clusterings, ablate(found.keep), m)
