"""The cluster stage: split each neuron's references into groups, per feature space, with every clusterer.

Spaces are a target's attribution layers and ``activation`` (or ``cluster.spaces``, which may also name
evaluator embeddings); clusterers are the config's ``cluster.methods`` (:mod:`polypure.clustering`) or
estimators passed from Python. Results go to ``/clusters/<target>/<space>/<method id>``; a clustering
already stored with the same method, parameters and seed is kept.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PolypureError

if TYPE_CHECKING:
    from .context import StageContext

NAME = "cluster"
WRITES = True
HELP = "cluster each neuron's references in every space"


def _methods(ctx, methods) -> list[tuple[str, str, dict, Any]]:
    """(id, name, params, estimator) for the config's methods or estimators passed from Python."""
    from ..clustering import make_clusterer

    if methods is None:
        return [(m.method_id, m.name, m.params, make_clusterer(m.name, m.params, ctx.config.seed))
                for m in ctx.config.cluster.methods]
    out = []
    for method_id, est in methods.items():
        if not callable(getattr(est, "fit_predict", None)):
            raise ConfigError(f"clusterer {method_id!r}: {type(est).__name__} has no fit_predict(X)")
        params = est.get_params() if hasattr(est, "get_params") else {}
        out.append((method_id, type(est).__name__, params, est))
    return out


def run(ctx: StageContext, methods: dict[str, Any] | None = None) -> None:
    """Cluster every complete relevance target in every space with every method.

    Parameters
    ----------
    ctx : Experiment
    methods : dict of str to estimator, optional
        Estimators by method id, used instead of ``config.cluster.methods`` (for objects built in Python).
    """
    from tqdm.auto import tqdm

    from ..clustering import cluster_rows

    chosen = _methods(ctx, methods)
    with ctx.open_store() as store:
        for target, spaces in store.target_spaces(ctx.config.cluster.spaces).items():
            complete = store.complete(target)
            if not complete.all():
                raise PolypureError(f"relevance of target {target!r} is incomplete ({int((~complete).sum())} "
                                    "neurons left); run the relevance stage first")
            jobs = [(space, mid, name, params, est) for space in spaces for mid, name, params, est in chosen]
            bar = tqdm(jobs, desc=f"cluster {target}", disable=not ctx.progress, leave=False)
            done = []
            notes: dict[str, dict] = {}
            for space, method_id, name, params, estimator in bar:
                signature = json.dumps({"name": name, "params": params, "seed": ctx.config.seed}, sort_keys=True,
                                       default=str)
                if store.has_clusters(target, space, method_id, signature):
                    continue
                labels = cluster_rows(store.features(target, space), estimator, notes.setdefault(method_id, {}))
                store.write_clusters(target, space, method_id, labels, attrs={
                    "method": name, "params": json.dumps(params, default=str), "signature": signature})
                store.flush()
                done.append((space, method_id))
            ctx.log(f"cluster {target}: {len(done)} new clustering(s) over {len(spaces)} space(s)"
                    if done else f"cluster {target}: up to date, skipped")
            # a clusterer's warnings once per target and kind, with how often: one per neuron and space would
            # bury the run's output (spectral clustering's "graph is not fully connected")
            rows = len(store.neurons(target))
            for method_id, raised in notes.items():
                for (_, message), count in raised.items():
                    ctx.log(f"cluster {target}: {method_id} warned {message!r} for {count} of "
                            f"{rows * len(spaces)} (neuron, space) pairs")
