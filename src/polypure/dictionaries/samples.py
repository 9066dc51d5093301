"""The positions a dictionary learns from and is measured on, and the one pass over the data that collects them.

Every position of a layer's output (a pixel of a CNN map, a token of a transformer layer; the output itself
for a (B, C) layer) is a sample: the vector of its C channels. Of the ``N x P`` positions of the data, at most
``max_samples`` are drawn with the run's seed, and a share ``holdout`` of them is held out of training
(:func:`plan_samples`). :func:`collect` then forwards only the images that hold a drawn position, once for
every dictionary of the layer, and keeps the drawn vectors in (sample, position) order.

Example
-------
>>> from polypure.dictionaries.samples import plan_samples
>>> plan = plan_samples(n_samples=10, positions=4, max_samples=20, holdout=0.25, seed=0)
>>> len(plan.train), len(plan.heldout)
(15, 5)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from polypure.attribution.hooks import forward_to, tap_layers


@dataclass
class SamplePlan:
    """Drawn positions as flat indices ``sample * positions + position``, each part in increasing order.

    Attributes
    ----------
    train, heldout : ndarray of int64
    positions : int
        Positions per sample of the layer's output.
    """

    train: np.ndarray
    heldout: np.ndarray
    positions: int

    def samples(self) -> np.ndarray:
        """The samples holding a drawn position, in increasing order."""
        return np.unique(np.concatenate([self.train, self.heldout]) // self.positions)


def plan_samples(n_samples: int, positions: int, max_samples: int, holdout: float, seed: int) -> SamplePlan:
    """Draw the training and held-out positions of a dictionary.

    ``numpy.random.default_rng(seed)`` draws ``min(max_samples, n_samples * positions)`` positions without
    replacement, then a permutation of them whose first ``round(holdout * n)`` (at least one, and at least one
    left to train on) are held out.
    """
    total = n_samples * positions
    n = min(max_samples, total)
    rng = np.random.default_rng(seed)
    drawn = np.sort(rng.choice(total, size=n, replace=False)) if n < total else np.arange(total)
    order = rng.permutation(n)
    held = min(max(1, round(holdout * n)), n - 1)
    return SamplePlan(np.sort(drawn[order[held:]]).astype(np.int64), np.sort(drawn[order[:held]]).astype(np.int64),
                      positions)


def positions_of(output: torch.Tensor) -> torch.Tensor:
    """A layer's channels-first output (B, C, *positions) as position vectors (B, P, C)."""
    if output.ndim == 2:
        return output.unsqueeze(1)
    return output.flatten(2).transpose(1, 2)


def collect(model: torch.nn.Module, dataset, module: torch.nn.Module, plans: dict[str, SamplePlan],
            batch_size: int = 32, num_workers: int = 0, device: str | torch.device = "cpu", progress: bool = True,
            desc: str = "dictionary samples") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The drawn position vectors of every plan, from one forward pass over the images that hold them.

    Parameters
    ----------
    model : Module
    dataset : Dataset
        Items ``(input, label)``.
    module : Module
        The layer (its outputs are recorded channels first).
    plans : dict of str to SamplePlan
        One plan per dictionary of the layer.

    Returns
    -------
    dict of str to (Tensor, Tensor)
        Per plan, the training and held-out vectors (N, C), float32 on ``device``, in flat-index order.
    """
    needed = np.unique(np.concatenate([plan.samples() for plan in plans.values()]))
    parts: dict[str, tuple[list, list]] = {name: ([], []) for name in plans}
    cuda = torch.device(device).type == "cuda"
    loader = DataLoader(Subset(dataset, needed.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=cuda)
    done = 0
    with torch.no_grad(), tap_layers({"layer": module}) as outputs, \
            tqdm(total=len(needed), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for x, _ in loader:
            forward_to(model, x.to(device, non_blocking=cuda), outputs)
            vectors = positions_of(outputs["layer"]).float()
            batch = needed[done:done + len(x)]
            for name, plan in plans.items():
                for part, flat in zip(parts[name], (plan.train, plan.heldout)):
                    lo, hi = np.searchsorted(flat, [batch[0] * plan.positions, (batch[-1] + 1) * plan.positions])
                    chosen = flat[lo:hi]
                    rows = np.searchsorted(batch, chosen // plan.positions)
                    part.append(vectors[torch.as_tensor(rows), torch.as_tensor(chosen % plan.positions)])
            done += len(x)
            bar.update(len(x))
    return {name: tuple(torch.cat(part) for part in parts[name]) for name in plans}
