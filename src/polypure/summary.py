"""The summary table: per-neuron metrics of the store, averaged over groups of neurons, per space.

Rows are (target group, space); a group is a target's neurons, its neurons that are polysemantic by
a label (``evaluate.polysemantic_by``), or, for planted targets, the virtual neurons of one mode. Every
number is computed from what the store holds under ``/metrics``, so the table of a store can be rebuilt
at any time (``polypure evaluate``) and always agrees with it.

Example
-------
>>> from polypure.summary import format_table
>>> print(format_table([{"group": "logits", "space": "block_2", "method": "kmeans", "metric": "ARI shape",
...                      "mean": 0.5, "std": 0.1, "n": 4}], "kmeans"))
logits (4 neurons), clusters: kmeans
space    ARI shape
block_2  0.500 ± 0.100
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np

from .store import STR, read_attr

FIELDS = ("target", "group", "space", "method", "metric", "mean", "std", "n")


def groups(store, target: str, polysemantic_by: str | None) -> list[tuple[str, np.ndarray]]:
    """(name, row mask) of the neuron groups of a target."""
    m = len(store.file[f"relevance/{target}/neurons"])
    if target.endswith("@planted"):
        layer = target.rsplit("@", 1)[0]
        modes = np.array(read_attr(store.read(f"planted/{layer}/modes")))
        return [(f"{target} ({mode})", modes == mode) for mode in dict.fromkeys(modes.tolist())]
    out = [(target, np.ones(m, bool))]
    path = f"metrics/{target}/mixture/{polysemantic_by}"
    if polysemantic_by and path in store:
        poly = store.read(path) >= 2
        if poly.any():
            out.append((f"{target} [polysemantic by {polysemantic_by}]", poly))
    return out


def _space_order(store, target: str) -> dict[str, int]:
    layers = read_attr(store.file[f"relevance/{target}"].attrs.get("attribution_layers", []))
    return {name: i for i, name in enumerate([*layers, "activation"])}


def _metric_arrays(store, target: str):
    """(metric label, space, method, values) for every per-neuron metric of a target."""
    root = f"metrics/{target}"
    if root not in store:
        return
    found = []
    store.file[root].visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    for name, dataset in found:
        parts = name.split("/")
        kind = parts[0]
        if kind in ("ari", "nmi") and len(parts) == 4:
            _, of, space, method = parts
            yield f"{kind.upper()} {of}", space, method, dataset[()]
        elif kind == "distance_correlation" and len(parts) == 3:
            _, reference, space = parts
            yield f"corr {reference}", space, "", dataset[()]
        elif kind == "cluster_distances" and len(parts) == 4:
            _, reference, space, method = parts
            values = dataset[()]
            yield f"inner {reference}", space, method, values[:, 0]
            yield f"inter {reference}", space, method, values[:, 1]


_KIND_RANK = {"corr": 0, "inner": 1, "inter": 2, "ARI": 3, "NMI": 4}


def _metric_key(label: str, names: list[str]):
    """Reference metrics first, then ground truth; per reference or label set, in the given order."""
    kind, _, name = label.partition(" ")
    section = 0 if kind in ("corr", "inner", "inter") else 1
    return section, names.index(name) if name in names else len(names), name, _KIND_RANK.get(kind, 9)


def build(store, polysemantic_by: str | None = None, order: list[str] | None = None) -> list[dict]:
    """Summary records (mean, std and count of non-NaN values) for every group, space, method and metric.

    Parameters
    ----------
    store : Store
    polysemantic_by : str, optional
        A label set with a stored mixture; its polysemantic neurons form a group of their own.
    order : list of str, optional
        References and label sets in the order their columns should appear.
    """
    records = []
    names = list(order or [])
    for target in store.relevance_targets():
        spaces = _space_order(store, target)
        metrics = sorted(_metric_arrays(store, target),
                         key=lambda r: (_metric_key(r[0], names), spaces.get(r[1], len(spaces)), r[1], r[2]))
        for group, mask in groups(store, target, polysemantic_by):
            for label, space, method, values in metrics:
                chosen = np.asarray(values, np.float64)[mask]
                finite = chosen[np.isfinite(chosen)]
                records.append({"target": target, "group": group, "space": space, "method": method,
                                "metric": label, "mean": float(finite.mean()) if finite.size else float("nan"),
                                "std": float(finite.std()) if finite.size else float("nan"), "n": int(finite.size)})
    return records


def write(store, records: list[dict]) -> None:
    """Store the records as ``/metrics/summary`` (a table with the fields of :data:`FIELDS`)."""
    dtype = np.dtype([("target", STR), ("group", STR), ("space", STR), ("method", STR), ("metric", STR),
                      ("mean", np.float64), ("std", np.float64), ("n", np.int64)])
    table = np.array([tuple(r[f] for f in FIELDS) for r in records], dtype=dtype)
    store.write_array("metrics/summary", table)
    store.flush()


def read(store) -> list[dict]:
    """The records of ``/metrics/summary``."""
    if "metrics/summary" not in store:
        return []
    rows = store.read("metrics/summary")
    return [{f: (row[f].decode() if isinstance(row[f], bytes) else row[f].item() if hasattr(row[f], "item")
                 else row[f]) for f in FIELDS} for row in rows]


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


def format_table(records: list[dict], method: str | None = None) -> str:
    """The table as text: one block per group, one row per space, one column per metric.

    Cluster-based metrics are shown for ``method`` (all methods are in the CSV / JSON).
    """
    blocks = []
    group_order = list(dict.fromkeys(r["group"] for r in records))
    for group in group_order:
        selected = [r for r in records if r["group"] == group and r["method"] in ("", method)]
        # reference-space metrics and ground-truth scores as two tables, so neither grows too wide
        for part in (("corr", "inner", "inter"), ("ARI", "NMI")):
            rows = [r for r in selected if r["metric"].split(" ", 1)[0] in part]
            if rows:
                blocks.append(_block(group, rows, method))
    return "\n\n".join(blocks)


def _block(group: str, rows: list[dict], method: str | None) -> str:
    """One group's table: a row per space, a column per metric."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    spaces = list(dict.fromkeys(r["space"] for r in rows))
    cells = {(r["space"], r["metric"]): r for r in rows}
    n = max(r["n"] for r in rows)
    header = f"{group} ({n} neuron{'s' if n != 1 else ''})" + (f", clusters: {method}" if method else "")
    text = {key: "" if not np.isfinite(r["mean"]) else f"{r['mean']:.3f} ± {r['std']:.3f}"
            for key, r in cells.items()}
    widths = [max(len(m), *(len(text.get((sp, m), "")) for sp in spaces)) + 2 for m in metrics]
    first = max(7, *(len(sp) for sp in spaces)) + 2
    lines = [header, f"{'space':<{first}}" + "".join(f"{m:<{w}}" for m, w in zip(metrics, widths)).rstrip()]
    for space in spaces:
        line = f"{space:<{first}}" + "".join(f"{text.get((space, m), ''):<{w}}" for m, w in zip(metrics, widths))
        lines.append(line.rstrip())
    return "\n".join(lines)
