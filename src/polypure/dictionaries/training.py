"""Training a dictionary epoch by epoch, resumable, and measuring it on held-out positions.

:func:`train` builds the kind inside :func:`~polypure.dictionaries.kinds.seeded` (its random initialisation is the
run's), initialises it on the training positions or loads the state of the last checkpoint, and trains the
remaining epochs, each under a seed derived from the run's and the epoch's number; after every epoch it hands
the kind's whole training state to ``checkpoint``. An interrupted training therefore resumes at the epoch
after the last checkpoint and ends with the dictionary an uninterrupted one gives.

:func:`quality` measures a finished dictionary on the held-out positions (docs/method.md, Dictionary spaces):

* ``r2``: ``1 - sum ||a - (z D + bias)||² / sum ||a - mean(a)||²`` over the held-out vectors, the mean taken
  over them;
* ``dead_share``: the share of concepts whose code is zero on every held-out position;
* ``mean_active``: the mean number of non-zero codes per held-out position.

Example
-------
>>> import torch
>>> from polypure.dictionaries.training import quality
>>> class Identity:                      # a dictionary that reconstructs exactly
...     def encode_all(self, x): return x
...     def dictionary(self): return torch.eye(2)
...     def bias(self): return torch.zeros(2)
>>> q = quality(Identity(), torch.tensor([[1., 0.], [0., 2.]]))
>>> q["r2"], q["dead_share"], q["mean_active"]
(1.0, 0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from polypure.dictionaries.kinds import DictionaryKind, make_kind, seeded


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: the same in a resumed training as in an uninterrupted one."""
    return seed * 1_000_003 + epoch + 1


def train(spec, channels: int, train_vectors: torch.Tensor, seed: int, device: torch.device,
          state: dict[str, np.ndarray] | None = None, epochs_done: int = 0,
          checkpoint: Callable[[dict[str, np.ndarray], int], None] | None = None, progress: bool = True
          ) -> DictionaryKind:
    """Train a dictionary for the epochs left, checkpointing after each.

    Parameters
    ----------
    spec : DictionarySection
    channels : int
    train_vectors : Tensor (N, C)
        The training positions, on ``device``.
    seed : int
        The run's seed.
    device : torch.device
    state : dict of str to ndarray, optional
        The training state of the last checkpoint, to resume from (with ``epochs_done``).
    epochs_done : int
        Epochs the checkpoint holds.
    checkpoint : callable, optional
        ``checkpoint(state, epochs_done)``, called after every epoch.
    progress : bool
        Show a progress bar over the epochs.

    Returns
    -------
    DictionaryKind
        Finished (:meth:`~polypure.dictionaries.kinds.DictionaryKind.finish`).
    """
    with seeded(seed, device):
        kind = make_kind(spec, channels, device)
        if state:
            kind.load_training_state(state)
        else:
            epochs_done = 0
            kind.initialise(train_vectors)
    with tqdm(total=spec.epochs, initial=epochs_done, desc=f"dictionary {spec.id}", unit="epoch",
              disable=not progress, leave=False) as bar:
        for epoch in range(epochs_done, spec.epochs):
            with seeded(epoch_seed(seed, epoch), device):
                kind.fit_epoch(train_vectors, epoch, seed)
            if checkpoint is not None:
                checkpoint(kind.training_state(), epoch + 1)
            bar.update(1)
    kind.finish()
    return kind


def quality(kind, heldout: torch.Tensor) -> dict[str, float]:
    """R², share of dead concepts and mean active concepts per position on held-out vectors (N, C)."""
    with torch.no_grad():
        codes = kind.encode_all(heldout)
        dictionary = kind.dictionary().to(codes.device, torch.float64)
        x = heldout.to(torch.float64)
        reconstruction = codes.to(torch.float64) @ dictionary + kind.bias().to(codes.device, torch.float64)
        residual = float(((x - reconstruction) ** 2).sum())
        spread = float(((x - x.mean(dim=0)) ** 2).sum())
        active = codes != 0
    return {"r2": 1.0 - residual / spread if spread > 0 else float("nan"),
            "dead_share": float((~active.any(dim=0)).double().mean()),
            "mean_active": float(active.sum(dim=1).double().mean()),
            "n_heldout": int(len(heldout))}
