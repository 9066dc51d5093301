"""The evaluate stage: per-neuron metrics from the store, written back to it, and the summary table.

Everything here reads stored results (clusters, relevance, embeddings, factors, planted truth) and
writes ``/metrics``:

* ``/metrics/<target>/distance_correlation/<reference>/<space>`` (M,) float64: the seed paper's
  correlation between the reference space's distances (CLIP) and a space's (a layer's relevance, the
  activations, another reference such as DINOv2);
* ``/metrics/<target>/cluster_distances/<reference>/<space>/<method id>`` (M, 2) float64: PURE's mean
  reference-space distance within (inner) and between (inter) the clusters found in a space;
* ``/metrics/<target>/ari/<labels>/<space>/<method id>`` and ``.../nmi/...`` (M,) float64: agreement of
  each neuron's clustering with known labels of its references (``planted`` truth, a generative factor
  such as ``shape``, or the ``class`` label);
* ``/metrics/<target>/mixture/<labels>`` (M,) int64: how many label values each make up at least
  ``evaluate.mixture_share`` of the neuron's top-K (2 or more: polysemantic by that label);
* ``/metrics/summary``: the summary table (also saved beside the store as CSV and JSON).

Example
-------
>>> from polypure import Experiment           # doctest: +SKIP
>>> Experiment("demo").evaluate()             # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from . import summary
from .errors import ConfigError
from .metrics import agreement, cluster_distances, distance_correlation, mixture

PLANTED = "planted"
CLASS = "class"


def reference_indices(store, target: str) -> np.ndarray:
    """Sample index of every reference of every stored neuron of a target: (M, n_refs)."""
    group = store.file[f"relevance/{target}"]
    n_refs = group["activation"].shape[1]
    return store.read(f"topk/{target}/indices")[group["neurons"][()], :n_refs]


def known_labels(store, target: str, full_topk: bool = False) -> dict[str, np.ndarray]:
    """Every label set known for a target's references, each (M, n_refs) (or (M, K) with ``full_topk``)."""
    group = store.file[f"relevance/{target}"]
    neurons = group["neurons"][()]
    indices = store.read(f"topk/{target}/indices")[neurons]
    refs = indices if full_topk else indices[:, :group["activation"].shape[1]]
    out = {}
    if target.endswith("@planted"):
        layer = target.rsplit("@", 1)[0]
        truth = store.read(f"topk/{target}/truth")[neurons] if full_topk else store.read(f"planted/{layer}/truth")
        out[PLANTED] = truth[:, :refs.shape[1]]
    for name, (codes, _) in store.factors().items():
        out[name] = codes[refs]
    labels = store.labels()
    if (labels >= 0).any():
        out[CLASS] = labels[refs]
    return out


def wanted_labels(ctx, store) -> list[str]:
    """The label sets to score against: ``evaluate.ground_truth``, or every one the store knows."""
    setting = ctx.config.evaluate.ground_truth
    available = [PLANTED, *store.factors().keys()] + ([CLASS] if (store.labels() >= 0).any() else [])
    if setting == "auto":
        return available
    unknown = [name for name in setting if name not in available]
    if unknown:
        raise ConfigError(f"evaluate.ground_truth: {unknown[0]!r} is not known for this data (known: "
                          f"{', '.join(available)})")
    return list(setting)


def ground_truth_metrics(ctx, store) -> None:
    """ARI / NMI of every stored clustering against every wanted label set, and mixtures."""
    wanted = wanted_labels(ctx, store)
    share = ctx.config.evaluate.mixture_share
    for target in store.relevance_targets():
        labels = {k: v for k, v in known_labels(store, target).items() if k in wanted}
        topk_labels = {k: v for k, v in known_labels(store, target, full_topk=True).items() if k in wanted}
        for name, values in topk_labels.items():
            store.write_array(f"metrics/{target}/mixture/{name}",
                              np.array([mixture(row, share) for row in values], np.int64),
                              attrs={"share": share})
        if f"clusters/{target}" not in store:
            continue
        for space, methods in store.file[f"clusters/{target}"].items():
            for method_id, dataset in methods.items():
                predicted = dataset[()]
                for name, truth in labels.items():
                    scores = np.array([agreement(t, p) for t, p in zip(truth, predicted)], np.float64)
                    for column, metric in enumerate(("ari", "nmi")):
                        store.write_array(f"metrics/{target}/{metric}/{name}/{space}/{method_id}",
                                          scores[:, column])
    store.flush()


def reference_metrics(ctx, store) -> None:
    """Distance correlation and PURE's cluster distances against every reference space."""
    from .clustering import space_path, target_spaces

    references = list(ctx.config.evaluate.references)
    for target, cluster_spaces in target_spaces(store, ctx.config.cluster.spaces).items():
        available = [r for r in references if f"embeddings/{r}/{target}" in store]
        missing = [r for r in references if r not in available]
        if missing:
            raise ConfigError(f"evaluate.references: no {missing[0]!r} embeddings of target {target!r} in the store; "
                              "run the embed stage first")
        spaces = list(dict.fromkeys([*cluster_spaces, *available]))
        features = {space: store.read(space_path(target, space, store)) for space in spaces}
        for reference in available:
            ref = store.read(f"embeddings/{reference}/{target}")
            for space in spaces:
                if space == reference:
                    continue
                values = np.array([distance_correlation(r, f) for r, f in zip(ref, features[space])])
                store.write_array(f"metrics/{target}/distance_correlation/{reference}/{space}", values)
            if f"clusters/{target}" not in store:
                continue
            for space, methods in store.file[f"clusters/{target}"].items():
                for method_id, dataset in methods.items():
                    labels = dataset[()]
                    values = np.array([cluster_distances(r, lab) for r, lab in zip(ref, labels)], np.float64)
                    store.write_array(f"metrics/{target}/cluster_distances/{reference}/{space}/{method_id}", values,
                                      attrs={"columns": ["inner", "inter"]})
    store.flush()


def run_stage(ctx) -> list[dict]:
    """Compute every metric the store allows, then the summary table (printed and saved).

    Returns
    -------
    list of dict
        The summary records.
    """
    with ctx.open_store() as store:
        reference_metrics(ctx, store)
        ground_truth_metrics(ctx, store)
        order = [*ctx.config.evaluate.references, *wanted_labels(ctx, store)]
        records = summary.build(store, polysemantic_by=ctx.config.evaluate.polysemantic_by, order=order)
        summary.write(store, records)
    paths = summary.save_beside(ctx.config.store_path, records)
    if ctx.progress:
        print(summary.format_table(records, _primary_method(ctx)))
    ctx.log(f"summary: {paths[0]} and {paths[1]}")
    return records


def _primary_method(ctx) -> str | None:
    methods = ctx.config.cluster.methods
    return methods[0].method_id if methods else None

