"""Helpers shared by the test modules: paths, small datasets, the stores several modules read, a browser.

Test modules import from here (never from each other or from ``conftest.py``); the session-scoped
fixtures in ``conftest.py`` build each shared store once per test session through these builders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polypure import Experiment
from polypure.data.datasets import ArrayDataset

from .nets import tiny

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYPURE_SHARED", REPO.parent / "shared")) / "data"
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
DOCS = REPO / "docs"


def doc_page(page: str) -> str:
    """The text of a documentation page (``docs/PAGE``), whose examples the tests run."""
    return (DOCS / page).read_text()


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


# -- the store of the figure and report tests --------------------------------------------------------------

#: References per neuron in the figure store.
FIGURE_K = 12


def figure_dataset() -> ArrayDataset:
    """The samples of the figure store (the report draws its thumbnails from them)."""
    return random_images(40, 32, seed=3)


def build_figure_store(path: Path) -> Path:
    """A store with every section a report reads.

    Two relevance targets and planted neurons (``c3@planted``), k-means clusters, the causal selectivity
    of the clusters (circuits of 2 channels), two reference spaces (``labels`` and a second labels space,
    ``classes``: no CLIP download, and fast), ground truth against the planted split and the class.
    """
    Experiment(model=tiny(seed=2), dataset=figure_dataset(), store=path, progress=False,
               topk={"layers": ["c3"], "k": FIGURE_K},
               relevance={"targets": [{"layer": "c3", "neurons": [0, 2, 4, 6, 8],
                                       "attribution_layers": ["c1", "c2"]},
                                      {"layer": "logits", "neurons": "all", "attribution_layers": ["c1", "c2"]}],
                          "n_refs": FIGURE_K, "planted": {"pairs": 2, "layer": "c3", "mode": "max", "max_overlap": 1.0}},
               evaluate={"references": ["labels", "classes"], "classes": {"evaluator": "labels"},
                         "ground_truth": ["planted", "class"]},
               selectivity={"enabled": True, "m": 2, "null_draws": 2},
               ).run(["topk", "relevance", "embed", "cluster", "selectivity", "evaluate"])
    return path


# -- the store of the purity and comparison tests -----------------------------------------------------------

#: The c3 channels explained in the purity store.
PURITY_NEURONS = [0, 2, 4, 6, 8, 10, 12, 14]
#: The run seed of the purity store.
PURITY_SEED = 3


def purity_settings() -> dict:
    """The config sections of the purity store."""
    return {"topk": {"layers": ["c3"], "k": 10},
            "relevance": {"targets": [{"layer": "c3", "neurons": PURITY_NEURONS, "attribution_layers": ["c1", "c2"]}],
                          "n_refs": 10, "planted": {"pairs": 2, "layer": "c3", "mode": ["sum", "max"],
                                                    "max_overlap": 1.0}},
            "cluster": {"methods": [{"name": "kmeans", "n_clusters": 2}, {"name": "hdbscan", "min_cluster_size": 6}]},
            "evaluate": {"references": ["labels"], "ground_truth": ["planted", "class"], "polysemantic_by": "class"},
            "compare": {"n_resamples": 1000}}


def purity_experiment(path, **changes) -> Experiment:
    """The purity store's experiment on ``path``, with config sections replaced by ``changes``."""
    return Experiment(model=tiny(seed=2), dataset=random_images(40, 32, seed=3), store=path, progress=False,
                      seed=PURITY_SEED, **{**purity_settings(), **changes})


def build_purity_store(path: Path) -> Path:
    """Eight c3 channels and planted neurons, k-means and HDBSCAN (all noise), a labels reference space."""
    purity_experiment(path).run(["topk", "relevance", "embed", "cluster", "evaluate"])
    return path


# -- a real browser --------------------------------------------------------------------------------------------


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile, or skip where it is not installed."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (Debian package 'chromium')")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
               f"--user-data-dir={profile}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def screenshot(tmp_path: Path, page: Path, name: str) -> Image.Image:
    """A 1280 x 1600 screenshot of a page (copied to $POLYPURE_REPORT_SHOTS when set)."""
    shot = tmp_path / name
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars", page.as_uri())
    shots = os.environ.get("POLYPURE_REPORT_SHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(shots) / name)
    with Image.open(shot) as img:
        return img.convert("RGB")
