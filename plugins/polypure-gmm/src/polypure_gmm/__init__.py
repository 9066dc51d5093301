"""A Gaussian-mixture clusterer for polypure.

Installed, it is available in configs as ``cluster.methods: [{name: gmm, n_components: 2}]``: polypure
finds it through the ``polypure.clusterers`` entry point declared in this package's ``pyproject.toml``.
"""

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture


class GaussianMixtureClusterer(ClusterMixin, BaseEstimator):
    """Gaussian mixture on a PCA projection of each neuron's references.

    A neuron has about 50 references but its relevance vectors have hundreds of dimensions, too many for
    a full covariance; PCA first keeps ``n_dims`` of them.

    Parameters
    ----------
    n_components : int
        Number of clusters.
    n_dims : int
        PCA dimensions kept before fitting the mixture.
    covariance_type : str
        As in scikit-learn's GaussianMixture.
    random_state : int, optional
        Seeds PCA and the mixture's initialisation, as in scikit-learn; polypure sets it to ``config.seed``
        unless the config gives it.
    """

    def __init__(self, n_components=2, n_dims=5, covariance_type="full", random_state=None):
        self.n_components = n_components
        self.n_dims = n_dims
        self.covariance_type = covariance_type
        self.random_state = random_state

    def fit(self, X, y=None):
        """Fit the mixture to the projected references; returns self."""
        X = np.asarray(X, dtype=np.float64)
        dims = max(1, min(self.n_dims, X.shape[0] - 1, X.shape[1]))
        projected = PCA(n_components=dims, random_state=self.random_state).fit_transform(X)
        mixture = GaussianMixture(n_components=self.n_components, covariance_type=self.covariance_type,
                                  reg_covar=1e-4, random_state=self.random_state)
        self.labels_ = mixture.fit_predict(projected)
        return self

    def fit_predict(self, X, y=None):
        """Fit and return the component of every reference."""
        return self.fit(X).labels_
