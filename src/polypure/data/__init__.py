"""Data: the samples a run explains.

:mod:`~polypure.data.datasets` holds data kinds by name, stable sample ids, labels and views;
:mod:`~polypure.data.synthetic` makes concept images with known shape, colour and texture.
"""
