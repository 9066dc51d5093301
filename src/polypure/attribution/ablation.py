"""A neuron's activation with parts of a lower (or its own) layer removed, many removals per forward pass.

:class:`Ablation` runs a neuron's references through the network with each of A *edits* of layer ``L``'s
output applied for the rest of the forward pass, which stops at the target layer. Two kinds of edit:

* :class:`ChannelMasks`: per edit a keep mask over the C channels of ``L``; the masked channels are set to
  zero at every position (the circuits of a relevance space);
* :class:`ConceptSubtraction`: per edit a set of a dictionary's concepts, whose terms ``z_j D[j, :]`` are
  subtracted from ``L``'s output at every position, the codes ``z`` those of the unedited output (the circuits
  of a dictionary space, :mod:`polypure.dictionaries`).

Every image is forwarded once below ``L`` where every path to the target runs through ``L``
(:func:`polypure.attribution.hooks.passes_through`); above it each (edit, image) pair gets a row of its own,
the edits stacked in one batch of at most ``batch_size`` rows (always whole edits). :meth:`Ablation.batch`
does this for several neurons at once, their rows sharing passes where they fit: fewer, larger operations,
which matters most on a CPU that other processes share. Where ``L`` is the target
layer itself nothing of the network runs between the edit and the neuron: the unedited output is computed once
(or given) and the neuron's activation is read from each edited copy of it.

What the neuron's activation is comes from the caller (:func:`channel_activation` for a real channel,
:func:`planted_activation` for a planted virtual neuron): a function of the target layer's channels-first
output, one value per row. Used by the selectivity stage (:mod:`polypure.pipeline.selectivity_stage`,
docs/method.md, Causal selectivity).

Example
-------
>>> import torch
>>> from torch import nn
>>> from polypure.attribution.ablation import Ablation, channel_activation
>>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
>>> ablate = Ablation(net, "relu", net[1], net[2])
>>> keep = torch.tensor([[True] * 4, [False, True, True, True]])
>>> ablate(torch.rand(5, 3, 8, 8), keep, channel_activation(0, "max")).shape
(2, 5)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from polypure.attribution.hooks import forward_to, passes_through, tap_layers
from polypure.attribution.planted import VirtualNeurons
from polypure.attribution.precision import flags
from polypure.attribution.topk import channel_statistic
from polypure.errors import PolypureError

_TARGET = "\0target"


def channel_activation(channel: int, statistic: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A real neuron's activation: its top-K statistic (:func:`~polypure.attribution.topk.channel_statistic`), clamped at 0."""
    def activation(output: torch.Tensor) -> torch.Tensor:
        return channel_statistic(output[:, channel:channel + 1], statistic)[:, 0].clamp(min=0)
    return activation


def planted_activation(virtual: VirtualNeurons, neuron: int, statistic: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A planted virtual neuron's activation: the statistic of its definition (sum or max of the scaled pair), clamped at 0."""
    one = VirtualNeurons(virtual.pairs[[neuron]], virtual.scales[[neuron]], [virtual.modes[neuron]])

    def activation(output: torch.Tensor) -> torch.Tensor:
        return one.scored(output, statistic)[0][:, 0].clamp(min=0)
    return activation


class ChannelMasks:
    """Edits that zero channels: per edit, a keep mask over the layer's C channels (False: set to 0 everywhere).

    Parameters
    ----------
    keep : Tensor or ndarray of bool, shape (A, C)
        A mask of all True leaves the layer as it is.
    """

    def __init__(self, keep: torch.Tensor | np.ndarray):
        self.keep = torch.as_tensor(np.asarray(keep, bool))

    def __len__(self) -> int:
        return len(self.keep)

    def to(self, device: torch.device) -> ChannelMasks:
        """The same edits on ``device``."""
        return ChannelMasks(self.keep.to(device))

    def part(self, start: int, stop: int) -> ChannelMasks:
        """Edits ``start`` to ``stop``."""
        return ChannelMasks(self.keep[start:stop])

    def apply_(self, rows: torch.Tensor, image_rows: torch.Tensor, edit_rows: torch.Tensor, layer: str
               ) -> torch.Tensor:
        """Edit rows (R, C, *positions) of the layer's output in place, row ``r`` by edit ``edit_rows[r]``."""
        if rows.shape[1] != self.keep.shape[1]:
            raise PolypureError(f"layer {layer!r} has {rows.shape[1]} channels, the masks {self.keep.shape[1]}")
        return rows.mul_(self.keep[edit_rows].to(rows.dtype).view(len(rows), -1, *([1] * (rows.ndim - 2))))


class ConceptSubtraction:
    """Edits that remove a dictionary's concepts: ``a(p) - sum_{j in S} z_j(p) D[j, :]`` at every position ``p``.

    Parameters
    ----------
    codes : Tensor, shape (U, P, T)
        Per image (in the order of the images the ablation runs) and position (that of
        :func:`~polypure.dictionaries.samples.positions_of`), the codes of the T concepts edits may remove,
        encoded from the unedited output.
    dictionary : Tensor, shape (T, C)
        Those concepts' rows of the dictionary.
    keep : Tensor or ndarray of bool, shape (A, T)
        Per edit, the concepts left in (False: its term subtracted). A mask of all True leaves the layer as it is.
    """

    def __init__(self, codes: torch.Tensor, dictionary: torch.Tensor, keep: torch.Tensor | np.ndarray):
        self.codes = torch.as_tensor(codes)
        self.dictionary = torch.as_tensor(dictionary)
        self.keep = torch.as_tensor(np.asarray(keep, bool))
        if self.codes.shape[2] != self.dictionary.shape[0] or self.keep.shape[1] != self.dictionary.shape[0]:
            raise PolypureError(f"concept subtraction: codes of {self.codes.shape[2]} concepts, a dictionary of "
                                f"{self.dictionary.shape[0]} and masks over {self.keep.shape[1]}")

    def __len__(self) -> int:
        return len(self.keep)

    def to(self, device: torch.device) -> ConceptSubtraction:
        """The same edits on ``device``."""
        return ConceptSubtraction(self.codes.to(device), self.dictionary.to(device), self.keep.to(device))

    def part(self, start: int, stop: int) -> ConceptSubtraction:
        """Edits ``start`` to ``stop``."""
        return ConceptSubtraction(self.codes, self.dictionary, self.keep[start:stop])

    def apply_(self, rows: torch.Tensor, image_rows: torch.Tensor, edit_rows: torch.Tensor, layer: str
               ) -> torch.Tensor:
        """Edit rows (R, C, *positions) of the layer's output in place, row ``r`` by edit ``edit_rows[r]``."""
        positions = int(np.prod(rows.shape[2:], dtype=np.int64)) if rows.ndim > 2 else 1
        if rows.shape[1] != self.dictionary.shape[1] or positions != self.codes.shape[1]:
            raise PolypureError(f"layer {layer!r} has {rows.shape[1]} channels at {positions} positions, the "
                                f"dictionary {self.dictionary.shape[1]} channels and the codes {self.codes.shape[1]} "
                                "positions")
        removed = (~self.keep[edit_rows]).to(rows.dtype)
        # (C, T) @ (R, T, P): per row, channel and position the sum of the removed concepts' terms
        terms = self.dictionary.to(rows.dtype).T @ (self.codes[image_rows].to(rows.dtype) * removed[:, None, :]).mT
        return rows.sub_(terms.view(rows.shape))


@dataclass
class Request:
    """One neuron's share of an :meth:`Ablation.batch`: its images, the edits to apply, its activation.

    Attributes
    ----------
    images : Tensor (U, ...) or None
        Model inputs; None only with ``layer_output`` where the edited layer is the target.
    edits : ChannelMasks or ConceptSubtraction
    activation : callable
        ``activation(target_output) -> (rows,)``.
    layer_output : Tensor (U, C, *positions), optional
        Where the edited layer is the target: its unedited output on the images, if already computed.
    """

    images: torch.Tensor | None
    edits: ChannelMasks | ConceptSubtraction
    activation: Callable[[torch.Tensor], torch.Tensor]
    layer_output: torch.Tensor | None = None

    @property
    def count(self) -> int:
        """Images of the request."""
        return len(self.layer_output) if self.layer_output is not None else len(self.images)


def as_edits(edits) -> ChannelMasks | ConceptSubtraction:
    """Edits as given, or a keep mask (A, C) of bool as :class:`ChannelMasks`."""
    return edits if isinstance(edits, (ChannelMasks, ConceptSubtraction)) else ChannelMasks(edits)


class Ablation:
    """The activation of neurons under stacked edits of one layer.

    Parameters
    ----------
    model : Module
        The network (in eval mode; nothing in it is changed).
    layer : str
        The edited layer's name.
    module : Module
        Its module.
    target : Module
        The target layer's module: the forward pass stops once it has run. It may be ``module`` itself.
    device : torch.device or str
        Where the model computes (in float32, TF32 off on CUDA).
    batch_size : int
        (edit, image) rows per forward pass at the most; a pass holds at least one whole edit. Several
        neurons' rows share a pass where they fit (:meth:`batch`): fewer, larger operations.
    """

    def __init__(self, model: nn.Module, layer: str, module: nn.Module, target: nn.Module,
                 device: torch.device | str = "cpu", batch_size: int = 512):
        self.model = model
        self.layer = layer
        self.module = module
        self.target = target
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        # decided on the first call, with its first image: whether the rows above the layer may share the forward
        self.share: bool | None = None

    @property
    def at_target(self) -> bool:
        """Whether the edited layer is the target layer: nothing of the network runs between the edit and the neuron."""
        return self.module is self.target

    def __call__(self, images: torch.Tensor | None, edits, activation: Callable[[torch.Tensor], torch.Tensor],
                 layer_output: torch.Tensor | None = None) -> np.ndarray:
        """The neuron's activation on every image under every edit.

        Parameters
        ----------
        images : Tensor, shape (U, ...), or None
            Model inputs; None only with ``layer_output`` at the target layer.
        edits : ChannelMasks or ConceptSubtraction, or a keep mask (A, C) of bool
            A (A, C) mask is :class:`ChannelMasks`: the channels where it is False are zeroed.
        activation : callable
            ``activation(target_output) -> (rows,)``, for the channels-first output of the target layer.
        layer_output : Tensor, shape (U, C, *positions), optional
            Where the edited layer is the target: its unedited output on the images, if already computed.

        Returns
        -------
        ndarray, shape (A, U), float64
        """
        return self.batch([Request(images, as_edits(edits), activation, layer_output)])[0]

    def batch(self, requests: list[Request]) -> list[np.ndarray]:
        """:meth:`__call__` for several neurons: each request's activations (A, U), float64.

        Each request is cut into pieces of whole edits with at most ``batch_size`` rows (one edit at least), and
        consecutive pieces share a forward pass while their rows fit in ``batch_size``.
        """
        out = [np.zeros((len(as_edits(r.edits)), r.count)) for r in requests]
        if self.share is None and not self.at_target and requests:
            # with autograd, so before inference mode
            self.share = passes_through(self.model, self.module, self.target, requests[0].images[:1].to(self.device))
        # no autograd at all (inference mode is a third faster than no_grad on a CPU); float32, TF32 off
        with torch.inference_mode(), flags(self.device, "fp32"):
            pieces = []
            for index, request in enumerate(requests):
                edits = as_edits(request.edits).to(self.device)
                clean = request.layer_output
                if self.at_target:
                    # the edited layer's unedited output, once per request however many pieces it makes
                    clean = (clean if clean is not None else self._layer_output(request.images)).to(self.device)
                per_pass = max(1, self.batch_size // max(1, request.count))
                for start in range(0, len(edits), per_pass):
                    pieces.append((index, start, Request(request.images, edits.part(start, start + per_pass),
                                                         request.activation, clean)))
            packs, rows = [], self.batch_size + 1
            for piece in pieces:
                size = len(piece[2].edits) * piece[2].count
                if rows + size > self.batch_size:
                    packs.append([])
                    rows = 0
                packs[-1].append(piece)
                rows += size
            for pack in packs:
                values = self._at_target(pack) if self.at_target else self._pass([p[2] for p in pack])
                for (index, start, piece), value in zip(pack, values):
                    done = len(piece.edits)
                    out[index][start:start + done] = value.view(done, piece.count).double().cpu().numpy()
        return out

    def _rows(self, edits: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows edit-major: the image and the edit of each of ``edits * n`` rows."""
        return (torch.arange(n, device=self.device).repeat(edits),
                torch.arange(edits, device=self.device).repeat_interleave(n))

    def _at_target(self, pack: list) -> list[torch.Tensor]:
        """The edited layer is the target: each piece's activations read from its edited copies of the layer's output."""
        out = []
        for _, _, piece in pack:
            image_rows, edit_rows = self._rows(len(piece.edits), piece.count)
            edited = piece.edits.apply_(piece.layer_output[image_rows], image_rows, edit_rows, self.layer)
            out.append(piece.activation(edited).float())
        return out

    def _layer_output(self, images: torch.Tensor) -> torch.Tensor:
        """The unedited output of the layer on the images, one forward pass."""
        with tap_layers({self.layer: self.module}) as outputs:
            forward_to(self.model, images.to(self.device), outputs)
        return outputs[self.layer]

    def _pass(self, pieces: list[Request]) -> list[torch.Tensor]:
        """One forward pass of several pieces: per piece its rows edit-major, the pieces one after the other."""
        images = torch.cat([piece.images for piece in pieces]).to(self.device)
        offsets = np.cumsum([0] + [piece.count for piece in pieces])
        layout = [(offset, *self._rows(len(piece.edits), piece.count)) for offset, piece in zip(offsets, pieces)]
        sizes = [len(image_rows) for _, image_rows, _ in layout]

        def edited(output: torch.Tensor) -> torch.Tensor:
            # a copy of the layer's output with a row per (piece, edit, image), edited in place piece by piece
            rows = output[torch.cat([image_rows + int(offset) for offset, image_rows, _ in layout])] if self.share \
                else output.clone()
            start = 0
            for piece, (_, image_rows, edit_rows), size in zip(pieces, layout, sizes):
                piece.edits.apply_(rows[start:start + size], image_rows, edit_rows, self.layer)
                start += size
            return rows

        x = images if self.share else images[torch.cat([image_rows + int(offset) for offset, image_rows, _ in layout])]
        with tap_layers({self.layer: self.module, _TARGET: self.target}, transforms={self.layer: edited}) as outputs:
            forward_to(self.model, x, outputs)
            if _TARGET not in outputs:
                raise PolypureError(f"the target layer did not run in the forward pass ablating {self.layer!r}")
            target = outputs[_TARGET]
        return [piece.activation(part).float() for piece, part in zip(pieces, target.split(sizes))]
