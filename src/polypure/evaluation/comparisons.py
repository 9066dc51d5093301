"""Per-neuron metrics compared between the spaces of one store, over the same neurons.

For each target, group of neurons (as in the summary), cluster method and metric label (``ARI shape``,
``corr clip``, ``gain clip``), a metric's values in a space are compared with those in a baseline space
(by default :meth:`polypure.store.hdf5_store.Store.baseline_space`, the last attribution layer) with
:func:`polypure.evaluation.statistics.paired`: mean difference ``space - baseline`` with a seeded bootstrap interval,
Wilcoxon signed-rank p-value and rank-biserial effect. Neurons without a score on either side are
dropped and counted. ``p_holm`` is Holm-adjusted over every row of one table: for the evaluate stage, the
whole run (every target); for :meth:`polypure.store.results.Results.compare`, the table it returns.

The evaluate stage compares what the config's ``compare`` section asks for (:func:`from_config`), keeps the
table in the store (:func:`write`, :func:`read`), prints it (:func:`format_table`) and saves it beside the
store as ``<store>.comparisons.csv`` (:func:`save_beside`). Metrics that have one value per neuron whatever
the space (clarity, polysemanticity, ``mono-topK``, redundancy: their space is the reference space) have
no baseline to be compared with, and so give no rows unless a pair names their space.

Example
-------
>>> from polypure.store.hdf5_store import Store                                        # doctest: +SKIP
>>> from polypure import comparisons                                        # doctest: +SKIP
>>> with Store("storage/demo.h5") as store:                                 # doctest: +SKIP
...     rows = comparisons.compare(store, metrics=["ARI shape"], baseline="activation")
>>> print(comparisons.format_table(rows))                                  # doctest: +SKIP
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from polypure.errors import ConfigError
from polypure.evaluation import statistics as stats
from polypure.evaluation import summary
from polypure.store.schema import STR, planted_layer

#: Columns of a comparison table (stored, printed, exported), in order.
COLUMNS = ("target", "group", "metric", "method", "space_a", "space_b", "method_a", "n", "dropped", "zeros",
           "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "effect", "reason")
INTS = ("n", "dropped", "zeros")
FLOATS = ("mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "effect")
_DTYPE = np.dtype([(name, np.int64 if name in INTS else np.float64 if name in FLOATS else STR) for name in COLUMNS])


def _values(store, target: str) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """(metric label, method) -> space -> per-neuron values of a target, in the summary's order."""
    names = summary.names_order(store)
    spaces = store.spaces(target)
    methods = store.cluster_methods(target)

    def position(items: list[str], item: str) -> int:
        return items.index(item) if item in items else len(items)

    entries = sorted(summary.metric_entries(store, target),
                     key=lambda e: (summary.metric_key(f"{e[0]} {e[1]}", names), position(methods, e[3]), e[3],
                                    position(spaces, e[2]), e[2]))
    out: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for kind, of, space, method, values, _ in entries:
        out.setdefault((f"{kind} {of}", method), {})[space] = np.asarray(values, np.float64)
    return out


def known_names(store) -> tuple[list[str], list[str]]:
    """The metric labels and the spaces of a store's per-neuron metrics (every target), first-seen order."""
    labels, spaces = {}, {}
    for target in store.relevance_targets():
        spaces.update(dict.fromkeys(store.spaces(target)))
        for (label, _), by_space in _values(store, target).items():
            labels[label] = None
            spaces.update(dict.fromkeys(by_space))
    return list(labels), list(spaces)


def check(store, metrics: Sequence[str] | None = None, baseline: str | None = None,
          pairs: Sequence[Sequence[str]] | None = None, baseline_method: str | None = None) -> None:
    """Refuse a metric label or space the store does not have, naming the ``compare`` key.

    Raises
    ------
    ConfigError
        One line: ``compare.metrics: 'ARI shpe' is not a metric of the store; metrics: ...``.
    """
    labels, spaces = known_names(store)
    methods = list(dict.fromkeys(m for t in store.relevance_targets() for m in store.cluster_methods(t)))
    if baseline_method is not None and baseline_method not in methods:
        raise ConfigError(f"compare.baseline_method: {baseline_method!r} is not a cluster method of the store; "
                          f"methods: {', '.join(methods) or 'none'}")
    for metric in metrics or []:
        if metric not in labels:
            raise ConfigError(f"compare.metrics: {metric!r} is not a metric of the store; metrics: "
                              f"{', '.join(labels) or 'none'}")
    named = [("compare.baseline", baseline)] if baseline is not None else []
    named += [(f"compare.pairs[{i}]", space) for i, pair in enumerate(pairs or []) for space in pair]
    for key, space in named:
        if space not in spaces:
            raise ConfigError(f"{key}: {space!r} is not a space of any target; spaces: {', '.join(spaces) or 'none'}")


def compare(store, *, metrics: Sequence[str] | None = None, baseline: str | None = None,
            pairs: Sequence[Sequence[str]] | None = None, target: str | None = None, group: str | None = None,
            method: str | None = None, polysemantic_by: str | None = None, n_resamples: int = 2000,
            confidence: float = 0.95, seed: int = 0, baseline_method: str | None = None) -> list[dict]:
    """Compare per-neuron metrics between spaces, over the same neurons, with Holm over the whole table.

    Parameters
    ----------
    store : Store
    metrics : sequence of str, optional
        Metric labels as the summary shows them (``"ARI shape"``, ``"gain clip"``); every one by default.
    baseline : str, optional
        The space every other space is compared with; by default each target's
        :meth:`~polypure.store.hdf5_store.Store.baseline_space`. Ignored where ``pairs`` are given.
    pairs : sequence of (str, str), optional
        ``(space_a, space_b)`` pairs to compare instead of every space against the baseline.
    target, group, method : str, optional
        Only this target, group of neurons or cluster method id.
    polysemantic_by : str, optional
        The label set whose polysemantic neurons form a group of their own (``evaluate.polysemantic_by``).
    n_resamples, confidence, seed
        Of the bootstrap interval (:func:`polypure.evaluation.statistics.paired`); the same seed gives the same table.
    baseline_method : str, optional
        A leaderboard: every (space, cluster method) of a metric is compared with the baseline space
        clustered by this method (``gxa:block_2`` with ``kmeans``), other methods at the baseline space
        included. Without it, each method's spaces are compared with the baseline space of that method.

    Returns
    -------
    list of dict
        One row per comparison with the fields of :data:`COLUMNS` (``space_a`` clustered by ``method_a``
        is the baseline, ``space_b`` clustered by ``method`` the other side: a positive ``mean_diff`` or
        ``effect`` means the other side scores higher).

    Raises
    ------
    ConfigError
        If a named filter (``metrics``, ``baseline``, ``group``, ``method``) or pair leaves nothing to
        compare; the message names what there is.
    """
    wanted = None if metrics is None else set(metrics)
    targets = store.relevance_targets() if target is None else [target]
    rows = []
    seen = {"labels": {}, "spaces": {}, "groups": {}, "methods": {}}
    for name in targets:
        values = {}
        for (label, cluster_method), by_space in _values(store, name).items():
            seen["labels"][label] = None
            if wanted is not None and label not in wanted:
                continue
            seen["methods"][cluster_method] = None
            if method is not None and cluster_method != method:
                continue
            seen["spaces"].update(dict.fromkeys(by_space))
            values[label, cluster_method] = by_space
        neuron_groups = summary.groups(store, name, polysemantic_by)
        seen["groups"].update(dict.fromkeys(g for g, _ in neuron_groups))
        neuron_groups = [(g, mask) for g, mask in neuron_groups if group is None or g == group]
        base = baseline if baseline is not None else store.baseline_space(name)
        # one group's comparisons together, each metric's spaces in the target's order
        for group_name, mask in neuron_groups:
            for (label, cluster_method), by_space in values.items():
                # the baseline's values: the same method's, or in a leaderboard the baseline method's
                method_a = baseline_method or cluster_method
                side_a = values.get((label, method_a), {})
                chosen = [tuple(p) for p in pairs] if pairs is not None else [(base, s) for s in by_space]
                for space_a, space_b in chosen:
                    if space_a not in side_a or space_b not in by_space or (space_a, method_a) == (space_b,
                                                                                                    cluster_method):
                        continue
                    result = stats.paired(side_a[space_a][mask], by_space[space_b][mask], n_resamples=n_resamples,
                                          confidence=confidence, seed=seed)
                    rows.append({"target": name, "group": group_name, "metric": label, "method": cluster_method,
                                 "space_a": space_a, "space_b": space_b, "method_a": method_a, **result.as_dict()})
    if not rows:
        _explain_nothing(metrics, baseline, pairs, group, method, seen)
        return []
    return [{key: row[key] for key in COLUMNS} for row in stats.holm_rows(rows)]


def _explain_nothing(metrics, baseline, pairs, group, method, seen: dict[str, dict]) -> None:
    """Raise ConfigError naming the filter that left nothing to compare, if one was named."""
    def listed(found: dict) -> str:
        return ", ".join(repr(x) for x in found) or "none"

    what = ", ".join(metrics) if metrics else None
    for metric in metrics or []:
        if metric not in seen["labels"]:
            raise ConfigError(f"no metric {metric!r} in the store; metrics: {listed(seen['labels'])}")
    if method is not None and method not in seen["methods"]:
        raise ConfigError(f"no cluster method {method!r} for {what or 'any metric'}; methods: "
                          f"{listed(seen['methods'])}")
    if group is not None and group not in seen["groups"]:
        raise ConfigError(f"no group of neurons {group!r}; groups: {listed(seen['groups'])}")
    if pairs is not None:
        raise ConfigError(f"no {what or 'metric'} in both spaces of any pair {[list(p) for p in pairs]}; spaces: "
                          f"{listed(seen['spaces'])}")
    if baseline is not None:
        raise ConfigError(f"baseline {baseline!r}: no {what or 'metric'} there to compare with; spaces: "
                          f"{listed(seen['spaces'])}")
    if metrics is not None or group is not None or method is not None:
        raise ConfigError(f"no {what or 'metric'} in the last attribution layer of any target (the default "
                          f"baseline); name a baseline, one of: {listed(seen['spaces'])}")


def from_config(store, config) -> list[dict]:
    """The comparisons a run's config asks for (its ``compare`` section), names checked first.

    Parameters
    ----------
    store : Store
    config : Config

    Returns
    -------
    list of dict
        As :func:`compare`; empty where the store has nothing to compare and the section names nothing.
    """
    section = config.compare
    pairs = [tuple(p) for p in section.pairs] if section.pairs is not None else None
    check(store, section.metrics, section.baseline, pairs, section.baseline_method)
    try:
        return compare(store, metrics=section.metrics, baseline=section.baseline, pairs=pairs,
                       polysemantic_by=config.evaluate.polysemantic_by, n_resamples=section.n_resamples,
                       confidence=section.confidence, seed=config.seed, baseline_method=section.baseline_method)
    except ConfigError as exc:
        raise ConfigError(f"compare: {exc}") from None


def write(store, rows: list[dict], attrs: dict) -> None:
    """Replace the stored comparisons by ``rows``, one table per target, each with ``attrs``."""
    store.drop_comparisons()
    for target in dict.fromkeys(r["target"] for r in rows):
        chosen = [r for r in rows if r["target"] == target]
        store.write_comparisons(target, np.array([tuple(r[c] for c in COLUMNS) for r in chosen], dtype=_DTYPE),
                                attrs=attrs)
    store.flush()


def read(store) -> tuple[list[dict], dict]:
    """The stored comparisons of every target (in store order) and the settings they were made with."""
    rows, attrs = [], {}
    for target in store.relevance_targets():
        stored = store.comparisons(target)
        if stored is None:
            continue
        table, attrs = stored
        for row in table:
            rows.append({c: (row[c].decode() if isinstance(row[c], bytes) else row[c].item()) for c in COLUMNS})
    return rows, attrs


def save_beside(store_path: Path, rows: list[dict]) -> Path:
    """Write ``<store>.comparisons.csv`` next to the store (NaN as ``NaN``)."""
    path = Path(store_path).with_suffix(".comparisons.csv")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("NaN" if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
                         for r in rows)
    return path


def format_p(value: float) -> str:
    """A p-value as printed: three decimals, ``<0.001`` below that, ``n/a`` where there is none."""
    if not np.isfinite(value):
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _diff(row: dict) -> str:
    if not np.isfinite(row["mean_diff"]):
        return "n/a"
    interval = (f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" if np.isfinite(row["ci_low"]) else " [n/a]")
    return f"{row['mean_diff']:+.3f}{interval}"


#: Comparison lines ``polypure run`` prints under the summary: a screenful; the CSV beside the store has all.
SCREENFUL = 24


def headline(rows: list[dict]) -> list[str]:
    r"""What a run found, one line per group of neurons and cluster method: the space that splits best.

    Each group is judged by its own known truth: planted neurons by ``ARI planted``, a group polysemantic by
    a label by the ARI against that label (``block_3 [polysemantic by shape]``: ``ARI shape``); a plain group
    is left out where the run has such a polysemantic group of its target, else judged by its first ARI. The
    line names the space with the highest mean over its neurons (the baseline included) and, where it is not
    the baseline, its difference from the baseline with the interval and Holm's p; where the baseline is
    best, the runner-up's.

    Examples
    --------
    >>> rows = [{"target": "c3", "group": "c3", "metric": "ARI class", "method": "kmeans", "space_a": "c2",
    ...          "space_b": s, "n": 8, "mean_a": 0.5, "mean_b": m, "mean_diff": m - 0.5, "ci_low": m - 0.6,
    ...          "ci_high": m - 0.4, "p_holm": 0.02} for s, m in [("c1", 0.75), ("activation", 0.25)]]
    >>> print("\n".join(headline(rows)))
    c3, ARI class (kmeans): c1 splits best (0.750), +0.250 [+0.150, +0.350] over c2, p_holm 0.020
    """
    ari = [r for r in rows if r["metric"].startswith("ARI ") and np.isfinite(r.get("mean_b", np.nan))]
    polysemantic = {r["target"] for r in ari if "[polysemantic by " in r["group"]}
    out = []
    for target, group, method in dict.fromkeys((r["target"], r["group"], r["method"]) for r in ari):
        metrics = list(dict.fromkeys(r["metric"] for r in ari if (r["target"], r["group"]) == (target, group)))
        if planted_layer(target) is not None:
            wanted = "ARI planted"
        elif "[polysemantic by " in group:
            wanted = "ARI " + group.rsplit("[polysemantic by ", 1)[1].rstrip("]")
        elif target in polysemantic:
            continue
        else:
            wanted = metrics[0]
        lines = [r for r in ari if (r["target"], r["group"], r["method"], r["metric"]) == (target, group, method, wanted)]
        if not lines:
            continue
        best = max(lines, key=lambda r: r["mean_b"])
        base = lines[0]["space_a"]
        where = f"{group}, {wanted} ({method})"
        if best["mean_b"] > base_mean(lines):
            out.append(f"{where}: {best['space_b']} splits best ({best['mean_b']:.3f}), {_diff(best)} over {base}, "
                       f"p_holm {format_p(best['p_holm'])}")
        else:
            out.append(f"{where}: the baseline {base} splits best ({base_mean(lines):.3f}); next {best['space_b']} "
                       f"{_diff(best)}, p_holm {format_p(best['p_holm'])}")
    return out


def base_mean(lines: list[dict]) -> float:
    """The baseline's mean over the neurons of the comparison that has the most of them."""
    return float(max(lines, key=lambda r: r["n"])["mean_a"])


def format_table(rows: list[dict], confidence: float = 0.95, top: int | None = None) -> str:
    """The comparisons as aligned text, one line each: group, metric, method, spaces, n, difference, p, effect.

    ``top`` shows the first that many lines and says how many are left out.

    Examples
    --------
    >>> row = {"target": "c3", "group": "c3", "metric": "ARI class", "method": "kmeans", "space_a": "c2",
    ...        "space_b": "c1", "n": 8, "mean_diff": 0.25, "ci_low": 0.1, "ci_high": 0.4, "p_holm": 0.0078,
    ...        "effect": 1.0}
    >>> print(format_table([row]))
    comparisons with the baseline, paired over neurons (difference: space - baseline, 95 % bootstrap interval)
    group  metric     method  space vs baseline  n  difference [CI]          p_holm  effect
    c3     ARI class  kmeans  c1 vs c2           8  +0.250 [+0.100, +0.400]  0.008   +1.00
    """
    header = ("group", "metric", "method", "space vs baseline", "n", "difference [CI]", "p_holm", "effect")
    left = rows[top:] if top is not None else []
    rows = rows[:top] if top is not None else rows
    lines = [[r["group"], r["metric"], r["method"], f"{r['space_b']} vs {r['space_a']}", str(r["n"]), _diff(r),
              format_p(r["p_holm"]), f"{r['effect']:+.2f}" if np.isfinite(r["effect"]) else "n/a"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    title = (f"comparisons with the baseline, paired over neurons (difference: space - baseline, "
             f"{confidence:.0%} bootstrap interval)").replace("%", " %")
    text = [title] + ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                      for line in [list(header), *lines]]
    if left:
        text.append(f"... {len(left)} more lines in the comparisons CSV")
    return "\n".join(text)


def format_leaderboard(rows: list[dict], top: int | None = None, confidence: float = 0.95) -> str:
    """Comparisons made with a ``baseline_method`` as ranked tables, one per target, group and metric.

    Each (space, method) is a line, ranked by its mean over the neurons it shares with the baseline, with
    its difference from the baseline, the interval, Holm's p and the effect; the baseline is a line of its own
    (``baseline``), ranked by its mean over the neurons of its group.

    Parameters
    ----------
    rows : list of dict
        As :func:`compare` gives them with ``baseline_method``.
    top : int, optional
        Show this many lines per table (the baseline's line always), saying how many are left out.
    confidence : float
        Of the intervals, for the title.

    Examples
    --------
    >>> row = {"target": "c3", "group": "c3", "metric": "ARI class", "method": "hdbscan", "method_a": "kmeans",
    ...        "space_a": "c2", "space_b": "c1", "n": 8, "mean_a": 0.5, "mean_b": 0.75, "mean_diff": 0.25,
    ...        "ci_low": 0.1, "ci_high": 0.4, "p_holm": 0.0078, "effect": 1.0}
    >>> print(format_leaderboard([row]))
    c3: ARI class (95 % bootstrap interval of the difference from the baseline, c2 with kmeans)
    rank  space  method   mean   difference [CI]          p_holm  effect  n
    1     c1     hdbscan  0.750  +0.250 [+0.100, +0.400]  0.008   +1.00   8
    2     c2     kmeans   0.500  baseline
    """
    blocks = []
    for key in dict.fromkeys((r["target"], r["group"], r["metric"]) for r in rows):
        chosen = [r for r in rows if (r["target"], r["group"], r["metric"]) == key]
        first = chosen[0]
        # the baseline's own mean: the largest n of its comparisons is the closest to its whole group
        widest = max(chosen, key=lambda r: r["n"])
        lines = [(r["mean_b"], [r["space_b"], r["method"], _number(r["mean_b"]), _diff(r), format_p(r["p_holm"]),
                                f"{r['effect']:+.2f}" if np.isfinite(r["effect"]) else "n/a", str(r["n"])])
                 for r in chosen]
        lines.append((widest["mean_a"], [first["space_a"], first["method_a"], _number(widest["mean_a"]), "baseline",
                                         "", "", ""]))
        lines.sort(key=lambda item: -item[0] if np.isfinite(item[0]) else np.inf)
        ranked = [[str(i + 1), *cells] for i, (_, cells) in enumerate(lines)]
        shown = ranked if top is None else [r for i, r in enumerate(ranked) if i < top or r[4] == "baseline"]
        header = ["rank", "space", "method", "mean", "difference [CI]", "p_holm", "effect", "n"]
        widths = [max(len(h), *(len(line[i]) for line in shown)) for i, h in enumerate(header)]
        title = (f"{key[1]}: {key[2]} ({confidence:.0%} bootstrap interval of the difference from the baseline, "
                 f"{first['space_a']} with {first['method_a']})").replace("%", " %")
        text = [title] + ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                          for line in [header, *shown]]
        if len(shown) < len(ranked):
            text.append(f"... {len(ranked) - len(shown)} more lines in the comparisons CSV")
        blocks.append("\n".join(text))
    return "\n\n".join(blocks)


def _number(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "n/a"
