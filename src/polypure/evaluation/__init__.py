"""Evaluation: how well each space splits each neuron, and whether one space beats another.

- :mod:`~polypure.evaluation.clustering`: clusterers by name (k-means, HDBSCAN, any estimator, plugins);
- :mod:`~polypure.evaluation.evaluators`: reference spaces (CLIP, DINOv2, plugins);
- :mod:`~polypure.evaluation.metrics`: per-neuron metrics (correlations, split quality, ARI, NMI);
- :mod:`~polypure.evaluation.purity`: SemanticLens purity scores;
- :mod:`~polypure.evaluation.statistics`: paired and unpaired tests, intervals, Holm;
- :mod:`~polypure.evaluation.summary`: the summary table over groups of neurons;
- :mod:`~polypure.evaluation.comparisons`: spaces of one store compared over the same neurons;
- :mod:`~polypure.evaluation.store_comparison`: several stores compared (``polypure compare``).
"""
