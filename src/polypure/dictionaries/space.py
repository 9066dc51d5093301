"""A dictionary space: each reference of a neuron as the contributions of the dictionary's concepts to it.

With a dictionary ``a ≈ z D + bias`` of the layer, neuron ``n``'s activation at a position decomposes as
``a_n ≈ sum_j z_j D[j, n] + bias_n``. For a reference ``x`` of the neuron the codes ``z`` are taken where the
top-K statistic looked (docs/method.md, Dictionary spaces): at the position of the neuron's largest activation
under ``max`` (the first such position), averaged over the positions under ``mean``, at the class token under
``cls`` (a non-spatial output is its own position). The vector ``(z_j D[j, n])_j`` is the reference's point in
the space.

A planted neuron of channels ``a``, ``b`` with scales ``σ_a``, ``σ_b`` (:mod:`polypure.attribution.planted`) is
decomposed by its definition, ``D[j, a] / σ_a + D[j, b] / σ_b`` in both modes, at the position its own statistic
chose (that of the virtual activation ``v``). Nothing here reads which of the two channels wins on a reference:
that is the planted truth the space is scored against.

Only what a neuron needs is kept: its ``T`` concepts with the largest mean contribution over its references
(ties to the smaller concept id), by decreasing mean, with their contributions (:func:`decompose`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from polypure.attribution.hooks import forward_to, tap_layers
from polypure.dictionaries.samples import positions_of

#: Contributions held in memory at once (rows x references x concepts) before the rows are cut in chunks.
CHUNK_VALUES = 2**25


@dataclass
class Readout:
    """How the rows of a target read the layer: the channel weights of their decomposition, their own activation.

    Attributes
    ----------
    weights : Tensor (M, C)
        Row ``m``'s activation is ``weights[m] · a`` (one-hot for a real channel; ``1/σ_a``, ``1/σ_b`` for a
        planted neuron).
    pairs, scales : Tensor (M, 2), optional
        A planted target's channels and scales per row; None for real channels.
    gated : Tensor (M,) of bool, optional
        Which planted rows combine by ``max`` (the others by ``sum``).
    """

    weights: torch.Tensor
    pairs: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    gated: torch.Tensor | None = None

    def activation(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each row's own activation at every position: (B, P) from position vectors (B, P, C), one row each."""
        if self.pairs is None:
            channel = self.weights[rows].argmax(dim=1).to(vectors.device)
            return vectors.gather(2, channel.view(-1, 1, 1).expand(-1, vectors.shape[1], 1)).squeeze(2)
        pairs = self.pairs[rows].to(vectors.device)
        scales = self.scales[rows].to(vectors.device, vectors.dtype)
        a = vectors.gather(2, pairs[:, :1].view(-1, 1, 1).expand(-1, vectors.shape[1], 1)).squeeze(2) / scales[:, :1]
        b = vectors.gather(2, pairs[:, 1:].view(-1, 1, 1).expand(-1, vectors.shape[1], 1)).squeeze(2) / scales[:, 1:]
        return torch.where(self.gated[rows].view(-1, 1).to(vectors.device), torch.maximum(a, b), a + b)


def channel_readout(neurons: np.ndarray, channels: int) -> Readout:
    """The readout of real channels ``neurons`` of a layer with ``channels`` channels."""
    weights = torch.zeros((len(neurons), channels))
    weights[torch.arange(len(neurons)), torch.as_tensor(np.asarray(neurons, np.int64))] = 1.0
    return Readout(weights)


def planted_readout(virtual, ids: np.ndarray, channels: int) -> Readout:
    """The readout of planted virtual neurons ``ids`` (:class:`~polypure.attribution.planted.VirtualNeurons`)."""
    ids = torch.as_tensor(np.asarray(ids, np.int64))
    pairs = virtual.pairs[ids].to(torch.int64)
    scales = virtual.scales[ids].to(torch.float32)
    weights = torch.zeros((len(ids), channels))
    rows = torch.arange(len(ids))
    weights[rows, pairs[:, 0]] += 1.0 / scales[:, 0]
    weights[rows, pairs[:, 1]] += 1.0 / scales[:, 1]
    return Readout(weights, pairs, scales, virtual.is_max(ids))


def _layer_outputs(model, dataset, module, samples: np.ndarray, batch_size: int, num_workers: int,
                   device) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, channels-first output (B, C, *positions))`` of samples, batch by batch (``offset``: into ``samples``)."""
    cuda = torch.device(device).type == "cuda"
    loader = DataLoader(Subset(dataset, samples.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=cuda)
    offset = 0
    with torch.no_grad(), tap_layers({"layer": module}) as outputs:
        for x, _ in loader:
            forward_to(model, x.to(device, non_blocking=cuda), outputs)
            yield offset, outputs["layer"].float()
            offset += len(x)


def _layer_vectors(model, dataset, module, samples: np.ndarray, batch_size: int, num_workers: int,
                   device) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, position vectors (B, P, C))`` of samples, batch by batch (``offset``: into ``samples``)."""
    for offset, output in _layer_outputs(model, dataset, module, samples, batch_size, num_workers, device):
        yield offset, positions_of(output)


def encoded_outputs(kind, model, dataset, module, samples: np.ndarray, batch_size: int = 32, num_workers: int = 0,
                    device="cpu", outputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output on samples and its codes at every position, each sample forwarded once.

    What the ablation of a dictionary's concepts edits (:class:`~polypure.attribution.ablation.ConceptSubtraction`):
    the unedited output, and the codes ``z(a(x, p))`` of every position of it.

    Parameters
    ----------
    kind : DictionaryKind
        A finished dictionary (rebuilt from the store).
    model, dataset, module
        The network, the samples and the dictionary's layer.
    samples : ndarray of int
        Sample indices.
    outputs : Tensor (U, C, *positions), optional
        The layer's output on the samples, where already computed (for another dictionary of the layer).

    Returns
    -------
    outputs : Tensor (U, C, *positions)
        Channels first, in the order of ``samples``.
    codes : Tensor (U, P, n_concepts)
        Positions in the order of :func:`~polypure.dictionaries.samples.positions_of`.
    """
    if outputs is None:
        outputs = torch.cat([output for _, output in _layer_outputs(model, dataset, module, np.asarray(samples),
                                                                    batch_size, num_workers, device)])
    vectors = positions_of(outputs)
    count, positions, channels = vectors.shape
    # encoded all at once, in the kind's chunks: an NMF's codes cost a fixed number of sweeps per call
    codes = kind.encode_all(vectors.reshape(count * positions, channels)).reshape(count, positions, -1)
    return outputs, codes


def codes_at_references(kind, model, dataset, module, readout: Readout, refs: np.ndarray, statistic: str,
                        batch_size: int = 32, num_workers: int = 0, device="cpu") -> torch.Tensor:
    """The codes of every (row, reference) pair where the statistic looked: (M, n_refs, n_concepts).

    Each reference image is forwarded once; each pair's vector is encoded at its row's position, or every
    position of the image is encoded and the codes averaged under ``mean``.
    """
    samples, inverse = np.unique(refs, return_inverse=True)
    inverse = inverse.reshape(refs.shape)
    rows, ref = np.divmod(np.argsort(inverse, axis=None, kind="stable"), refs.shape[1])
    where = inverse[rows, ref]
    out = None
    with torch.no_grad():
        for offset, vectors in _layer_vectors(model, dataset, module, samples, batch_size, num_workers, device):
            batch, positions, channels = vectors.shape
            lo, hi = np.searchsorted(where, [offset, offset + batch])
            pair_rows, pair_refs = torch.as_tensor(rows[lo:hi]), torch.as_tensor(ref[lo:hi])
            local = torch.as_tensor(where[lo:hi] - offset)
            if statistic == "mean" and positions > 1:
                codes = kind.encode_all(vectors.reshape(batch * positions, channels)).reshape(batch, positions, -1)
                chosen = codes[local].mean(dim=1)
            else:
                if statistic == "cls" or positions == 1:
                    position = torch.zeros(len(local), dtype=torch.int64)
                else:
                    # the first position of the row's largest activation, as torch.argmax picks it
                    position = readout.activation(vectors[local], pair_rows).argmax(dim=1).cpu()
                chosen = kind.encode_all(vectors[local, position])
            if out is None:
                out = torch.zeros((*refs.shape, chosen.shape[1]), device=chosen.device)
            out[pair_rows, pair_refs] = chosen
    return out


def decompose(kind, dictionary: torch.Tensor, model, dataset, module, readout: Readout, refs: np.ndarray,
              statistic: str, keep: int, batch_size: int = 32, num_workers: int = 0, device="cpu"
              ) -> tuple[np.ndarray, np.ndarray]:
    """The dictionary space of a target's rows: each row's kept concepts and their contributions.

    Parameters
    ----------
    kind : DictionaryKind
        A finished dictionary (rebuilt from the store).
    dictionary : Tensor (n_concepts, C)
    model, dataset, module
        The network, the samples and the dictionary's layer.
    readout : Readout
        The rows (:func:`channel_readout`, :func:`planted_readout`).
    refs : ndarray (M, n_refs)
        The references of each row (sample indices).
    statistic : {"max", "mean", "cls"}
        The top-K statistic of the target.
    keep : int
        Concepts kept per row.

    Returns
    -------
    concepts : ndarray (M, keep) int64
        By decreasing mean contribution over the row's references.
    contributions : ndarray (M, n_refs, keep) float32
    """
    n_concepts = dictionary.shape[0]
    keep = min(keep, n_concepts)
    chunk = max(1, CHUNK_VALUES // max(1, refs.shape[1] * n_concepts))
    concepts = np.zeros((len(refs), keep), np.int64)
    contributions = np.zeros((*refs.shape, keep), np.float32)
    for start in range(0, len(refs), chunk):
        stop = min(start + chunk, len(refs))
        part = Readout(readout.weights[start:stop],
                       *(None if t is None else t[start:stop] for t in (readout.pairs, readout.scales, readout.gated)))
        codes = codes_at_references(kind, model, dataset, module, part, refs[start:stop], statistic, batch_size,
                                    num_workers, device)
        # weight of each concept in each row's activation: D[j, n], or D[j, a] / s_a + D[j, b] / s_b
        loadings = part.weights.to(codes.device) @ dictionary.to(codes.device, torch.float32).T
        values = codes * loadings[:, None, :]
        order = torch.argsort(-values.mean(dim=1), dim=1, stable=True)[:, :keep]
        concepts[start:stop] = order.cpu().numpy()
        contributions[start:stop] = values.gather(2, order[:, None, :].expand(-1, refs.shape[1], -1)).cpu().numpy()
    return concepts, contributions
