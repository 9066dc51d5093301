"""Shared fixtures: stores built once per test session, temporary store paths, torch's thread count.

Plain helpers (paths, datasets, store builders, a browser) live in ``tests/helpers.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .helpers import build_figure_store, build_purity_store, figure_dataset


@pytest.fixture(scope="session")
def store_factory(tmp_path_factory) -> Callable[[str, Callable[[Path], Path]], Path]:
    """``store_factory(name, build)``: the store ``build(path)`` makes, built once per test session.

    Tests that read a shared store must not change it; a test that changes one copies it first.
    """
    built: dict[str, Path] = {}

    def get(name: str, build: Callable[[Path], Path]) -> Path:
        if name not in built:
            built[name] = build(tmp_path_factory.mktemp(name) / f"{name}.h5")
        return built[name]

    return get


@pytest.fixture(scope="session")
def figure_store(store_factory) -> tuple[Path, object]:
    """The store every figure and report test reads, with the dataset its thumbnails come from."""
    return store_factory("figures", build_figure_store), figure_dataset()


@pytest.fixture(scope="session")
def purity_store(store_factory) -> Path:
    """The store of the purity, summary and comparison tests (k-means and HDBSCAN, planted neurons)."""
    return store_factory("purity", build_purity_store)


@pytest.fixture
def tmp_store(tmp_path) -> Path:
    return tmp_path / "store.h5"


@pytest.fixture(autouse=True)
def _threads():
    # tests run on two cores; keep torch from oversubscribing them
    torch.set_num_threads(2)
