"""polypure: split polysemantic neurons of vision models into pure sub-features.

PURE (Dreyer et al. 2024) clusters, for each of a neuron's most-activating images, the conditional
relevance of the neurons one layer below. polypure computes that relevance at any lower layers in one
backward pass, stores everything in one HDF5 file, clusters it with any scikit-learn-style clusterer,
and measures the result against CLIP / DINOv2 embeddings or known labels.

The package is organised by role: :mod:`polypure.config`, :mod:`polypure.models`, :mod:`polypure.data`,
:mod:`polypure.attribution` (the engines), :mod:`polypure.pipeline` (stages and executors),
:mod:`polypure.store`, :mod:`polypure.evaluation` and :mod:`polypure.viz`. The names below are the
public face a notebook needs; they are imported on first use, so that ``polypure --help`` does not pay
for importing torch.

Example
-------
>>> import polypure
>>> "Experiment" in dir(polypure) and "open_results" in polypure.__all__
True
>>> from polypure import Experiment        # doctest: +SKIP
>>> Experiment("demo").run()               # doctest: +SKIP
"""

from importlib import import_module

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY = {
    # running
    "Experiment": "polypure.experiment",
    "Config": "polypure.config.settings", "load_config": "polypure.config.settings",
    "check_config": "polypure.attribution.rule_checks",
    "ExplainedModel": "polypure.models.factory", "create_model": "polypure.models.factory",
    # reading results
    "Store": "polypure.store.hdf5_store",
    "Results": "polypure.store.results", "open_results": "polypure.store.results",
    "write_report": "polypure.viz.report",
    "compare_stores": "polypure.evaluation.store_comparison",
    # errors
    "PolypureError": "polypure.errors", "InputError": "polypure.errors", "ConfigError": "polypure.errors",
    "StoreError": "polypure.errors", "StaleResultError": "polypure.errors",
    "StoreLockedError": "polypure.errors", "DiskFullError": "polypure.errors",
    "ClustererFailed": "polypure.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'polypure' has no attribute {name!r}")


def __dir__():
    # tab completion in a notebook lists the public names, not only those imported so far
    return sorted(set(globals()) | set(__all__))
