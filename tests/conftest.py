"""Shared fixtures: small in-memory datasets, the read-only real data folder, temporary stores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from polypure.data.datasets import ArrayDataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYPURE_SHARED", REPO.parent / "shared")) / "data"


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test where it is absent."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent")
    return path


def random_images(n: int, size: int, channels: int = 3, seed: int = 0) -> ArrayDataset:
    """N random uint8 images as a dataset normalised like ImageNet."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    return ArrayDataset(pixels, labels=np.arange(n) % 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture
def tmp_store(tmp_path) -> Path:
    return tmp_path / "store.h5"


@pytest.fixture(autouse=True)
def _threads():
    # tests run on two cores; keep torch from oversubscribing them
    torch.set_num_threads(2)
