"""Planted polysemanticity: virtual neurons made from two real channels, with a known split.

Two channels a, b of one layer whose top-K sets overlap by at most ``max_overlap`` are scaled by
s_a, s_b (the mean of each channel's top-K values) and combined (docs/method.md, Planted neurons):

* ``sum``: v = A_a / s_a + A_b / s_b; the backward pass starts with max(v, 0) / s_a on channel a and
  max(v, 0) / s_b on channel b;
* ``max``: v = max(A_a / s_a, A_b / s_b) per position; the backward pass starts with max(v, 0) / s on
  the winning channel of each position only (ties go to a).

The true split of a reference is which scaled term has the larger spatial maximum (0 = a, 1 = b; ties
go to a). How well clustering recovers it measures disentanglement against a known answer.

Example
-------
>>> import numpy as np
>>> from polypure.attribution.planted import choose_pairs
>>> values = np.ones((4, 3), np.float32)
>>> indices = np.array([[0, 1, 2], [3, 4, 5], [0, 1, 6], [7, 8, 9]])
>>> pairs, scales = choose_pairs(values, indices, n_pairs=2, max_overlap=0.1, seed=0)
>>> len(pairs)
2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from polypure.attribution.topk import channel_statistic
from polypure.errors import PolypureError

MODES = ("sum", "max")


def choose_pairs(values: np.ndarray, indices: np.ndarray, n_pairs: int, max_overlap: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint pairs of channels whose top-K sets overlap by at most ``max_overlap``.

    Parameters
    ----------
    values, indices : ndarray, shape (C, K)
        The layer's top-K.
    n_pairs : int
    max_overlap : float
        Largest allowed fraction of shared references.
    seed : int

    Returns
    -------
    pairs : ndarray (P, 2) int64
    scales : ndarray (P, 2) float32
        Mean top-K value of each channel of the pair.

    Raises
    ------
    PolypureError
        If no pair qualifies (for instance when every channel is dead).
    """
    k = indices.shape[1]
    scale = values.mean(axis=1)
    eligible = np.flatnonzero(np.isfinite(scale) & (scale > 0))
    order = np.random.default_rng(seed).permutation(eligible)
    sets = {int(c): set(indices[c].tolist()) for c in order}
    limit = max_overlap * k
    used: set[int] = set()
    pairs = []
    for i, a in enumerate(order):
        if len(pairs) == n_pairs:
            break
        a = int(a)
        if a in used:
            continue
        for b in order[i + 1:]:
            b = int(b)
            if b not in used and len(sets[a] & sets[b]) <= limit:
                pairs.append((a, b))
                used.update((a, b))
                break
    if not pairs:
        raise PolypureError(f"no pair of channels with active top-K sets overlapping by at most {max_overlap:.0%}")
    pairs = np.array(pairs, np.int64)
    return pairs, scale[pairs].astype(np.float32)


@dataclass
class VirtualNeurons:
    """The virtual neurons of one layer: one per (mode, pair).

    Attributes
    ----------
    pairs : Tensor (V, 2) int64
    scales : Tensor (V, 2) float32
    modes : list of str, one per virtual neuron
    """

    pairs: torch.Tensor
    scales: torch.Tensor
    modes: list[str]

    @classmethod
    def build(cls, pairs: np.ndarray, scales: np.ndarray, modes: list[str]) -> VirtualNeurons:
        """Every pair in every mode, mode by mode."""
        for mode in modes:
            if mode not in MODES:
                raise PolypureError(f"planted mode must be one of {MODES}, not {mode!r}")
        n = len(pairs)
        return cls(torch.as_tensor(np.tile(pairs, (len(modes), 1))),
                   torch.as_tensor(np.tile(scales, (len(modes), 1))),
                   [m for m in modes for _ in range(n)])

    def __len__(self) -> int:
        return len(self.modes)

    def is_max(self, which: torch.Tensor) -> torch.Tensor:
        """Whether each of the virtual neurons ``which`` is gated (``max`` mode)."""
        return torch.tensor([self.modes[i] == "max" for i in which.tolist()], dtype=torch.bool)

    def scored(self, activation: torch.Tensor, statistic: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Top-K statistic and true split of every virtual neuron for a batch of layer outputs.

        Parameters
        ----------
        activation : Tensor (B, C, *positions)
        statistic : {"max", "mean", "cls"}

        Returns
        -------
        values : Tensor (B, V)
        payloads : dict with ``truth`` (B, V) int64
        """
        a = activation[:, self.pairs[:, 0]] / _expand(self.scales[:, 0], activation)
        b = activation[:, self.pairs[:, 1]] / _expand(self.scales[:, 1], activation)
        is_max = _expand(self.is_max(torch.arange(len(self))), activation).to(activation.device)
        v = torch.where(is_max, torch.maximum(a, b), a + b)
        # the unit that wins where the statistic looks: the class token under "cls", anywhere otherwise
        where = (lambda x: channel_statistic(x, "cls")) if statistic == "cls" else _spatial_max
        truth = (where(b) > where(a)).to(torch.int64)
        return channel_statistic(v, statistic), {"truth": truth}

    def init(self, which: torch.Tensor):
        """Initial relevance for rows explaining virtual neurons ``which`` (one per row)."""
        def init(target: torch.Tensor) -> torch.Tensor:
            rows = torch.arange(len(target), device=target.device)
            pairs = self.pairs[which].to(target.device)
            scales = self.scales[which].to(target.device, target.dtype)
            is_max = self.is_max(which).to(target.device)
            scale_a = scales[:, 0].view((-1,) + (1,) * (target.ndim - 2))
            scale_b = scales[:, 1].view((-1,) + (1,) * (target.ndim - 2))
            a = target[rows, pairs[:, 0]] / scale_a
            b = target[rows, pairs[:, 1]] / scale_b
            gate = is_max.view((-1,) + (1,) * (target.ndim - 2))
            a_wins = a >= b
            v = torch.where(gate, torch.maximum(a, b), a + b).clamp(min=0)
            grad = torch.zeros_like(target)
            grad[rows, pairs[:, 0]] = torch.where(gate & ~a_wins, torch.zeros_like(v), v / scale_a)
            grad[rows, pairs[:, 1]] = torch.where(gate & a_wins, torch.zeros_like(v), v / scale_b)
            return grad
        return init


def virtual_neurons(store, planted) -> VirtualNeurons:
    """The virtual neurons of one ``relevance.planted`` entry, from the pairs the store keeps for its layer."""
    pairs, scales = store.planted_pairs(planted.layer)
    return VirtualNeurons.build(pairs, scales, planted.modes)


def _expand(per_unit: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Shape a (V,) tensor to broadcast against (B, V, *positions)."""
    return per_unit.to(activation.device).view((1, -1) + (1,) * (activation.ndim - 2))


def _spatial_max(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).amax(-1) if x.ndim > 2 else x
