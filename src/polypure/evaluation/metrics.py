"""Metrics of disentanglement, one neuron at a time (docs/method.md, Evaluation).

* :func:`distance_correlation` -- the seed paper's metric: Pearson correlation between the strictly
  lower triangles of two Euclidean distance matrices of the same references (reference space, e.g.
  CLIP, against a feature space, e.g. relevance at one layer);
* :func:`cluster_distances` -- PURE's metric: mean reference-space distance between references in the
  same cluster (inner) and in different clusters (inter), with PURE's fallback when one side is empty;
* :func:`agreement` -- adjusted Rand index and normalised mutual information of a clustering against
  known labels (scikit-learn's implementations);
* :func:`mixture` -- how many label values make up at least a share of a neuron's references;
* :func:`degenerate`, :func:`clustering_status`, :func:`single_label` -- why a neuron's space, clustering
  or labels give no score at all (a non-result, which must not be averaged in as a zero).

Non-results
-----------
A score is only a score where there was something to split and something was split. For one neuron:

* a feature space is *degenerate* (:data:`CONSTANT`) when the vectors of all its references are the same,
  every channel's spread across the references at most :data:`TOLERANCE` times the largest absolute value
  (all zero, as for a dead neuron, included); it is :data:`ONE_HOT` when every reference's vector has all but
  :data:`TOLERANCE` of its L1 mass on one channel, the same channel for every reference (relevance passed
  straight through, as from a DenseNet concatenation: the space then holds one number per reference, the
  neuron's own strength, not a decomposition). One-hot is checked first, so identical one-hot vectors are
  ``one-hot``. A relevance space (vectors divided by ``sum |R| + 1e-10``, so each row's L1 mass is 1 unless
  the raw relevance was near that floor) is also degenerate, :data:`VANISHING`, when any of the neuron's
  references has a row whose mass is below :data:`FLOOR_MASS`: its relevance vanished below the
  normalisation floor (an EfficientNet whose gates get the plain gradient ends at 1e-27), and what is
  stored there is rounding, not a direction. Vanishing is checked last (a dead neuron is ``constant``);
* a clustering is :data:`ALL_NOISE` when every reference is labelled noise (-1), and :data:`ONE_CLUSTER`
  when the references it did not call noise all share one cluster;
* a label set is :data:`ONE_LABEL` for the neuron when all its references carry the same value: there is
  no split to recover, and ARI / NMI would be 0 or 1 by convention; it is :data:`UNIQUE_LABELS` when every
  reference carries a value of its own (one photo per class, an id as label): no two references agree, so
  no clustering can recover anything, and ARI would be 0 whatever the clustering.

Example
-------
>>> import numpy as np
>>> from polypure.evaluation.metrics import distance_correlation
>>> x = np.random.default_rng(0).normal(size=(10, 4))
>>> round(distance_correlation(x, x), 6)
1.0
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix of the rows of ``x`` (float64, exact zeros on the diagonal)."""
    x = np.asarray(x, np.float64)
    squared = np.einsum("ij,ij->i", x, x)
    d2 = squared[:, None] + squared[None, :] - 2 * x @ x.T
    np.maximum(d2, 0, out=d2)
    np.fill_diagonal(d2, 0)
    return np.sqrt(d2)


def distance_correlation(reference: np.ndarray, features: np.ndarray) -> float:
    """Pearson correlation of the strictly-lower-triangle distances of two embeddings of the same items.

    Parameters
    ----------
    reference, features : ndarray, shape (K, D1) and (K, D2)

    Returns
    -------
    float
        NaN when either set of distances is constant (for instance all-zero relevance vectors).
    """
    rows, cols = np.tril_indices(len(reference), k=-1)
    a = pairwise_distances(reference)[rows, cols]
    b = pairwise_distances(features)[rows, cols]
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def cluster_distances(reference: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean reference-space distance within clusters and between clusters (PURE).

    Pairs involving noise (label -1) are left out. As in PURE's evaluation, if there is no pair in
    different clusters the inter distance equals the inner one, and vice versa.

    Returns
    -------
    (inner, inter) : tuple of float
    """
    labels = np.asarray(labels)
    distances = pairwise_distances(reference)
    valid = labels >= 0
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    np.fill_diagonal(same, False)
    different = (labels[:, None] != labels[None, :]) & valid[:, None] & valid[None, :]
    inner = distances[same]
    inter = distances[different]
    if inter.size == 0:
        inter = inner
    if inner.size == 0:
        inner = inter
    if inner.size == 0:
        return float("nan"), float("nan")
    return float(inner.mean()), float(inter.mean())


#: Relative tolerance of the degenerate-space checks (float32 relevance is exact to about 1e-7).
TOLERANCE = 1e-6
#: Reasons a neuron gets no score (see the module's section *Non-results*).
CONSTANT, ONE_HOT, ALL_NOISE, ONE_CLUSTER, ONE_LABEL = "constant", "one-hot", "all-noise", "one-cluster", "one-label"
UNIQUE_LABELS, VANISHING = "unique-labels", "vanishing"
#: Every reason, in the order they are reported.
REASONS = (CONSTANT, ONE_HOT, VANISHING, ALL_NOISE, ONE_CLUSTER, ONE_LABEL, UNIQUE_LABELS)
#: The L1 mass below which a stored relevance row was below the normalisation floor: ``s / (s + 1e-10)`` is
#: under one half exactly where the raw relevance ``s = sum |R|`` is under the floor 1e-10 (zero included).
FLOOR_MASS = 0.5


def below_floor(features: np.ndarray) -> np.ndarray:
    """Which stored relevance rows were below the normalisation floor (L1 mass under :data:`FLOOR_MASS`).

    Parameters
    ----------
    features : ndarray, shape (..., D)
        Normalised relevance vectors.

    Returns
    -------
    ndarray of bool, shape (...)

    Examples
    --------
    >>> import numpy as np
    >>> below_floor(np.array([[0.25, -0.75], [3e-17, 0.0], [0.0, 0.0]]))
    array([False,  True,  True])
    """
    return np.abs(np.asarray(features, np.float64)).sum(axis=-1) < FLOOR_MASS


def degenerate(features: np.ndarray, normalised: bool = False) -> np.ndarray:
    """Why each neuron's references cannot be split in a space: ``vanishing``, ``one-hot``, ``constant`` or ``""``.

    Parameters
    ----------
    features : ndarray, shape (M, n_refs, D) or (n_refs, D)
        The vectors of each neuron's references in one space.
    normalised : bool
        Whether the space is a relevance space, its rows divided by their L1 norm plus the floor; only then is a
        neuron with a row below the floor (:func:`below_floor`) ``vanishing``.

    Returns
    -------
    ndarray of str, shape (M,) (or a 0-d array for one neuron)
        ``""`` where the space is usable.

    Examples
    --------
    >>> import numpy as np
    >>> degenerate(np.array([[[0.0, 1.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]))
    array(['one-hot', 'constant', ''], dtype='<U9')
    """
    x = np.asarray(features, np.float64)
    single = x.ndim == 2
    x = x[None] if single else x
    if x.shape[1] == 0:
        out = np.full(len(x), CONSTANT, dtype="<U9")
        return out[0] if single else out
    magnitude = np.abs(x)
    scale = magnitude.max(axis=(1, 2))
    spread = np.ptp(x, axis=1).max(axis=1) if x.shape[2] else np.zeros(len(x))
    constant = spread <= TOLERANCE * scale
    mass = magnitude.sum(axis=2)
    top = magnitude.argmax(axis=2)
    share = np.divide(magnitude.max(axis=2), mass, out=np.zeros_like(mass), where=mass > 0)
    one_hot = (share >= 1 - TOLERANCE).all(axis=1) & (top == top[:, :1]).all(axis=1)
    out = np.where(one_hot, ONE_HOT, np.where(constant, CONSTANT, "")).astype("<U9")
    if normalised:
        # a dead neuron's all-zero rows are constant, the clearer reason; vanishing is a row among live ones
        out[below_floor(x).any(axis=1) & (out == "")] = VANISHING
    return out[0] if single else out


def clustering_status(labels: np.ndarray) -> np.ndarray:
    """Why each neuron's clustering is no split: ``all-noise``, ``one-cluster`` or ``""``.

    Parameters
    ----------
    labels : ndarray, shape (M, n_refs) or (n_refs,)
        Cluster labels, -1 for noise.

    Returns
    -------
    ndarray of str, shape (M,) (or a 0-d array for one neuron)

    Examples
    --------
    >>> clustering_status(np.array([[-1, -1, -1], [0, -1, 0], [0, 1, -1]]))
    array(['all-noise', 'one-cluster', ''], dtype='<U11')
    """
    labels = np.asarray(labels)
    single = labels.ndim == 1
    labels = labels[None] if single else labels
    noise = labels < 0
    all_noise = noise.all(axis=1)
    # the largest and smallest label among the non-noise ones: equal means one cluster
    high = np.where(noise, np.iinfo(np.int64).min, labels).max(axis=1, initial=np.iinfo(np.int64).min)
    low = np.where(noise, np.iinfo(np.int64).max, labels).min(axis=1, initial=np.iinfo(np.int64).max)
    out = np.where(all_noise, ALL_NOISE, np.where(high == low, ONE_CLUSTER, "")).astype("<U11")
    return out[0] if single else out


def single_label(labels: np.ndarray) -> np.ndarray:
    """Whether all references of each neuron carry the same label value: (M, n_refs) -> (M,) bool."""
    labels = np.asarray(labels)
    single = labels.ndim == 1
    labels = labels[None] if single else labels
    out = (labels == labels[:, :1]).all(axis=1)
    return out[0] if single else out


def unique_labels(labels: np.ndarray) -> np.ndarray:
    """Whether every reference of each neuron carries a label value of its own: (M, n_refs) -> (M,) bool.

    One reference is no split either way, so it is not counted here (:func:`single_label` says it).

    Examples
    --------
    >>> unique_labels(np.array([[3, 1, 2], [1, 1, 2], [5, 5, 5]]))
    array([ True, False, False])
    """
    labels = np.asarray(labels)
    single = labels.ndim == 1
    labels = labels[None] if single else labels
    ordered = np.sort(labels, axis=1)
    out = (ordered[:, 1:] != ordered[:, :-1]).all(axis=1) & (labels.shape[1] > 1)
    return out[0] if single else out


def agreement(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[float, float]:
    """(adjusted Rand index, normalised mutual information) of a clustering against known labels."""
    return (float(adjusted_rand_score(labels_true, labels_pred)),
            float(normalized_mutual_info_score(labels_true, labels_pred)))


def mixture(values: np.ndarray, share: float = 0.2) -> int:
    """How many distinct values each make up at least ``share`` of ``values``."""
    _, counts = np.unique(np.asarray(values), return_counts=True)
    return int((counts >= share * len(values)).sum())
