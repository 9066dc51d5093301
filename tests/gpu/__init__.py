"""Tests that need a CUDA device (marker ``gpu``): each compares a run on the device with the CPU's.

Skipped, with the reason, wherever ``torch.cuda.is_available()`` is false; ``benchmarks/gpu_check.sh`` runs
them on a GPU machine (``python -m pytest tests/gpu -m gpu -v``).
"""
