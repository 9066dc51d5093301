"""Purity of a neuron in a reference space: do its references (and its sub-features) share one meaning.

Scores of one neuron from the reference-space embeddings (CLIP, DINOv2, any space) of its top-K
references, with ``v_i`` the unit-normalised embedding of reference ``i`` of ``n``:

* :func:`clarity` (SemanticLens, Dreyer et al. 2025): ``(n ||mean_i v_i||^2 - 1) / (n - 1)``, the mean
  cosine similarity over pairs of different references;
* :func:`polysemanticity` (SemanticLens): ``1 - cos(c_1, c_2)`` for the two centres of k-means (k = 2) on
  the ``v_i``;
* :func:`split_gain` (polypure): size-weighted mean clarity of the clusters of one clustering of the
  neuron (made in any feature space) minus the clarity of the same references unsplit;
* :func:`monosemanticity_topk` (Pach et al. 2025, restricted to the top-K references): activation-weighted
  mean cosine similarity over pairs of references;
* :func:`nearest_similarity` and :func:`redundancy` (SemanticLens), per neuron and per layer: largest
  cosine similarity of a neuron's mean embedding with another neuron's, and its mean over the layer.

Each per-neuron function takes ``(n_refs, D)`` embeddings; its ``_batch`` twin takes ``(M, n_refs, D)``
and returns ``(M,)``, vectorised except for k-means.

Conventions shared by every function:

* A reference whose embedding is all zero or has a NaN / infinite value has no direction: it is treated
  as absent, as if the neuron had one reference fewer (:func:`unit_normalise` gives it a NaN row, without
  a division warning). A batch can therefore hold neurons with fewer references as NaN-padded rows.
* A score that is undefined (for instance clarity with fewer than two references) is NaN, never an
  exception or a warning.

References
----------
Dreyer, M. et al. (2025). Mechanistic understanding and validation of large AI models with SemanticLens.
arXiv:2501.05398.

Pach, M., Karthik, S., Bouniot, Q., Belongie, S., Akata, Z. (2025). Sparse autoencoders learn monosemantic
features in vision-language models. arXiv:2504.02821.

Example
-------
>>> import numpy as np
>>> from polypure.evaluation.purity import clarity, polysemanticity, split_gain
>>> e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # two orthogonal pairs
>>> round(clarity(e), 4)  # 2 of the 6 pairs have cosine 1, the others 0
0.3333
>>> polysemanticity(e, seed=0)
1.0
>>> round(split_gain(e, [0, 0, 1, 1]), 4)  # both clusters have clarity 1
0.6667
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

# Gram matrices of monosemanticity_topk_batch and nearest_similarity are built in chunks of at most this
# many entries (32 MiB of float64), to bound memory for large batches
_CHUNK = 1 << 22


def unit_normalise(x) -> np.ndarray:
    """Rows (last axis) scaled to unit Euclidean norm, float64; all-zero or non-finite rows become NaN.

    Examples
    --------
    >>> unit_normalise([[3.0, 4.0], [0.0, 0.0]]).tolist()
    [[0.6, 0.8], [nan, nan]]
    """
    v, valid = _unit(np.asarray(x, np.float64))
    return np.where(valid[..., None], v, np.nan)


def neuron_embedding(embeddings) -> np.ndarray:
    """Mean of the unit-normalised embeddings of the references, ``(..., n_refs, D) -> (..., D)``.

    SemanticLens's semantic embedding of a neuron, used by :func:`nearest_similarity`. NaN where a neuron
    has no reference with a direction.
    """
    v, valid = _unit(np.asarray(embeddings, np.float64))
    count = valid.sum(axis=-1)
    total = v.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count[..., None] > 0, total / count[..., None], np.nan)


def clarity(embeddings) -> float:
    """Clarity of one neuron (SemanticLens, Dreyer et al. 2025): mean cosine similarity of its references.

    Parameters
    ----------
    embeddings : array_like, shape (n_refs, D)
        Reference-space embeddings of the neuron's references (need not be normalised).

    Returns
    -------
    float
        ``(n ||mean_i v_i||^2 - 1) / (n - 1)`` over the ``n`` references with a direction, which equals the
        mean of ``cos(v_i, v_j)`` over ``i != j``; in [-1 / (n - 1), 1]. NaN when ``n < 2``.
    """
    return float(clarity_batch(_single(embeddings))[0])


def clarity_batch(embeddings) -> np.ndarray:
    """:func:`clarity` of each of ``M`` neurons, ``(M, n_refs, D) -> (M,)``."""
    v, valid = _unit(_batch(embeddings))
    return _clarity_from_sums(v.sum(axis=1), valid.sum(axis=1))


def polysemanticity(embeddings, *, seed: int = 0) -> float:
    """Polysemanticity of one neuron (SemanticLens, Dreyer et al. 2025): dissimilarity of its two halves.

    k-means with k = 2 (scikit-learn, ``n_init=10``, ``random_state=seed``) on the unit-normalised
    embeddings, then ``1 - cos(c_1, c_2)`` of the two centres. Normalising first makes the split follow
    directions, which is all that clarity and the cosine read, and not embedding norms; the SemanticLens
    reference code (``semanticlens/scores.py``) runs k-means on the embeddings as given, which is the
    same for unit-norm embeddings. That code also replaces the score by ``1 - mean_i cos(mean, v_i)``
    when a cluster has fewer than two members; here the centres are used whatever the cluster sizes, so
    a single outlying reference can make the score high.

    Parameters
    ----------
    embeddings : array_like, shape (n_refs, D)
    seed : int
        The run's seed.

    Returns
    -------
    float
        In [0, 2]: 0 for one direction, 1 for two orthogonal groups. 0 when all references share one
        direction (k-means has no second cluster to find), NaN with fewer than two references or when a
        centre is the zero vector (a cluster of opposite directions).
    """
    with threadpool_limits(limits=1, user_api="openmp"):
        return _polysemanticity(_single(embeddings)[0], seed)


def polysemanticity_batch(embeddings, *, seed: int = 0) -> np.ndarray:
    """:func:`polysemanticity` of each of ``M`` neurons (one k-means each, same seed), ``(M,)``."""
    embeddings = _batch(embeddings)
    # one OpenMP thread: k-means on a few dozen points is ~10x slower with a thread team to start per fit
    with threadpool_limits(limits=1, user_api="openmp"):
        return np.array([_polysemanticity(e, seed) for e in embeddings], dtype=np.float64)


def split_gain(embeddings, labels) -> float:
    """How much purer a split makes a neuron's references (polypure).

    Parameters
    ----------
    embeddings : array_like, shape (n_refs, D)
        Reference-space embeddings of the neuron's references.
    labels : array_like of int, shape (n_refs,)
        A clustering of the same references, made in any space; negative labels (-1) are noise.

    Returns
    -------
    float
        ``sum_c (n_c / N) clarity(c) - clarity(all N)``; positive when the clusters are purer
        sub-features than the neuron. The references taken are those with a direction that are neither
        noise nor alone in their cluster (a cluster of one has no clarity); ``N`` is their number, and both
        terms use these same references, so that a clusterer cannot gain by setting references aside as
        noise or singletons. One cluster gives 0; NaN when fewer than two references remain.
    """
    return float(split_gain_batch(_single(embeddings), np.asarray(labels)[None])[0])


def split_gain_batch(embeddings, labels) -> np.ndarray:
    """:func:`split_gain` of each of ``M`` neurons, ``(M, n_refs, D)`` and ``(M, n_refs)`` -> ``(M,)``."""
    v, valid = _unit(_batch(embeddings))
    labels = np.asarray(labels)
    if labels.shape != valid.shape:
        raise ValueError(f"labels must have shape {valid.shape} (neurons, references), got {labels.shape}")
    member = valid & (labels >= 0)
    # cluster ids of the whole batch as 0..C-1, one-hot over references (noise and no direction: no cluster)
    ids, codes = np.unique(np.where(member, labels, -1), return_inverse=True)
    shift = 1 if ids.size and ids[0] < 0 else 0
    codes = codes.reshape(labels.shape) - shift
    n_clusters = int(ids.size - shift)
    onehot = (codes[..., None] == np.arange(n_clusters)) & member[..., None]  # (M, n_refs, C)
    sizes = onehot.sum(axis=1)  # (M, C)
    # a cluster of one has no clarity: its reference leaves both terms
    onehot &= (sizes >= 2)[:, None, :]
    sizes = onehot.sum(axis=1)
    sums = np.einsum("mrc,mrd->mcd", onehot.astype(np.float64), v)  # (M, C, D)
    cluster_clarity = _clarity_from_sums(sums, sizes)  # NaN for the emptied clusters, weight 0 below
    kept = sizes.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = np.where(sizes >= 2, sizes * cluster_clarity, 0.0).sum(axis=1) / kept
    unsplit = _clarity_from_sums(sums.sum(axis=1), kept)
    return np.where(kept >= 2, weighted - unsplit, np.nan)


def monosemanticity_topk(embeddings, activations) -> float:
    """Monosemanticity score of one neuron over its top-K references (Pach et al. 2025, restricted).

    Pach et al. weight every pair of images of a dataset by the neuron's min-max normalised activations;
    here only the neuron's top-K references are used, so the score reads "monosemanticity of the top-K",
    not of the whole dataset.

    Parameters
    ----------
    embeddings : array_like, shape (n_refs, D)
        Reference-space embeddings (Pach et al. use DINOv2) of the neuron's top-K references.
    activations : array_like, shape (n_refs,)
        The neuron's top-K statistic of each reference.

    Returns
    -------
    float
        ``sum_{n<m} a_n a_m cos(E_n, E_m) / sum_{n<m} a_n a_m``, in [-1, 1], with ``a`` the activations
        min-max normalised to [0, 1] over the neuron's references with a direction and a finite activation
        (others are left out). The least activating reference gets weight 0, so it does not count. When all
        those activations are equal, the weights are all 1 and the score is the :func:`clarity` of those
        references. NaN when fewer than two references have a positive weight.
    """
    return float(monosemanticity_topk_batch(_single(embeddings), np.asarray(activations)[None])[0])


def monosemanticity_topk_batch(embeddings, activations) -> np.ndarray:
    """:func:`monosemanticity_topk` of each of ``M`` neurons, ``(M, n_refs, D)``, ``(M, n_refs)`` -> ``(M,)``."""
    v, valid = _unit(_batch(embeddings))
    activations = np.asarray(activations, np.float64)
    if activations.shape != valid.shape:
        raise ValueError(f"activations must have shape {valid.shape} (neurons, references), "
                         f"got {activations.shape}")
    valid &= np.isfinite(activations)
    low = np.where(valid, activations, np.inf).min(axis=1, keepdims=True)
    high = np.where(valid, activations, -np.inf).max(axis=1, keepdims=True)
    spread = high - low
    with np.errstate(invalid="ignore", divide="ignore"):
        # equal activations (spread 0, also for a single reference): every reference weighs 1
        weights = np.where(spread > 0, (activations - low) / spread, 1.0)
    weights = np.where(valid, weights, 0.0)
    m, n = valid.shape
    numerator = np.empty(m)
    step = max(1, _CHUNK // max(1, n * n))
    diagonal = np.arange(n)
    for start in range(0, m, step):
        block = slice(start, start + step)
        gram = np.einsum("mid,mjd->mij", v[block], v[block])
        gram[:, diagonal, diagonal] = 0.0  # pairs n != m only
        numerator[block] = np.einsum("mi,mij,mj->m", weights[block], gram, weights[block])
    # sum over ordered pairs i != j of w_i w_j, as sum_i w_i (S - w_i): exactly 0 with one positive weight
    total = weights.sum(axis=1, keepdims=True)
    denominator = (weights * (total - weights)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def nearest_similarity(embeddings) -> np.ndarray:
    """Per neuron of a layer, the largest cosine similarity of its mean embedding with another neuron's.

    Parameters
    ----------
    embeddings : array_like, shape (M, n_refs, D)
        Reference-space embeddings of the references of the layer's ``M`` neurons.

    Returns
    -------
    ndarray, shape (M,)
        ``max_{j != k} cos(theta_k, theta_j)`` with ``theta`` the :func:`neuron_embedding`. NaN for a neuron
        without a reference with a direction (such neurons are no one's neighbour either), and for every
        neuron when fewer than two neurons have an embedding.
    """
    theta, valid = _unit(neuron_embedding(_batch(embeddings)))
    m = len(theta)
    best = np.full(m, np.nan)
    if valid.sum() < 2:
        return best
    step = max(1, _CHUNK // m)
    for start in range(0, m, step):
        rows = np.arange(start, min(start + step, m))
        similarity = theta[rows] @ theta.T
        similarity[:, ~valid] = -np.inf
        similarity[np.arange(len(rows)), rows] = -np.inf  # not with itself
        best[rows] = similarity.max(axis=1)
    best[~valid] = np.nan
    return best


def redundancy(embeddings) -> float:
    """Redundancy of a layer (SemanticLens, Dreyer et al. 2025): mean of :func:`nearest_similarity`.

    Near 1 when every neuron has a near-duplicate in the layer. Neurons without an embedding are left out
    of the mean; NaN when fewer than two neurons have one.

    Examples
    --------
    >>> layer = np.array([[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 1.0]]])  # one reference per neuron
    >>> nearest_similarity(layer).tolist(), round(redundancy(layer), 4)
    ([1.0, 1.0, 0.0], 0.6667)
    """
    best = nearest_similarity(embeddings)
    finite = best[np.isfinite(best)]
    return float(finite.mean()) if finite.size else float("nan")


def neuron_scores(embeddings, activations=None, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Compute the per-neuron purity scores of a batch that need no clustering, keyed by name, each ``(M,)``.

    ``clarity``, ``polysemanticity`` (seeded with ``seed``), ``nearest_similarity``, and, when
    ``activations`` (M, n_refs) is given, ``monosemanticity_topk``. :func:`split_gain_batch` (one value per
    clustering) and :func:`redundancy` (one value per layer) are called on their own.
    """
    scores = {
        "clarity": clarity_batch(embeddings),
        "polysemanticity": polysemanticity_batch(embeddings, seed=seed),
        "nearest_similarity": nearest_similarity(embeddings),
    }
    if activations is not None:
        scores["monosemanticity_topk"] = monosemanticity_topk_batch(embeddings, activations)
    return scores


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale rows to unit norm, with exact zeros for rows without a direction; also return the mask of rows with one."""
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("...d,...d->...", x, x))
    valid = np.isfinite(norms) & (norms > 0)
    safe = np.where(valid, norms, 1.0)[..., None]
    return np.where(valid[..., None], x / safe, 0.0), valid


def _polysemanticity(embeddings: np.ndarray, seed: int) -> float:
    v, valid = _unit(embeddings)
    v = v[valid]
    if len(v) < 2:
        return float("nan")
    if len(np.unique(v, axis=0)) < 2:
        return 0.0
    centres = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(v).cluster_centers_
    # rounding can put the cosine of two near-equal centres a hair above 1
    return float(np.clip(1.0 - _cosine(centres[0], centres[1]), 0.0, 2.0))


def _clarity_from_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Clarity from the sum of ``counts`` unit vectors: ``(||sum||^2 - n) / (n (n - 1))``, NaN for n < 2.

    The same as ``(n ||mean||^2 - 1) / (n - 1)``: ``||sum||^2`` is ``n`` (the diagonal) plus the sum of
    the ``n (n - 1)`` off-diagonal cosine similarities.
    """
    squared = np.einsum("...d,...d->...", sums, sums)
    counts = np.asarray(counts, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts >= 2, (squared - counts) / (counts * (counts - 1)), np.nan)


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm > 0 else float("nan")


def _single(embeddings) -> np.ndarray:
    e = np.asarray(embeddings, np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings of one neuron must have shape (n_refs, D), got {e.shape}")
    return e[None]


def _batch(embeddings) -> np.ndarray:
    e = np.asarray(embeddings, np.float64)
    if e.ndim != 3:
        raise ValueError(f"embeddings of a batch must have shape (M, n_refs, D), got {e.shape}")
    return e
