"""Results of several stores compared: ``polypure compare A.h5 B.h5 [...] --out DIR``.

:func:`compare_stores` reads the per-neuron metrics of every store (:meth:`polypure.store.results.Results.metrics`
grouped as in the summary) and compares each store after the first with the first, for every target, group
of neurons, space, cluster method and metric label the two have in common:

* with :func:`polypure.evaluation.statistics.paired` (Wilcoxon signed-rank) when the two stores share the samples (ids), the
  neurons of the target and their references (the same samples per neuron), rows matched by neuron id: one
  model explained under two rules in two runs, say;
* with :func:`polypure.evaluation.statistics.unpaired` (Mann-Whitney U, bootstrap interval of the difference of the means)
  otherwise; the column ``why`` says what differs (``other samples``, ``other neurons``, ``other
  references``).

A positive ``mean_diff`` means the other store scores higher than the first. ``p_holm`` is Holm-adjusted
over the whole table. Metrics that cannot be compared are refused with a :class:`ConfigError` (exit status
2): a distance correlation or cluster distance whose reference evaluator differs between two stores (its
embedding signature, pixels of in-memory data aside), no metric in common, or ``paired=True`` where the
stores do not share samples, neurons and references.

:func:`write_comparison` writes ``comparison.csv``, ``summaries.csv`` and ``index.html``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from polypure import __version__
from polypure.config.paths import require_file, require_output_folder
from polypure.errors import ConfigError, StoreError
from polypure.evaluation import statistics as stats
from polypure.evaluation import summary
from polypure.store.results import Results

#: Columns of :attr:`StoreComparison.comparison`. ``n``, ``dropped``, ``zeros`` are a paired test's,
#: ``n_a``, ``n_b``, ``dropped_a``, ``dropped_b`` an unpaired one's; the others' are missing.
COMPARISON_COLUMNS = ("store_a", "store_b", "target", "group", "space", "method", "metric", "test", "why",
                      "n", "dropped", "zeros", "n_a", "n_b", "dropped_a", "dropped_b", "mean_a", "mean_b",
                      "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "effect", "reason")
#: The keys of a summary row; :attr:`StoreComparison.summaries` has them, then per store its columns.
SUMMARY_KEYS = ("target", "group", "space", "method", "metric")
#: The summary columns shown per store, as ``"<column> [<store>]"``.
SUMMARY_VALUES = ("mean", "std", "n", "neurons", "skipped")
#: What the column ``test`` says.
PAIRED, UNPAIRED = "paired (wilcoxon)", "unpaired (mann-whitney)"
#: Metrics measured against a reference space (an evaluator's embeddings).
REFERENCE_METRICS = tuple(kind for kind in summary.KINDS if kind not in summary.GROUND_TRUTH)

_COUNTS = ("n", "dropped", "zeros", "n_a", "n_b", "dropped_a", "dropped_b")


@dataclass
class StoreComparison:
    """What :func:`compare_stores` gives.

    Attributes
    ----------
    stores : list of str
        The stores' names as the tables show them (file names; whole paths where two names are equal).
    paths : list of Path
        The stores' files, in the same order.
    comparison : DataFrame
        One row per other store and (target, group, space, method, metric) it shares with the first store:
        the columns of :data:`COMPARISON_COLUMNS`.
    summaries : DataFrame
        The stores' summary tables side by side: :data:`SUMMARY_KEYS`, then ``"<column> [<store>]"`` for each
        store and each of :data:`SUMMARY_VALUES`; a row a store lacks is empty in its columns.
    pairing : dict
        ``(store_b, target) -> (test, why)``: how each other store's targets were compared with the first's.
    """

    stores: list[str]
    paths: list[Path]
    comparison: pd.DataFrame
    summaries: pd.DataFrame
    pairing: dict = field(default_factory=dict)

    def summary_line(self, alpha: float = 0.05) -> str:
        """One line on what the comparison found: how many differences hold after Holm, and in which direction.

        Examples
        --------
        >>> import pandas as pd
        >>> table = pd.DataFrame({"store_b": ["b.h5"] * 3, "mean_diff": [0.2, -0.1, 0.05],
        ...                       "p_holm": [0.001, 0.01, 0.6]})
        >>> StoreComparison(["a.h5", "b.h5"], [], table, pd.DataFrame()).summary_line()
        'a.h5 against b.h5: 3 comparisons, 2 differ at p_holm < 0.05 (1 higher in b.h5, 1 lower), 1 do not'
        """
        frame = self.comparison
        if frame.empty:
            return f"{self.stores[0]} against {', '.join(self.stores[1:])}: nothing in common to compare"
        significant = frame[frame["p_holm"] < alpha]
        higher = int((significant["mean_diff"] > 0).sum())
        return (f"{self.stores[0]} against {', '.join(self.stores[1:])}: {len(frame)} comparisons, "
                f"{len(significant)} differ at p_holm < {alpha:g} ({higher} higher in "
                f"{'the others' if len(self.stores) > 2 else self.stores[1]}, {len(significant) - higher} lower), "
                f"{len(frame) - len(significant)} do not")


def compare_stores(paths, *, metric: str | None = None, paired: bool | None = None, n_resamples: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> StoreComparison:
    """Compare the per-neuron metrics of two or more stores with the first one.

    Parameters
    ----------
    paths : sequence of str or Path
        Two or more stores; the first is the baseline (``a``) of every comparison.
    metric : str, optional
        Only this summary label (``"ARI class"``, ``"corr clip"``); every common one by default.
    paired : bool, optional
        ``None`` (default): a paired test where two stores share samples, neurons and references, else an
        unpaired one. ``True``: paired only, refused where they do not. ``False``: unpaired everywhere.
    n_resamples, confidence, seed
        Of the bootstrap intervals (:func:`polypure.evaluation.statistics.paired`, :func:`polypure.evaluation.statistics.unpaired`).

    Returns
    -------
    StoreComparison

    Raises
    ------
    StoreError
        If a store is missing or not a polypure store.
    ConfigError
        If fewer than two stores are given, a reference evaluator differs between two stores, two stores
        have no metric in common, or ``paired=True`` cannot be honoured. The message names the stores.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ConfigError(f"compare needs at least two stores, got {len(paths)}")
    for path in paths:
        require_file(path, "store", StoreError)  # every store's kind before the first is read
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    opened = [Results(p) for p in paths]
    try:
        loaded = [_load(r, metric) for r in opened]
        rows, pairing = [], {}
        base, base_name = loaded[0], names[0]
        for other, name in zip(loaded[1:], names[1:], strict=True):
            common = sorted(set(base["values"]) & set(other["values"]), key=base["order"].index)
            if not common:
                what = f"metric {metric!r}" if metric else "metric"
                raise ConfigError(f"{base_name} and {name}: no {what} in common "
                                  f"({_listed(base['labels'])} vs {_listed(other['labels'])})")
            _check_references(base, other, base_name, name, common)
            for target in dict.fromkeys(key[0] for key in common):
                why = _difference(base["results"].store, other["results"].store, target)
                if paired is True and why:
                    raise ConfigError(f"{base_name} and {name}: no paired test of target {target!r}: {why}")
                test = PAIRED if not why and paired is not False else UNPAIRED
                pairing[name, target] = (test, why if test == UNPAIRED else "")
            for key in common:
                test, why = pairing[name, key[0]]
                (ids_a, a), (ids_b, b) = base["values"][key], other["values"][key]
                row = {"store_a": base_name, "store_b": name, **dict(zip(SUMMARY_KEYS, key, strict=True)),
                       "test": test, "why": why or ("unpaired by request" if test == UNPAIRED else "")}
                if test == PAIRED:
                    shared = np.intersect1d(ids_a, ids_b)
                    a, b = a[_rows(ids_a, shared)], b[_rows(ids_b, shared)]
                    result = stats.paired(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
                else:
                    result = stats.unpaired(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
                row.update({k: v for k, v in result.as_dict().items() if k != "test"})
                rows.append(row)
        comparison = pd.DataFrame(stats.holm_rows(rows)).reindex(columns=list(COMPARISON_COLUMNS))
        for column in _COUNTS:
            comparison[column] = comparison[column].astype("Int64")
        for column in ("why", "reason"):
            comparison[column] = comparison[column].fillna("")
        summaries = _side_by_side([d["summary"] for d in loaded], names)
    finally:
        for r in opened:
            r.close()
    return StoreComparison(names, paths, comparison, summaries, pairing)


def _load(results: Results, metric: str | None) -> dict:
    """A store's per-neuron metrics by (target, group, space, method, label): (neuron ids, values)."""
    store = results.store
    polysemantic_by = (results.config().get("evaluate") or {}).get("polysemantic_by")
    values, labels, signatures = {}, {}, {}
    for target in results.targets:
        neurons = np.asarray(results.neurons(target))
        groups = summary.groups(store, target, polysemantic_by)
        for kind, of, space, method, vals, _ in results.metric_values(target):
            label = f"{kind} {of}"
            labels[label] = None
            if metric is not None and label != metric:
                continue
            if kind in REFERENCE_METRICS:
                signatures[target, of] = _signature(results, of, target)
            for group, mask in groups:
                values[target, group, space, method, label] = (neurons[mask], np.asarray(vals, np.float64)[mask])
    frame = results.summary()
    if metric is not None:
        frame = frame[frame.metric == metric]
    return {"results": results, "values": values, "order": list(values), "labels": list(labels),
            "signatures": signatures, "summary": frame}


def _signature(results: Results, evaluator: str, target: str) -> dict:
    """What made an evaluator's embeddings of a target (the pixels of in-memory data aside)."""
    stored = results.store.embedding_attrs(evaluator, target).get("signature")
    if stored:
        signature = json.loads(stored)
        signature.pop("pixels", None)
        return signature
    return {"config": (results.config().get("evaluate") or {}).get(evaluator)}


def _check_references(base: dict, other: dict, name_a: str, name_b: str, common) -> None:
    """Refuse reference-space metrics whose evaluator differs between the two stores."""
    for target, _, _, _, label in common:
        kind, of = label.split(" ", 1)
        if kind not in REFERENCE_METRICS:
            continue
        a, b = base["signatures"][target, of], other["signatures"][target, of]
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            differs = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
            raise ConfigError(f"{name_a} and {name_b}: reference evaluator {of!r} differs ({differs}); "
                              f"its metrics ({label}, ...) cannot be compared")


def _difference(a, b, target: str) -> str:
    """Why two stores' neurons of a target are not pairs: ``""`` if they are."""
    if a.sample_ids() != b.sample_ids():
        return "other samples"
    neurons_a, neurons_b = np.asarray(a.neurons(target)), np.asarray(b.neurons(target))
    if set(neurons_a.tolist()) != set(neurons_b.tolist()):
        return "other neurons"
    refs_a, refs_b = a.reference_indices(target), b.reference_indices(target)
    if refs_a.shape != refs_b.shape or not np.array_equal(refs_a, refs_b[_rows(neurons_b, neurons_a)]):
        return "other references"
    return ""


def _rows(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The positions in ``ids`` of the neuron ids ``wanted``, in their order."""
    position = {int(i): k for k, i in enumerate(ids)}
    return np.array([position[int(i)] for i in wanted], np.int64)


def _side_by_side(frames: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """The summary tables side by side, rows in the order the stores give them (the first store's first)."""
    keys = list(SUMMARY_KEYS)
    parts = [frame[keys + list(SUMMARY_VALUES)].drop_duplicates(keys).set_index(keys)
             .rename(columns={c: f"{c} [{name}]" for c in SUMMARY_VALUES}) for frame, name in zip(frames, names,
                                                                                               strict=True)]
    order = list(dict.fromkeys(key for part in parts for key in part.index))
    index = pd.MultiIndex.from_tuples(order, names=keys) if order else pd.MultiIndex.from_tuples([], names=keys)
    out = pd.concat([part.reindex(index) for part in parts], axis=1).reset_index()
    for name in names:
        out[f"skipped [{name}]"] = out[f"skipped [{name}]"].fillna("")
        for column in ("n", "neurons"):
            out[f"{column} [{name}]"] = out[f"{column} [{name}]"].astype("Int64")
    return out


def _listed(labels) -> str:
    return ", ".join(repr(x) for x in labels) or "none"


def write_comparison(result: StoreComparison, out: str | Path) -> list[Path]:
    """Write ``comparison.csv``, ``summaries.csv`` and ``index.html`` into a folder (made if needed).

    CSV files write NaN as ``NaN`` (``pandas.read_csv(path, keep_default_na=False, na_values=["NaN"])``
    reads them back). Returns the files written.
    """
    from polypure.viz.report_render import render

    out = require_output_folder(out, "comparison folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "comparison.csv", out / "summaries.csv", out / "index.html"]
    result.comparison.to_csv(paths[0], index=False, na_rep="NaN")
    result.summaries.to_csv(paths[1], index=False, na_rep="NaN")
    comparison = result.comparison.astype(object).where(result.comparison.notna(), None)
    summaries = result.summaries.astype(object).where(result.summaries.notna(), None)
    html = render("compare.html", title=f"polypure compare: {', '.join(result.stores)}", root="", sortable=True,
                  stores=[{"name": n, "path": str(p)} for n, p in zip(result.stores, result.paths, strict=True)],
                  comparisons=comparison.to_dict("records"), summary_columns=list(summaries.columns),
                  summaries=summaries.to_dict("records"), numeric=set(_numeric(result.summaries)),
                  compare_version=__version__)
    paths[2].write_text(html, encoding="utf-8")
    return paths


def _numeric(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
