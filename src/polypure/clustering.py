"""The cluster stage: split each neuron's references into groups, per feature space, with any clusterer.

A clusterer is anything with ``fit_predict(X) -> labels`` (the scikit-learn protocol): KMeans,
HDBSCAN, SpectralClustering, a user's own class. Names in configs map through :data:`CLUSTERERS` to an
estimator class or a factory function; installed packages add names through the entry-point group
``polypure.clusterers``, and ``MODULE:CLASS`` (``sklearn.cluster:AgglomerativeClustering``) names one
directly. Built in: ``kmeans`` (scikit-learn KMeans, ``n_init=10``, fixed ``random_state``) and
``hdbscan`` (the hdbscan package; noise is labelled -1).

The config's parameters go to the class or factory as keyword arguments, checked against its signature.
The run's seed goes as ``random_state`` where it takes that parameter (as scikit-learn's estimators do)
and as ``seed`` where it names that, unless the config sets them itself.

Results go to ``/clusters/<target>/<space>/<method id>`` (M, n_refs) int64, with the method's name and
parameters in attributes. A space is an attribution layer, ``activation``, or an evaluator's embedding
(``clip``, ``dinov2``).

Example
-------
>>> from polypure.clustering import make_clusterer
>>> est = make_clusterer("kmeans", {"n_clusters": 2}, seed=0)
>>> est.fit_predict([[0.0], [0.1], [5.0], [5.1]]).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
True
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
import warnings
from typing import Any, Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

from .errors import ConfigError, PolypureError
from .registry import Registry

#: Clusterers by name: estimator classes (``cls(**params)``) or factories (``factory(**params) -> estimator``),
#: either taking ``random_state`` or ``seed`` where they use one.
CLUSTERERS = Registry("clusterer", group="polypure.clusterers")

#: Parameters through which polypure passes the run's seed, where a clusterer takes them.
SEED_PARAMETERS = ("random_state", "seed")


@CLUSTERERS.register("kmeans")
def kmeans(n_clusters: int = 2, n_init: int = 10, seed: int = 0, **params):
    """scikit-learn KMeans as PURE used it (k = 2, ``n_init=10``, fixed seed)."""
    from sklearn.cluster import KMeans
    return KMeans(n_clusters=n_clusters, n_init=n_init, random_state=params.pop("random_state", seed), **params)


@CLUSTERERS.register("hdbscan")
def hdbscan_clusterer(min_cluster_size: int = 5, **params):
    """HDBSCAN from the hdbscan package; references it leaves out are labelled -1 (noise)."""
    import hdbscan
    return hdbscan.HDBSCAN(min_cluster_size=min_cluster_size, **params)


def _import_clusterer(name: str) -> Callable[..., Any]:
    """The object that ``MODULE:ATTRIBUTE`` names, as an entry point would load it."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cluster.methods: cannot import {module_name!r} for clusterer {name!r}: {exc}") from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ConfigError(f"cluster.methods: {module_name!r} has no class or function {attr!r}")
    return obj


def _parameters(obj: Callable[..., Any]) -> tuple[list[str], bool]:
    """The keyword parameters a class (of its ``__init__``) or a function names, and whether it takes ``**kwargs``."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin or extension callable: nothing to check against
        return [], True
    params = signature.parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def make_clusterer(name: str, params: dict[str, Any] | None = None, seed: int = 0):
    """A fresh estimator by registered name or ``MODULE:CLASS``, with the config's parameters and the run's seed.

    Parameters
    ----------
    name : str
        A registered name (``kmeans``, a plugin's) or ``MODULE:ATTRIBUTE`` naming an estimator class or
        a factory (``sklearn.cluster:AgglomerativeClustering``).
    params : dict, optional
        Keyword arguments of the class or factory.
    seed : int
        Passed as ``random_state`` and as ``seed`` to a class or factory that names them, unless
        ``params`` sets them.

    Returns
    -------
    object
        An estimator with ``fit_predict(X)``.

    Raises
    ------
    ConfigError
        For an unknown name, a parameter the clusterer does not take, or an object without ``fit_predict``.
    """
    obj = _import_clusterer(name) if ":" in name and name not in CLUSTERERS else CLUSTERERS.get(name)
    kwargs = dict(params or {})
    named, open_ended = _parameters(obj)
    unknown = [p for p in kwargs if p not in named]
    if unknown and not open_ended:
        takes = f"it takes {', '.join(named)}" if named else "it takes none"
        raise ConfigError(f"cluster.methods: {name} takes no parameter {unknown[0]!r} ({takes})")
    for key in SEED_PARAMETERS:
        # only a parameter the signature names: **kwargs may forward to something without it
        if key in named and key not in kwargs:
            kwargs[key] = seed
    try:
        estimator = obj(**kwargs)
    except TypeError as exc:
        # a factory's **kwargs reached an estimator that does not take one of them
        bad = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        raise ConfigError(f"cluster.methods: {name} takes no parameter {bad.group(1)!r}" if bad
                          else f"cluster.methods: {name}: {exc}") from None
    if not callable(getattr(estimator, "fit_predict", None)):
        raise ConfigError(f"cluster.methods: {name!r} made a {type(estimator).__name__} without fit_predict(X)")
    return estimator


def fresh(estimator):
    """An unfitted copy of an estimator (scikit-learn ``clone`` when it supports it)."""
    if hasattr(estimator, "get_params"):
        from sklearn.base import clone
        try:
            return clone(estimator)
        except (TypeError, RuntimeError):
            pass
    return copy.deepcopy(estimator)


def cluster_rows(features: np.ndarray, estimator) -> np.ndarray:
    """Cluster each neuron's references: (M, n_refs, D) features to (M, n_refs) int64 labels."""
    out = np.empty(features.shape[:2], np.int64)
    for m in range(len(features)):
        with warnings.catch_warnings():
            # a dead neuron's identical vectors make k-means warn; its single cluster is the honest answer
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = np.asarray(fresh(estimator).fit_predict(np.asarray(features[m], np.float64)))
        if labels.shape != (features.shape[1],):
            raise PolypureError(f"clusterer {type(estimator).__name__} returned {labels.shape} labels for "
                                f"{features.shape[1]} references")
        out[m] = labels
    return out


def space_path(target: str, space: str, store) -> str:
    """Where a space's features for a target live in the store."""
    relevance = f"relevance/{target}/{space}"
    if relevance in store:
        return relevance
    embedding = f"embeddings/{space}/{target}"
    if embedding in store:
        return embedding
    raise ConfigError(f"cluster.spaces: {space!r} is neither an attribution layer of target {target!r}, "
                      f"'activation', nor an evaluator embedding in the store")


def default_spaces(store, target: str) -> list[str]:
    """Every attribution layer of the target, then ``activation``."""
    from .store import read_attr
    group = store.file[f"relevance/{target}"]
    return [*read_attr(group.attrs["attribution_layers"]), "activation"]


def target_spaces(store, configured: list[str] | None) -> dict[str, list[str]]:
    """The spaces of every relevance target: ``cluster.spaces`` where the target has them, else its defaults.

    Raises
    ------
    ConfigError
        If a configured space exists for no target at all.
    """
    out = {}
    for target in store.relevance_targets():
        if configured is None:
            out[target] = default_spaces(store, target)
            continue
        out[target] = [s for s in configured
                       if f"relevance/{target}/{s}" in store or f"embeddings/{s}/{target}" in store]
    for space in configured or []:
        if not any(space in spaces for spaces in out.values()):
            raise ConfigError(f"cluster.spaces: {space!r} is neither an attribution layer of any target, "
                              "'activation', nor an evaluator embedding in the store (run the embed stage first)")
    return out


def _methods(ctx, methods) -> list[tuple[str, str, dict, Any]]:
    """(id, name, params, estimator) for the config's methods or estimators passed from Python."""
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


def run_stage(ctx, methods: dict[str, Any] | None = None) -> None:
    """Cluster every complete relevance target in every space with every method.

    Parameters
    ----------
    ctx : Experiment
    methods : dict of str to estimator, optional
        Estimators by method id, used instead of ``config.cluster.methods`` (for objects built in Python).
    """
    chosen = _methods(ctx, methods)
    with ctx.open_store() as store:
        for target, spaces in target_spaces(store, ctx.config.cluster.spaces).items():
            complete = store.read(f"relevance/{target}/complete")
            if not complete.all():
                raise PolypureError(f"relevance of target {target!r} is incomplete ({int((~complete).sum())} "
                                    "neurons left); run the relevance stage first")
            jobs = [(space, mid, name, params, est) for space in spaces for mid, name, params, est in chosen]
            bar = tqdm(jobs, desc=f"cluster {target}", disable=not ctx.progress, leave=False)
            done = []
            for space, method_id, name, params, estimator in bar:
                path = f"clusters/{target}/{space}/{method_id}"
                signature = json.dumps({"name": name, "params": params, "seed": ctx.config.seed}, sort_keys=True,
                                       default=str)
                if path in store and store.file[path].attrs.get("signature") == signature:
                    continue
                features = store.read(space_path(target, space, store))
                labels = cluster_rows(features, estimator)
                store.write_array(path, labels, attrs={"method": name, "params": json.dumps(params, default=str),
                                                       "signature": signature, "space": space})
                store.flush()
                done.append(path)
            ctx.log(f"cluster {target}: {len(done)} new clustering(s) over {len(spaces)} space(s)"
                    if done else f"cluster {target}: up to date, skipped")
