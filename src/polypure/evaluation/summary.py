"""The summary table: per-neuron metrics of the store, averaged over groups of neurons, per space.

Rows are (target group, space); a group is a target's neurons, its neurons that are polysemantic by
a label (``evaluate.polysemantic_by``), or, for planted targets, the virtual neurons of one mode. Every
number is computed from what the store holds under ``/metrics``, so the table of a store can be rebuilt
at any time (``polypure evaluate``) and always agrees with it. A metric is labelled ``<kind> <reference or
label set>`` (:data:`KINDS`); :func:`metric_entries` is the one reading of the stored kinds, shared by
:mod:`polypure.store.results`, :mod:`polypure.evaluation.comparisons` and the report.

A neuron whose score is a non-result (a degenerate space, a clustering that is all noise or one cluster,
references of one label value: :mod:`polypure.evaluation.metrics`) is left out of the mean, and counted: each record
says over how many neurons its mean is (``n``), how many the group has (``neurons``), and why the others
were left out (``skipped``, such as ``8 all-noise, 1 constant``; a neuron can have several reasons).
:func:`pivot` lays the records out as tables, one per group, cluster method and kind of metric; the
printed table (:func:`format_table`) and the report's HTML table both show those.

Example
-------
>>> from polypure.evaluation.summary import format_table
>>> rows = [{"group": "logits", "space": space, "method": "hdbscan", "metric": "ARI shape", "mean": mean,
...          "std": 0.1, "n": n, "neurons": 4, "skipped": skipped}
...         for space, mean, n, skipped in [("block_1", 0.5, 4, ""), ("block_2", 0.5, 3, "1 all-noise"),
...                                         ("block_3", float("nan"), 0, "4 all-noise")]]
>>> print(format_table(rows, "hdbscan"))
logits (4 neurons), clusters: hdbscan
space    ARI shape
block_1  0.500 ± 0.100
block_2  0.500 ± 0.100 n=3
block_3  n/a
not scored: block_3: 4 all-noise; block_2: 1 all-noise
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polypure.evaluation.metrics import (
    ALL_NOISE,
    CONSTANT,
    ONE_CLUSTER,
    ONE_HOT,
    ONE_LABEL,
    REASONS,
    UNIQUE_LABELS,
    VANISHING,
)
from polypure.store.schema import SELECTIVITY as SELECTIVITY_KIND
from polypure.store.schema import SELECTIVITY_NULL, STR, planted_layer

FIELDS = ("target", "group", "space", "method", "metric", "mean", "std", "n", "neurons", "skipped")
#: The reason given for a missing value that no check explains (all distances equal, for instance).
UNDEFINED = "undefined"


def groups(store, target: str, polysemantic_by: str | None) -> list[tuple[str, np.ndarray]]:
    """(name, row mask) of the neuron groups of a target."""
    m = len(store.neurons(target))
    layer = planted_layer(target)
    if layer is not None:
        modes = np.array(store.planted_modes(layer))
        return [(f"{target} ({mode})", modes == mode) for mode in dict.fromkeys(modes.tolist())]
    out = [(target, np.ones(m, bool))]
    mixture = store.metric(target, "mixture", polysemantic_by) if polysemantic_by else None
    if mixture is not None:
        poly = mixture >= 2
        if poly.any():
            out.append((f"{target} [polysemantic by {polysemantic_by}]", poly))
    return out


def _space_order(store, target: str) -> dict[str, int]:
    return {name: i for i, name in enumerate(store.spaces(target))}


#: Metric kinds of the summary labels (``<kind> <reference or label set>``), in column order: reference-space
#: metrics of the spaces and clusterings, purity scores of the neurons in a reference space, the causal
#: selectivity of the clusterings (``selectivity circuit`` / ``selectivity null``), ground truth.
KINDS = ("corr", "inner", "inter", "gain", "clarity", "polysem", "mono-topK", "redundancy", "selectivity", "ARI",
         "NMI")
#: Kinds scored against known labels (the others against a reference space).
GROUND_TRUTH = ("ARI", "NMI")
#: Purity scores of a neuron in a reference space (:mod:`polypure.evaluation.purity`), one per neuron whatever the space
#: of a clustering: their ``space`` is the reference space itself. ``mono-topK`` is Pach et al.'s
#: monosemanticity restricted to the neuron's top-K references; ``redundancy`` is per neuron its largest
#: similarity with another neuron of the target, so that its mean over a target is the target's redundancy.
PURITY = {"clarity": "clarity", "polysemanticity": "polysem", "monosemanticity_topk": "mono-topK",
          "nearest_similarity": "redundancy"}
#: The kind of the causal test of a clustering (:mod:`polypure.evaluation.selectivity`): the selectivity of its
#: circuits is ``selectivity circuit``, that of random sets of as many channels (concepts in a dictionary space), its
#: null, ``selectivity null``.
SELECTIVITY = "selectivity"
#: What each stored selectivity kind is ``of`` in its summary label.
SELECTIVITY_OF = {SELECTIVITY_KIND: "circuit", SELECTIVITY_NULL: "null"}


def metric_entries(store, target: str):
    """Every per-neuron metric of a target with its summary label: the one reading of ``/metrics`` kinds.

    Yields
    ------
    tuple
        ``(kind, of, space, method, values, check)``: ``kind`` one of :data:`KINDS`, ``of`` the reference
        space or label set (``kind + " " + of`` is the summary label), ``method`` the cluster method id or
        ``""``, ``values`` (M,) and ``check`` the keyword arguments of :func:`reasons` for the metric.
    """
    for kind, key, values in store.metric_entries(target):
        if kind in ("ari", "nmi") and len(key) == 3:
            of, space, method = key
            yield kind.upper(), of, space, method, values, {"space": space, "method": method, "labels": of}
        elif kind == "distance_correlation" and len(key) == 2:
            of, space = key
            yield "corr", of, space, "", values, {"space": space, "reference": of}
        elif kind == "cluster_distances" and len(key) == 3:
            of, space, method = key
            check = {"space": space, "method": method, "reference": of}
            yield "inner", of, space, method, values[:, 0], check
            yield "inter", of, space, method, values[:, 1], check
        elif kind == "split_gain" and len(key) == 3:
            of, space, method = key
            yield "gain", of, space, method, values, {"space": space, "method": method, "reference": of}
        elif kind in SELECTIVITY_OF and len(key) == 2:
            space, method = key
            # NaN where the space is degenerate or the clustering no split: the selectivity stage's own checks
            yield SELECTIVITY, SELECTIVITY_OF[kind], space, method, values, {"space": space, "method": method}
        elif kind in PURITY and len(key) == 1:
            (of,) = key
            # a neighbour's similarity is defined for a degenerate neuron too; the other scores are not
            check = {"space": ""} if kind == "nearest_similarity" else {"space": of}
            yield PURITY[kind], of, of, "", values, check


def _metric_arrays(store, target: str):
    """(metric label, space, method, values, reasons) for every per-neuron metric of a target."""
    for kind, of, space, method, values, check in metric_entries(store, target):
        yield f"{kind} {of}", space, method, values, reasons(store, target, **check)


_KIND_RANK = {kind: rank for rank, kind in enumerate(KINDS)}


def names_order(store) -> list[str]:
    """References and label sets in the order the store's config lists them, then the store's other label sets."""
    try:
        evaluate = store.config().get("evaluate") or {}
    except AttributeError:
        evaluate = {}
    truth = evaluate.get("ground_truth")
    names = [*(evaluate.get("references") or []), *(truth if isinstance(truth, list) else []), *store.label_sets()]
    return list(dict.fromkeys(names))


def metric_key(label: str, names: list[str]):
    """Sort key of a metric label: reference metrics first, then ground truth; per name in the given order."""
    kind, _, name = label.partition(" ")
    section = 1 if kind in GROUND_TRUTH else 0
    return section, names.index(name) if name in names else len(names), name, _KIND_RANK.get(kind, len(KINDS))


def reasons(store, target: str, *, space: str, method: str | None = None, reference: str | None = None,
            labels: str | None = None) -> dict[str, np.ndarray]:
    """Per reason, which neurons of a target have no score for a metric, from the stored checks.

    Parameters
    ----------
    store : Store
    target : str
    space : str
        The space the metric is computed in; its ``/metrics/<target>/degenerate/<space>`` applies (``""``:
        none does).
    method : str, optional
        The cluster method id, for metrics of a clustering (``cluster_status``).
    reference : str, optional
        The reference space, for distance correlations and cluster distances (its degeneracy applies too).
    labels : str, optional
        The label set, for ARI / NMI (``single_label``, ``unique_labels``).

    Returns
    -------
    dict of str to ndarray of bool, shape (M,)
        One mask per reason of :data:`polypure.evaluation.metrics.REASONS` (all False where the check is not stored).
    """
    m = len(store.neurons(target))
    out = {reason: np.zeros(m, bool) for reason in REASONS}

    def status(stored: np.ndarray | None, names: tuple[str, ...]) -> None:
        if stored is not None:
            for name in names:
                out[name] |= stored == name

    for name in dict.fromkeys(s for s in (space, reference) if s):
        status(store.metric(target, "degenerate", name), (VANISHING, CONSTANT, ONE_HOT))
    if method:
        status(store.metric(target, "cluster_status", space, method), (ALL_NOISE, ONE_CLUSTER))
    single = store.metric(target, "single_label", labels) if labels else None
    if single is not None:
        out[ONE_LABEL] |= single.astype(bool)
    unique = store.metric(target, "unique_labels", labels) if labels else None
    if unique is not None:
        out[UNIQUE_LABELS] |= unique.astype(bool)
    return out


def skipped(store, target: str, **metric) -> np.ndarray:
    """Which neurons of a target have no score for a metric, for any reason: (M,) bool (see :func:`reasons`)."""
    return np.logical_or.reduce(list(reasons(store, target, **metric).values()))


def format_skipped(counts: dict[str, int]) -> str:
    """``{"all-noise": 8, "constant": 1}`` as ``"8 all-noise, 1 constant"`` (reasons in a fixed order)."""
    order = [*REASONS, UNDEFINED]
    return ", ".join(f"{counts[r]} {r}" for r in sorted(counts, key=lambda r: (order.index(r) if r in order
                                                                               else len(order), r)) if counts[r])


def parse_skipped(text: str) -> dict[str, int]:
    """The counts of a ``skipped`` field: the inverse of :func:`format_skipped`."""
    out = {}
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        count, _, reason = part.partition(" ")
        out[reason] = int(count)
    return out


def build(store, polysemantic_by: str | None = None, order: list[str] | None = None) -> list[dict]:
    """Summary records (mean, std and count of non-NaN values) for every group, space, method and metric.

    Parameters
    ----------
    store : Store
    polysemantic_by : str, optional
        A label set with a stored mixture; its polysemantic neurons form a group of their own.
    order : list of str, optional
        References and label sets in the order their columns should appear.

    Returns
    -------
    list of dict
        Records with the fields of :data:`FIELDS`: ``n`` neurons of the group's ``neurons`` have a value;
        ``skipped`` counts the others by reason.
    """
    records = []
    names = list(order or [])
    for target in store.relevance_targets():
        spaces = _space_order(store, target)
        metrics = sorted(_metric_arrays(store, target),
                         key=lambda r: (metric_key(r[0], names), spaces.get(r[1], len(spaces)), r[1], r[2]))
        for group, mask in groups(store, target, polysemantic_by):
            for label, space, method, values, because in metrics:
                chosen = np.asarray(values, np.float64)[mask]
                finite = chosen[np.isfinite(chosen)]
                counts = {reason: int(flags[mask].sum()) for reason, flags in because.items()}
                explained = np.logical_or.reduce([flags[mask] for flags in because.values()]) if because \
                    else np.zeros(int(mask.sum()), bool)
                counts[UNDEFINED] = int((~np.isfinite(chosen) & ~explained).sum())
                records.append({"target": target, "group": group, "space": space, "method": method,
                                "metric": label, "mean": float(finite.mean()) if finite.size else float("nan"),
                                "std": float(finite.std()) if finite.size else float("nan"), "n": int(finite.size),
                                "neurons": int(mask.sum()), "skipped": format_skipped(counts)})
    return records


def write(store, records: list[dict]) -> None:
    """Store the records as ``/metrics/summary`` (a table with the fields of :data:`FIELDS`)."""
    dtype = np.dtype([("target", STR), ("group", STR), ("space", STR), ("method", STR), ("metric", STR),
                      ("mean", np.float64), ("std", np.float64), ("n", np.int64), ("neurons", np.int64),
                      ("skipped", STR)])
    table = np.array([tuple(r[f] for f in FIELDS) for r in records], dtype=dtype)
    store.write_summary(table)
    store.flush()


def read(store) -> list[dict]:
    """The records of ``/metrics/summary``.

    A table written before ``neurons`` and ``skipped`` existed reads with the largest ``n`` of each group
    as its size and nothing skipped.
    """
    rows = store.summary_table()
    if rows is None:
        return []
    present = [f for f in FIELDS if f in (rows.dtype.names or ())]
    records = [{f: (row[f].decode() if isinstance(row[f], bytes) else row[f].item() if hasattr(row[f], "item")
                    else row[f]) for f in present} for row in rows]
    if "neurons" not in present:
        size: dict[str, int] = {}
        for r in records:
            size[r["group"]] = max(size.get(r["group"], 0), r["n"])
        for r in records:
            r["neurons"], r["skipped"] = size[r["group"]], ""
    return records


def save_beside(store_path: Path, records: list[dict]) -> tuple[Path, Path]:
    """Write ``<store>.metrics.csv`` and ``<store>.metrics.json`` next to the store."""
    store_path = Path(store_path)
    csv_path = store_path.with_suffix(".metrics.csv")
    json_path = store_path.with_suffix(".metrics.json")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(records)
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    return csv_path, json_path


#: The kinds of table of every group and method: reference-space metrics, purity scores, causal selectivity
#: and ground-truth scores, apart so that none grows too wide.
PARTS = (("corr", "inner", "inter", "gain"), ("clarity", "polysem", "mono-topK", "redundancy"), (SELECTIVITY,),
         GROUND_TRUTH)


@dataclass
class Table:
    """One table of the summary: a group's metrics of one kind for one cluster method.

    Attributes
    ----------
    group : str
    method : str
        The cluster method id, ``""`` for a table without cluster-based metrics.
    neurons : int
        Neurons in the group.
    spaces, metrics : list of str
        Row and column names, in order.
    cells : dict
        (space, metric) -> record; a missing key is an empty cell.
    """

    group: str
    method: str
    neurons: int
    spaces: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], dict] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """``block_3 (128 neurons), clusters: kmeans``."""
        return f"{self.group} ({self.neurons} neuron{'s' if self.neurons != 1 else ''})" + (
            f", clusters: {self.method}" if self.method else "")

    def text(self, space: str, metric: str) -> str:
        """A cell as shown: ``mean ± std``, ``n/a``, or empty.

        ``n=`` follows where fewer neurons than the group's have a value; ``n/a`` stands where none has;
        the cell is empty where the metric does not exist for the space.
        """
        r = self.cells.get((space, metric))
        if r is None:
            return ""
        if r["n"] == 0 or not np.isfinite(r["mean"]):
            return "n/a"
        return f"{r['mean']:.3f} ± {r['std']:.3f}" + (f" n={r['n']}" if r["n"] < self.neurons else "")

    def notes(self) -> list[str]:
        """Why neurons were left out: ``where: count reason`` per reason and count.

        ``where`` is whole rows (spaces), whole columns (metrics), or single cells.
        """
        by: dict[tuple[str, int], list[tuple[str, str]]] = {}
        for key, r in self.cells.items():
            for reason, count in parse_skipped(r.get("skipped", "")).items():
                by.setdefault((reason, count), []).append(key)
        order = [*REASONS, UNDEFINED]
        out = []
        for (reason, count), keys in sorted(by.items(), key=lambda item: (order.index(item[0][0])
                                                                            if item[0][0] in order else len(order),
                                                                            -item[0][1])):
            out.append(f"{self._where(set(keys))}: {count} {reason}")
        return out

    def _where(self, keys: set[tuple[str, str]]) -> str:
        """The cells ``keys`` named as briefly as possible."""
        if keys == set(self.cells):
            return "every space"
        rows = [s for s in self.spaces if any(k[0] == s for k in keys)]
        if keys == {k for k in self.cells if k[0] in rows}:
            return ", ".join(rows)
        columns = [m for m in self.metrics if any(k[1] == m for k in keys)]
        if keys == {k for k in self.cells if k[1] in columns}:
            return ", ".join(columns)
        return ", ".join(f"{s} {m}" for s in self.spaces for m in self.metrics if (s, m) in keys)


def pivot(records: list[dict], methods: Sequence[str] | str | None = None) -> list[Table]:
    """The records as tables: per group, per cluster method, per kind of metric (:data:`PARTS`).

    Every method in the records gets its tables, those named in ``methods`` first and in that order.
    Distance correlations and purity scores, which need no clustering, appear once per group, with the first
    method; a table of purity scores alone names no method.

    Parameters
    ----------
    records : list of dict
        Summary records (:func:`build`, :func:`read`).
    methods : str or sequence of str, optional
        Cluster method ids to show first (the config's order).

    Returns
    -------
    list of Table
    """
    methods = [methods] if isinstance(methods, str) else list(methods or [])
    found = list(dict.fromkeys(r["method"] for r in records if r["method"]))
    order = [m for m in methods if m in found] + [m for m in found if m not in methods] or [""]
    tables = []
    for group in dict.fromkeys(r["group"] for r in records):
        rows = [r for r in records if r["group"] == group]
        neurons = max(int(r.get("neurons", r["n"])) for r in rows)
        for position, method in enumerate(order):
            chosen = [r for r in rows if r["method"] == method or (not r["method"] and position == 0)]
            for part in PARTS:
                selected = [r for r in chosen if r["metric"].split(" ", 1)[0] in part]
                if selected:
                    # purity scores alone depend on no clustering: their table names no method
                    shown = method if any(r["method"] for r in selected) else ""
                    tables.append(Table(group, shown, neurons,
                                        spaces=list(dict.fromkeys(r["space"] for r in selected)),
                                        metrics=list(dict.fromkeys(r["metric"] for r in selected)),
                                        cells={(r["space"], r["metric"]): r for r in selected}))
    return tables


def format_table(records: list[dict], methods: Sequence[str] | str | None = None) -> str:
    """The table as text: a block per :class:`Table` of :func:`pivot`, a row per space, a column per metric.

    Below a block, ``not scored:`` lines say which neurons were left out of its means, and why.
    """
    return "\n\n".join(_block(table) for table in pivot(records, methods))


def _block(table: Table) -> str:
    """One table as aligned text."""
    spaces, metrics = table.spaces, table.metrics
    widths = [max(len(m), *(len(table.text(sp, m)) for sp in spaces)) + 2 for m in metrics]
    first = max(7, *(len(sp) for sp in spaces)) + 2
    lines = [table.title, f"{'space':<{first}}" + "".join(f"{m:<{w}}" for m, w in zip(metrics, widths)).rstrip()]
    for space in spaces:
        line = f"{space:<{first}}" + "".join(f"{table.text(space, m):<{w}}" for m, w in zip(metrics, widths))
        lines.append(line.rstrip())
    notes = table.notes()
    if notes:
        lines.append("not scored: " + "; ".join(notes))
    return "\n".join(lines)
