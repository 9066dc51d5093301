"""Models to explain.

:mod:`~polypure.models.factory` has ``create_model`` and the model registry; the shipped demo models are
:mod:`~polypure.models.demo_resnet` and :mod:`~polypure.models.demo_vit`; real EfficientNet-Lite0 weights
come through :mod:`~polypure.models.efficientnet_lite`, and downloads that fail clearly offline through
:mod:`~polypure.models.hub`.
"""
