"""Dictionaries learned on a layer's activations, the other school of disentangling, beside relevance clustering.

A sparse autoencoder or a non-negative matrix factorisation writes each position's activation vector as a sum
of concepts, ``a ≈ z D + bias``. The concepts' contributions to a neuron at the position its top-K statistic
chose, ``z_j D[j, n]``, are a space of its references like the relevance of a lower layer
(docs/method.md, Dictionary spaces):

* :mod:`polypure.dictionaries.kinds`: the kinds of dictionary by name (``topk_sae``, ``nmf``, plugins), and the
  one door through which the ``overcomplete`` package is imported;
* :mod:`polypure.dictionaries.samples`: which positions of which samples a dictionary learns from and is
  measured on, and the one pass that collects them;
* :mod:`polypure.dictionaries.training`: the resumable training loop and the quality on held-out positions;
* :mod:`polypure.dictionaries.space`: the decomposition of a target's neurons (real or planted) into the
  concepts' contributions.

The stage that runs them and writes the store is :mod:`polypure.pipeline.dictionary_stage`.
"""
