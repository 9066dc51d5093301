"""Clusterers by name: split each neuron's references into groups with any scikit-learn-style estimator.

A clusterer is anything with ``fit_predict(X) -> labels`` (the scikit-learn protocol): KMeans,
HDBSCAN, SpectralClustering, a user's own class. Names in configs map through :data:`CLUSTERERS` to an
estimator class or a factory function; installed packages add names through the entry-point group
``polypure.clusterers``, and ``MODULE:CLASS`` (``sklearn.cluster:AgglomerativeClustering``) names one
directly. Built in: ``kmeans`` (scikit-learn KMeans, ``n_init=10``, fixed ``random_state``),
``hdbscan`` (the hdbscan package; noise is labelled -1) and ``dominant`` (:class:`Dominant`, for dictionary
spaces only: each reference goes to the concept that contributes most to it).

A neuron whose features in a space are all zero (a dead neuron's relevance) is not clustered: its labels
are -1, as noise is, and the cluster stage warns once with how many there are (:data:`DEAD`). A clusterer
that raises on the data, or returns labels of another shape, stops the stage with :class:`ClustererFailed`.

The config's parameters go to the class or factory as keyword arguments, checked against its signature.
The run's seed goes as ``random_state`` where it takes that parameter (as scikit-learn's estimators do)
and as ``seed`` where it names that, unless the config sets them itself.

:func:`cluster_rows` clusters every neuron of a (M, n_refs, D) feature array; the stage that does so for
every space and writes ``/clusters`` is :mod:`polypure.pipeline.cluster_stage`.

Example
-------
>>> from polypure.evaluation.clustering import make_clusterer
>>> est = make_clusterer("kmeans", {"n_clusters": 2}, seed=0)
>>> est.fit_predict([[0.0], [0.1], [5.0], [5.1]]).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
True
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning

from polypure.errors import ClustererFailed, ConfigError
from polypure.registry import Registry

#: Clusterers by name: estimator classes (``cls(**params)``) or factories (``factory(**params) -> estimator``),
#: either taking ``random_state`` or ``seed`` where they use one.
CLUSTERERS = Registry("clusterer", group="polypure.clusterers")

#: Parameters through which polypure passes the run's seed, where a clusterer takes them.
SEED_PARAMETERS = ("random_state", "seed")

#: Why a neuron is not clustered in a space: all its features there are zero. Its labels are -1.
DEAD = "all-zero features (a dead neuron): not clustered, labelled -1"


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


# -- dominant: the clusterer of dictionary spaces -----------------------------------------------------------


@CLUSTERERS.register("dominant")
class Dominant(BaseEstimator):
    """Each reference to the neuron's concept that contributes most to it (a dictionary space's clusterer).

    The candidates are the ``n_clusters`` concepts with the largest mean contribution over the neuron's
    references (ties to the earlier column); a reference's label is the rank of the candidate with its
    largest contribution (ties to the better ranked), so label 0 is the neuron's main concept. A dictionary
    space (:mod:`polypure.dictionaries.space`) holds a neuron's concepts' contributions, column by column;
    on any other space the columns are no concepts, and the cluster stage refuses it there
    (:attr:`dictionary_only`).

    Parameters
    ----------
    n_clusters : int
        Candidate concepts per neuron (at least 1).
    """

    #: The cluster stage gives this clusterer dictionary spaces only, and refuses it on others.
    dictionary_only = True

    def __init__(self, n_clusters: int = 2):
        self.n_clusters = n_clusters

    def fit(self, X, y=None):
        """Label each row of ``X`` (references by concepts' contributions): ``labels_``."""
        X = np.asarray(X, np.float64)
        if not isinstance(self.n_clusters, int) or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, not {self.n_clusters!r}")
        candidates = np.argsort(-X.mean(axis=0), kind="stable")[:self.n_clusters]
        self.labels_ = np.argmax(X[:, candidates], axis=1).astype(np.int64)
        return self

    def fit_predict(self, X, y=None) -> np.ndarray:
        """The labels of :meth:`fit`."""
        return self.fit(X).labels_


def dictionary_only(estimator) -> bool:
    """Whether a clusterer clusters dictionary spaces only (:attr:`Dominant.dictionary_only`)."""
    return bool(getattr(estimator, "dictionary_only", False))


# -----------------------------------------------------------------------------------------------------------


def _import_clusterer(name: str) -> Callable[..., Any]:
    """The object that ``MODULE:ATTRIBUTE`` names, as an entry point would load it."""
    from polypure.registry import import_factory

    if name.partition(":")[0].endswith(".py"):
        # the name is also the method id, a store path component: a file path would add folders to it
        raise ConfigError(f"cluster.methods: {name!r}: name a clusterer by MODULE:CLASS of an importable module, "
                          "not a file")
    return import_factory(name, "cluster.methods")


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


def dead_rows(features: np.ndarray) -> np.ndarray:
    """Which neurons have all-zero features in a space: (M, n_refs, D) -> (M,) bool.

    Relevance is L1-normalised with a small epsilon, so a neuron that never fires keeps exact zeros.
    """
    features = np.asarray(features)
    return ~features.reshape(len(features), -1).any(axis=1)


def cluster_rows(features: np.ndarray, estimator, notes: dict | None = None) -> np.ndarray:
    """Cluster each neuron's references: (M, n_refs, D) features to (M, n_refs) int64 labels.

    Parameters
    ----------
    features : ndarray (M, n_refs, D)
    estimator : object with ``fit_predict``
        Cloned for every neuron.
    notes : dict, optional
        Warnings the clusterer raised, counted by ``(category, message)`` (neurons that raised each) instead
        of warned here: a caller clustering many spaces can report them once. Neurons whose features are
        all zero (:func:`dead_rows`) are not clustered: their labels are -1, counted under
        ``(UserWarning, DEAD)``.

    Returns
    -------
    ndarray of int64, shape (M, n_refs)

    Raises
    ------
    ClustererFailed
        When the clusterer raises, or returns labels of another shape; names the estimator, the row and the
        exception.
    """
    out = np.empty(features.shape[:2], np.int64)
    raised: dict[tuple[type, str], int] = {}
    dead = dead_rows(features)
    for m in range(len(features)):
        if dead[m]:
            # nothing to split: a clusterer's split of identical zero vectors would be an arbitrary one
            out[m] = -1
            raised[UserWarning, DEAD] = raised.get((UserWarning, DEAD), 0) + 1
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # identical vectors make k-means warn; its single cluster is the honest answer
            warnings.simplefilter("ignore", ConvergenceWarning)
            try:
                labels = np.asarray(fresh(estimator).fit_predict(np.asarray(features[m], np.float64)))
            except Exception as exc:  # a plugin's failure on the data, told in one line with where it happened
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ClustererFailed(f"clusterer {type(estimator).__name__} raised {type(exc).__name__} on row {m}: "
                                      f"{first}") from None
        for item in caught:
            key = (item.category, str(item.message))
            raised[key] = raised.get(key, 0) + 1
        if labels.shape != (features.shape[1],):
            raise ClustererFailed(f"clusterer {type(estimator).__name__} returned labels of shape {labels.shape} for "
                                  f"{features.shape[1]} references (row {m})")
        out[m] = labels
    # one warning per kind, not one per neuron (spectral clustering's "graph is not fully connected" would
    # otherwise flood the screen)
    if notes is not None:
        for key, count in raised.items():
            notes[key] = notes.get(key, 0) + count
        return out
    for (category, message), count in raised.items():
        warnings.warn(f"{type(estimator).__name__}: {message} (for {count} of {len(features)} neurons)", category,
                      stacklevel=2)
    return out
