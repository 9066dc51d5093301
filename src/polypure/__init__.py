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

from importlib import import_module

__version__ = "0.1.0"

# names resolve on first use, so that `polypure --help` does not pay for importing torch
_LAZY = {
    "Config": "config", "load_config": "config",
    "ConfigError": "errors", "InputError": "errors", "PolypureError": "errors", "StoreError": "errors",
    "Experiment": "experiment",
    "ExplainedModel": "models", "create_model": "models",
    "Store": "store",
    "Results": "results", "open_results": "results",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'polypure' has no attribute {name!r}")
