"""The cluster stage: split each neuron's references into groups, per feature space, with every clusterer.

Spaces are a target's attribution layers, ``activation`` and dictionary spaces (or ``cluster.spaces``, which
may also name evaluator embeddings); clusterers are the config's ``cluster.methods``
(:mod:`polypure.evaluation.clustering`) or estimators passed from Python. A method clusters every space, or those
its ``spaces`` names; a clusterer of dictionary spaces only (``dominant``) clusters the dictionary spaces among
them and is refused on any other. Results go to ``/clusters/<target>/<space>/<method id>``; a clustering
already stored with the same method, parameters and seed is kept.

Before anything is clustered, a method that asks for more clusters than each neuron has references is
refused (:func:`polypure.pipeline.preflight.check_cluster_counts`). A neuron whose features in a space are all zero
(dead) is not clustered there (labels -1, rows listed in the clustering's ``not_clustered`` attribute), and
a clustering that calls every reference of a neuron noise is stored as it is; each is warned about once
per target and method, with how many (neuron, space) pairs. A clusterer that raises stops the stage with
one line naming the method id, target and space; the clusterings finished before stay in the store.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from polypure.errors import ConfigError, PolypureError

if TYPE_CHECKING:
    from polypure.pipeline.context import StageContext

NAME = "cluster"
WRITES = True
HELP = "cluster each neuron's references in every space"

log = logging.getLogger("polypure")

#: The note of a clustering that labels every reference of a neuron noise (HDBSCAN can do that).
ALL_NOISE = "every reference labelled noise"


def _methods(ctx, methods) -> list[tuple[str, str, dict, Any, list[str] | None]]:
    """(id, name, params, estimator, spaces) for the config's methods or estimators passed from Python."""
    from polypure.evaluation.clustering import make_clusterer

    if methods is None:
        return [(m.method_id, m.name, m.params, make_clusterer(m.name, m.params, ctx.config.seed), m.spaces)
                for m in ctx.config.cluster.methods]
    out = []
    for method_id, est in methods.items():
        if not callable(getattr(est, "fit_predict", None)):
            raise ConfigError(f"clusterer {method_id!r}: {type(est).__name__} has no fit_predict(X)")
        params = est.get_params() if hasattr(est, "get_params") else {}
        out.append((method_id, type(est).__name__, params, est, None))
    return out


def method_spaces(method_id: str, estimator, named: list[str] | None, spaces: list[str],
                  dictionaries: list[str]) -> list[str]:
    """The spaces of a target one method clusters: ``named`` ones (all where None) among ``spaces``.

    A clusterer of dictionary spaces only (:func:`polypure.evaluation.clustering.dictionary_only`) takes the
    dictionary spaces among them.

    Raises
    ------
    ConfigError
        One line, where such a clusterer is named another space.
    """
    from polypure.evaluation.clustering import dictionary_only

    chosen = [s for s in spaces if named is None or s in named]
    if not dictionary_only(estimator):
        return chosen
    if named is not None:
        other = [s for s in named if s not in dictionaries]
        if other:
            raise ConfigError(f"cluster.methods ({method_id}): {other[0]!r} is no dictionary space; "
                              f"{type(estimator).__name__.lower()} clusters dictionary spaces only (dictionaries: "
                              f"{', '.join(dictionaries) or 'none'})")
    return [s for s in chosen if s in dictionaries]


def run(ctx: StageContext, methods: dict[str, Any] | None = None) -> None:
    """Cluster every complete relevance target in every space with every method.

    Parameters
    ----------
    ctx : Experiment
    methods : dict of str to estimator, optional
        Estimators by method id, used instead of ``config.cluster.methods`` (for objects built in Python).
    """
    from tqdm.auto import tqdm

    from polypure.evaluation.clustering import DEAD, ClustererFailed, cluster_rows, dead_rows
    from polypure.pipeline.preflight import check_cluster_counts

    # the two notes that change what the summary can score: warnings, shown with --quiet too
    told = {DEAD: "have all-zero features (dead neurons): not clustered, labelled -1, no score (counted as "
                  "'constant' in the summary)",
            ALL_NOISE: "have every reference labelled noise: stored as they are, no score (counted as 'all-noise' "
                       "in the summary)"}

    chosen = _methods(ctx, methods)
    # before the store is opened: a method that cannot work leaves it as it was (the config's n_refs is what
    # the relevance stage stores; a store that holds other counts is checked again below)
    check_cluster_counts([(mid, est) for mid, _, _, est, _ in chosen], ctx.config.relevance.n_refs)
    with ctx.open_store() as store:
        targets = store.target_spaces(ctx.config.cluster.spaces)
        for target in targets:
            check_cluster_counts([(mid, est) for mid, _, _, est, _ in chosen], store.n_refs(target))
        configured = [d.id for d in ctx.config.dictionaries]
        for target, spaces in targets.items():
            complete = store.complete(target)
            if not complete.all():
                raise PolypureError(f"relevance of target {target!r} is incomplete ({int((~complete).sum())} "
                                    "neurons left); run the relevance stage first")
            dictionaries = list(dict.fromkeys([*configured, *store.dictionary_spaces(target)]))
            jobs = [(space, mid, name, params, est) for mid, name, params, est, named in chosen
                    for space in method_spaces(mid, est, named, spaces, dictionaries)]
            # spaces first, as before: each space's features are read for its methods in turn
            jobs.sort(key=lambda job: spaces.index(job[0]))
            bar = tqdm(jobs, desc=f"cluster {target}", disable=not ctx.progress, leave=False)
            done = []
            notes: dict[str, dict] = {}
            for space, method_id, name, params, estimator in bar:
                signature = json.dumps({"name": name, "params": params, "seed": ctx.config.seed}, sort_keys=True,
                                       default=str)
                if store.has_clusters(target, space, method_id, signature):
                    continue
                features = store.features(target, space)
                raised = notes.setdefault(method_id, {})
                try:
                    labels = cluster_rows(features, estimator, raised)
                except ClustererFailed as exc:
                    # the clusterings written before are flushed; the run's session commits them on the way out
                    raise ClustererFailed(f"cluster.methods ({method_id}), target {target!r}, space {space!r}: "
                                          f"{exc}") from None
                dead = dead_rows(features)
                noise = int(((labels < 0).all(axis=1) & ~dead).sum())
                if noise:
                    raised[UserWarning, ALL_NOISE] = raised.get((UserWarning, ALL_NOISE), 0) + noise
                attrs = {"method": name, "params": json.dumps(params, default=str), "signature": signature}
                if dead.any():
                    attrs["not_clustered"] = np.flatnonzero(dead).astype(np.int64)
                store.write_clusters(target, space, method_id, labels, attrs=attrs)
                store.flush()
                done.append((space, method_id))
            ctx.log(f"cluster {target}: {len(done)} new clustering(s) over {len(spaces)} space(s)"
                    if done else f"cluster {target}: up to date, skipped")
            # a clusterer's warnings once per target and kind, with how often: one per neuron and space would
            # bury the run's output (spectral clustering's "graph is not fully connected")
            rows = len(store.neurons(target))
            for method_id, raised in notes.items():
                clustered = len({space for space, mid, *_ in jobs if mid == method_id})
                for (_, message), count in raised.items():
                    pairs = f"{count} of {rows * clustered} (neuron, space) pairs"
                    if message in told:
                        log.warning(f"cluster {target}: {method_id}: {pairs} {told[message]}")
                    else:
                        ctx.log(f"cluster {target}: {method_id} warned {message!r} for {pairs}")
