"""polypure: split polysemantic neurons of vision models into pure sub-features.

PURE (Dreyer et al. 2024) clusters, for each of a neuron's most-activating images, the conditional
relevance of the neurons one layer below. polypure computes that relevance at any lower layers in one
backward pass, stores everything in one HDF5 file, clusters it with any scikit-learn-style clusterer,
and measures the result against CLIP / DINOv2 embeddings or known labels.

Example
-------
>>> from polypure import Experiment        # doctest: +SKIP
>>> Experiment("demo").run()               # doctest: +SKIP
"""

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .errors import ConfigError, PolypureError, StoreError  # noqa: E402
from .experiment import Experiment  # noqa: E402
from .models import ExplainedModel, create_model  # noqa: E402
from .store import Store  # noqa: E402

__all__ = ["Config", "ConfigError", "Experiment", "ExplainedModel", "PolypureError", "Store", "StoreError",
           "__version__", "create_model", "load_config"]
