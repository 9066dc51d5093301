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
* ``/metrics/<target>/degenerate/<space>`` (M,) UTF-8, ``/metrics/<target>/cluster_status/<space>/<method id>``
  (M,) UTF-8, ``/metrics/<target>/single_label/<labels>`` and ``unique_labels/<labels>`` (M,) bool: the checks of
  :mod:`polypure.evaluation.metrics` (``constant``, ``one-hot``; ``all-noise``, ``one-cluster``; one label value)
  that make a neuron's score a non-result. Such a score is stored as NaN, never as a number, and the
  summary counts the neurons left out per reason;
* ``/metrics/<target>/clarity/<reference>``, ``.../polysemanticity/<reference>`` and
  ``.../monosemanticity_topk/<reference>`` (M,) float64: purity of each neuron's references in a reference
  space (:mod:`polypure.evaluation.purity`; polysemanticity by k-means, k = 2, seeded with ``seed``). Monosemanticity
  (Pach et al. 2025) is restricted to the neuron's top-K references, weighted by their stored top-K
  statistic (``/topk/<target>/values``), min-max normalised per neuron. NaN where the reference space is
  degenerate for the neuron;
* ``/metrics/<target>/split_gain/<reference>/<space>/<method id>`` (M,) float64: how much purer (clarity in
  the reference space) a clustering's clusters are than the neuron's references unsplit; NaN as for the
  cluster distances;
* ``/metrics/<target>/nearest_similarity/<reference>`` (M,) float64, each neuron's largest cosine
  similarity of its mean reference embedding with another neuron's, and ``/metrics/<target>/redundancy/
  <reference>`` (scalar float64), their mean over the target: the target layer's redundancy;
* ``/metrics/summary``: the summary table (also saved beside the store as CSV and JSON);
* ``/comparisons/<target>``: the comparisons the ``compare`` section asks for (:mod:`polypure.evaluation.comparisons`),
  a table with the fields of :data:`polypure.evaluation.comparisons.COLUMNS` (``p_holm`` Holm-adjusted over every row
  of the run, all targets together) and the attributes ``seed``, ``n_resamples``, ``confidence``,
  ``baseline`` (``""``: each target's :meth:`~polypure.store.hdf5_store.Store.baseline_space`) and ``holm``; also
  printed after the summary table and saved beside the store as ``<store>.comparisons.csv``.

A metric of the summary is named ``<kind> <reference or label set>`` (:data:`polypure.evaluation.summary.KINDS`):
``corr clip``, ``gain clip``, ``clarity clip``, ``polysem clip``, ``mono-topK clip``, ``redundancy clip``,
``ARI shape``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from polypure.errors import ConfigError

if TYPE_CHECKING:
    from polypure.pipeline.context import StageContext

NAME = "evaluate"
WRITES = True
HELP = "compute per-neuron metrics and the summary table from the store"


def wanted_labels(ctx: StageContext, store) -> list[str]:
    """The label sets to score against: ``evaluate.ground_truth``, or every one the store knows."""
    setting = ctx.config.evaluate.ground_truth
    available = store.label_sets()
    if setting == "auto":
        return available
    unknown = [name for name in setting if name not in available]
    if unknown:
        raise ConfigError(f"evaluate.ground_truth: {unknown[0]!r} is not known for this data (known: "
                          f"{', '.join(available)})")
    return list(setting)


def _strings(values) -> np.ndarray:
    """A str array as h5py writes it: variable-length UTF-8."""
    from polypure.store.schema import STR
    return np.array([str(v) for v in values], dtype=STR)


def checks(ctx: StageContext, store) -> None:
    """Store why a neuron's space or clustering cannot give a score (:mod:`polypure.evaluation.metrics`, *Non-results*).

    ``/metrics/<target>/degenerate/<space>`` for every clustered space, configured space and reference
    space of each target, and ``/metrics/<target>/cluster_status/<space>/<method id>`` for every stored
    clustering.
    """
    from polypure.evaluation.metrics import clustering_status, degenerate

    configured = store.target_spaces(ctx.config.cluster.spaces)
    for target in store.relevance_targets():
        clustered = store.clusterings(target)
        references = [r for r in ctx.config.evaluate.references if store.has_embeddings(r, target)]
        relevance = set(store.relevance_spaces(target))
        for space in dict.fromkeys([*configured.get(target, []), *(s for s, _ in clustered), *references]):
            status = degenerate(store.features(target, space), normalised=space in relevance)
            store.write_metric(target, "degenerate", [space], _strings(status))
        for space, method_id in clustered:
            store.write_metric(target, "cluster_status", [space, method_id],
                               _strings(clustering_status(store.cluster_labels(target, space, method_id))))
    store.flush()


def ground_truth_metrics(ctx: StageContext, store) -> None:
    """ARI / NMI of every stored clustering against every wanted label set, and mixtures.

    A neuron gets NaN, not a score, where :func:`checks` found its space degenerate or its clustering no
    split, or where its references all carry the same label value (``/metrics/<target>/single_label``) or
    each a value of its own (``/metrics/<target>/unique_labels``).
    """
    from polypure.evaluation import summary
    from polypure.evaluation.metrics import agreement, mixture, single_label, unique_labels

    wanted = wanted_labels(ctx, store)
    share = ctx.config.evaluate.mixture_share
    for target in store.relevance_targets():
        labels = {k: v for k, v in store.known_labels(target).items() if k in wanted}
        topk_labels = {k: v for k, v in store.known_labels(target, full_topk=True).items() if k in wanted}
        for name, values in topk_labels.items():
            store.write_metric(target, "mixture", [name], np.array([mixture(row, share) for row in values], np.int64),
                               attrs={"share": share})
        for name, values in labels.items():
            store.write_metric(target, "single_label", [name], single_label(values))
            store.write_metric(target, "unique_labels", [name], unique_labels(values))
        for space, method_id in store.clusterings(target):
            predicted = store.cluster_labels(target, space, method_id)
            for name, truth in labels.items():
                skip = summary.skipped(store, target, space=space, method=method_id, labels=name)
                scores = np.array([agreement(t, p) if not s else (np.nan, np.nan)
                                   for t, p, s in zip(truth, predicted, skip)], np.float64).reshape(-1, 2)
                for column, metric in enumerate(("ari", "nmi")):
                    store.write_metric(target, metric, [name, space, method_id], scores[:, column])
    store.flush()


def reference_metrics(ctx: StageContext, store) -> None:
    """Distance correlation and PURE's cluster distances against every reference space.

    NaN, not a score, where :func:`checks` found the space or the reference space degenerate for a neuron,
    or (cluster distances) its clustering no split.
    """
    from polypure.evaluation import summary
    from polypure.evaluation.metrics import cluster_distances, distance_correlation

    references = list(ctx.config.evaluate.references)
    for target, cluster_spaces in store.target_spaces(ctx.config.cluster.spaces).items():
        available = [r for r in references if store.has_embeddings(r, target)]
        missing = [r for r in references if r not in available]
        if missing:
            raise ConfigError(f"evaluate.references: no {missing[0]!r} embeddings of target {target!r} in the store; "
                              "run the embed stage first")
        spaces = list(dict.fromkeys([*cluster_spaces, *available]))
        features = {space: store.features(target, space) for space in spaces}
        for reference in available:
            ref = store.embeddings(reference, target)
            for space in spaces:
                if space == reference:
                    continue
                skip = summary.skipped(store, target, space=space, reference=reference)
                values = np.array([distance_correlation(r, f) if not s else np.nan
                                   for r, f, s in zip(ref, features[space], skip)], np.float64)
                store.write_metric(target, "distance_correlation", [reference, space], values)
            for space, method_id in store.clusterings(target):
                labels = store.cluster_labels(target, space, method_id)
                skip = summary.skipped(store, target, space=space, method=method_id, reference=reference)
                values = np.array([cluster_distances(r, lab) if not s else (np.nan, np.nan)
                                   for r, lab, s in zip(ref, labels, skip)], np.float64).reshape(-1, 2)
                store.write_metric(target, "cluster_distances", [reference, space, method_id], values,
                                   attrs={"columns": ["inner", "inter"]})
    store.flush()


def purity_metrics(ctx: StageContext, store) -> None:
    """Purity of every neuron in every reference space (:mod:`polypure.evaluation.purity`), split gain of every clustering.

    Per reference space with embeddings of a target: clarity, polysemanticity (k-means, k = 2, seeded with
    ``seed``), monosemanticity over the neuron's top-K references (weighted by the top-K statistic of each
    reference), the largest similarity with another neuron and the target's redundancy; per clustering,
    the split gain. NaN, not a score, where :func:`checks` found the reference space degenerate for a
    neuron, or (split gain) the clustering's space degenerate or its clustering no split.
    """
    from polypure.evaluation import purity, summary

    seed = ctx.config.seed
    for target in store.relevance_targets():
        references = [r for r in ctx.config.evaluate.references if store.has_embeddings(r, target)]
        if not references:
            continue
        # the statistic that ranked each reference into the neuron's top-K: Pach et al.'s activation
        activations = store.read_topk(target)[0][store.neurons(target), :store.n_refs(target)]
        for reference in references:
            embeddings = store.embeddings(reference, target)
            skip = summary.skipped(store, target, space=reference)
            polysemanticity = np.full(len(skip), np.nan)
            # one k-means per neuron: none for the neurons that get no score anyway
            polysemanticity[~skip] = purity.polysemanticity_batch(embeddings[~skip], seed=seed)
            for kind, values in (("clarity", purity.clarity_batch(embeddings)), ("polysemanticity", polysemanticity),
                                 ("monosemanticity_topk", purity.monosemanticity_topk_batch(embeddings, activations))):
                store.write_metric(target, kind, [reference], np.where(skip, np.nan, values))
            store.write_metric(target, "nearest_similarity", [reference], purity.nearest_similarity(embeddings))
            store.write_metric(target, "redundancy", [reference], np.float64(purity.redundancy(embeddings)))
            for space, method_id in store.clusterings(target):
                skip = summary.skipped(store, target, space=space, method=method_id, reference=reference)
                gain = purity.split_gain_batch(embeddings, store.cluster_labels(target, space, method_id))
                store.write_metric(target, "split_gain", [reference, space, method_id], np.where(skip, np.nan, gain))
    store.flush()


def run(ctx: StageContext) -> list[dict]:
    """Compute every metric the store allows, the summary table and the comparisons (printed and saved).

    Returns
    -------
    list of dict
        The summary records.
    """
    from polypure.evaluation import comparisons, summary

    with ctx.open_store() as store:
        checks(ctx, store)
        reference_metrics(ctx, store)
        purity_metrics(ctx, store)
        ground_truth_metrics(ctx, store)
        order = [*ctx.config.evaluate.references, *wanted_labels(ctx, store)]
        records = summary.build(store, polysemantic_by=ctx.config.evaluate.polysemantic_by, order=order)
        summary.write(store, records)
        compared = comparisons.from_config(store, ctx.config)
        section = ctx.config.compare
        comparisons.write(store, compared, attrs={"seed": ctx.config.seed, "n_resamples": section.n_resamples,
                                                  "confidence": section.confidence,
                                                  "baseline": section.baseline or "",
                                                  "baseline_method": section.baseline_method or "",
                                                  "holm": "whole run"})
    paths = [*summary.save_beside(ctx.config.store_path, records),
             comparisons.save_beside(ctx.config.store_path, compared)]
    if ctx.progress and section.baseline_method is not None:
        # a leaderboard replaces the summary on screen: with every rule, layer and clusterer the summary runs
        # to hundreds of lines, and it is saved beside the store all the same
        print(comparisons.format_leaderboard(compared, section.top, section.confidence))
    elif ctx.progress:
        print(summary.format_table(records, [m.method_id for m in ctx.config.cluster.methods]))
        if compared:
            # a screenful of them: a run with many groups and label sets has hundreds, all in the CSV
            print("\n" + comparisons.format_table(compared, section.confidence, section.top or comparisons.SCREENFUL))
    if ctx.progress and compared:
        found = comparisons.headline(compared)
        if found:
            print("\nwhat was found (ARI against known labels, space - baseline, "
                  f"{section.confidence:.0%} interval, Holm over the run):".replace("%", " %"))
            print("\n".join(f"  {line}" for line in found))
    ctx.log(f"summary: {paths[0]} and {paths[1]}; comparisons: {paths[2]}")
    return records
