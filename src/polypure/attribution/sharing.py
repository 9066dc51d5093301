"""Which (neuron, reference) rows share a forward pass: one forward of an image, backward passes for all its rows.

Neurons of one target share references, and a row's backward pass needs only its own image's forward graph.
A :class:`SharedBatch` forwards ``F`` rows (each a copy of one image) once and runs ``S`` backward passes over
that graph, the *slots*; every (neuron, reference) row has one forward row and one slot, and the initial
gradient of each slot is zero on the forward rows no row of that slot uses
(:meth:`polypure.attribution.engine.ConditionalRelevance.explain`).

Why ``F`` is fixed: a CPU convolution's backward pass (oneDNN) shares its work among threads by the
batch size, and with it the order of its sums, so the gradient of one row can change in its last bit with
the number of rows in the pass (measured: 1 and 3 of 1..40 rows with 2 threads, 8 of them with 8), never
with which rows they are (the position and the content of the other rows do not matter;
``tests/test_sharing.py`` checks both). :func:`plan_batches` therefore keeps every forward and backward
pass above the lowest attribution layer at the size the rows had without sharing, and a row's relevance is
the same float32 number whether its forward was shared or not. Below that layer each pass forwards its
distinct images, as the pass without sharing forwarded its own; forward convolutions give a row the same
numbers at any batch size from two up, and one image alone is computed another way (PyTorch picks another
convolution), so a lone image is forwarded as two. :func:`polypure.attribution.relevance_plan.plan_unit`
keeps the passes without sharing (:func:`unshared`) where the planned ones would cost more.

Example
-------
>>> import numpy as np
>>> from polypure.attribution.sharing import plan_batches
>>> samples = np.array([7, 7, 7, 7, 3, 3, 3, 3])       # image of each row: two images, four rows each
>>> batch, = plan_batches(samples, size=4, backward_cost=1.0)
>>> batch.slots_count, batch.samples.tolist(), len(batch.forward)
(2, [3, 7], 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SharedBatch:
    """One forward pass of ``len(forward)`` rows and the backward passes (slots) of the rows it serves.

    Attributes
    ----------
    samples : ndarray (D,)
        Sample index of each image the pass loads (each once; a lone image is listed twice, see
        :func:`plan_batches`).
    forward : ndarray (F,)
        Position in ``samples`` of each forward row.
    rows : ndarray (P,)
        The rows served, as positions in the caller's list of rows.
    forward_rows : ndarray (P,)
        Forward row of each row served.
    slots : ndarray (P,)
        Backward pass of each row served; a (forward row, slot) pair serves at most one row.
    """

    samples: np.ndarray
    forward: np.ndarray
    rows: np.ndarray
    forward_rows: np.ndarray
    slots: np.ndarray

    @property
    def slots_count(self) -> int:
        """Backward passes over the forward graph."""
        return int(self.slots.max()) + 1 if len(self.slots) else 0

    def cost(self, backward_cost: float) -> float:
        """Forward rows plus ``backward_cost`` times backward rows, in units of one row's forward pass."""
        return len(self.forward) * (1.0 + backward_cost * self.slots_count)


def unshared(samples: np.ndarray, rows: np.ndarray | None = None) -> SharedBatch:
    """The pass without sharing: one forward row and one backward row per row, each image loaded once."""
    rows = np.arange(len(samples)) if rows is None else np.asarray(rows)
    unique, forward = np.unique(samples, return_inverse=True)
    return SharedBatch(unique, forward.reshape(-1), rows, np.arange(len(samples)), np.zeros(len(samples), np.int64))


def _runs(samples: np.ndarray, size: int, backward_cost: float) -> list[SharedBatch]:
    """Images by rows (most first) cut into runs of one pass each, cuts and slots by dynamic programming."""
    samples = np.asarray(samples)
    order = np.argsort(samples, kind="stable")
    images, first, counts = np.unique(samples[order], return_index=True, return_counts=True)
    by_rows = np.lexsort((images, -counts))
    m = counts[by_rows]
    n = len(m)
    # ends[s - 1][i]: the end of the longest run from image i whose forward rows fit one pass with s slots
    options = np.arange(1, int(m.max()) + 1)
    ends = []
    for slots in options:
        used = np.concatenate(([0], np.cumsum(-(-m // slots))))
        end = np.searchsorted(used, used[:-1] + size, side="right") - 1
        ends.append(np.where(end > np.arange(n), end, -1))         # -1: one image alone needs more rows
    ends = np.stack(ends)
    pass_cost = size * (1.0 + backward_cost * options)
    best = np.zeros(n + 1)
    choice = np.zeros(n, np.int64)
    for i in range(n - 1, -1, -1):
        total = np.where(ends[:, i] >= 0, pass_cost + best[np.maximum(ends[:, i], 0)], np.inf)
        choice[i] = int(np.argmin(total))
        best[i] = total[choice[i]]
    batches = []
    i = 0
    while i < n:
        slots, end = int(options[choice[i]]), int(ends[choice[i], i])
        copies, rows, forward_rows, slot_of = [], [], [], []
        for image in by_rows[i:end]:
            mine = order[first[image]:first[image] + counts[image]]
            for start in range(0, len(mine), slots):
                rows.extend(mine[start:start + slots].tolist())
                forward_rows.extend([len(copies)] * len(mine[start:start + slots]))
                slot_of.extend(range(len(mine[start:start + slots])))
                copies.append(int(image))
        copies.extend([copies[0]] * (size - len(copies)))
        batches.append(_batch(images, copies, rows, forward_rows, slot_of))
        i = end
    return batches


def _served(remaining: np.ndarray, size: int, slots: int) -> int:
    """Rows that ``size`` forward rows with ``slots`` slots serve, filled with whole copies first."""
    whole = int((remaining // slots).sum())
    if whole >= size:
        return size * slots
    # the largest remainders fill the forward rows left: count the images per remainder, largest first
    per_rest = np.bincount(remaining % slots, minlength=slots)[:0:-1]
    values = np.arange(slots - 1, 0, -1)
    taken = np.minimum(per_rest, np.maximum(0, size - whole - np.concatenate(([0], np.cumsum(per_rest)[:-1]))))
    return whole * slots + int((taken * values).sum())


def _greedy(samples: np.ndarray, size: int, value_cost: float, first_slots: int | None = None) -> list[SharedBatch]:
    """Passes one at a time, each with the slots that serve most rows per unit of cost (``value_cost`` per slot).

    ``first_slots`` fixes the slots of the first pass instead.
    """
    samples = np.asarray(samples)
    order = np.argsort(samples, kind="stable")
    images, first, counts = np.unique(samples[order], return_index=True, return_counts=True)
    remaining = counts.copy()
    batches = []
    while remaining.any():
        live = np.flatnonzero(remaining)
        best, slots = -1.0, 1
        for candidate in range(1, int(remaining[live].max()) + 1):
            value = _served(remaining[live], size, candidate) / (1.0 + value_cost * candidate)
            if value > best * (1 + 1e-9):
                best, slots = value, candidate
        if first_slots is not None and not batches:
            slots = min(first_slots, int(remaining[live].max()))
        # whole copies (slots rows each) of the images with most rows left, then one of each with rows left over
        live = live[np.lexsort((images[live], -remaining[live]))]
        copies = np.repeat(live, remaining[live] // slots)[:size]
        if len(copies) < size:
            left = remaining.copy()
            np.subtract.at(left, copies, slots)
            partial = np.flatnonzero(left > 0)
            partial = partial[np.lexsort((images[partial], -left[partial]))][:size - len(copies)]
            copies = np.concatenate([copies, partial])
        copies = np.concatenate([copies, np.repeat(copies[:1], size - len(copies))])
        rows, forward_rows, slot_of = [], [], []
        for position, image in enumerate(copies.tolist()):
            take = min(slots, int(remaining[image]))
            done = counts[image] - remaining[image]
            rows.extend(order[first[image] + done:first[image] + done + take].tolist())
            forward_rows.extend([position] * take)
            slot_of.extend(range(take))
            remaining[image] -= take
        batches.append(_batch(images, copies, rows, forward_rows, slot_of))
    return batches


def _batch(images, copies, rows, forward_rows, slots) -> SharedBatch:
    used, forward = np.unique(np.asarray(copies), return_inverse=True)
    loaded = images[used]
    if len(loaded) == 1 and len(copies) > 1:
        # below the lowest attribution layer a lone image runs as two: a pass of one image computes otherwise
        loaded = np.repeat(loaded, 2)
    return SharedBatch(loaded, forward.reshape(-1), np.asarray(rows, np.int64), np.asarray(forward_rows, np.int64),
                       np.asarray(slots, np.int64))


#: The slots of the first pass the greedy plans of :func:`plan_batches` are also tried with.
_FIRST_SLOTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def plan_batches(samples: np.ndarray, size: int, backward_cost: float) -> list[SharedBatch]:
    """Forward passes of exactly ``size`` rows, and their slots, that serve every row of ``samples``.

    The cheapest (``size * (1 + backward_cost * S)`` per pass of ``S`` slots, in forward rows) of a few plans:

    * runs: the images, ordered by their number of rows ``m`` (most first), cut into runs, each a pass with
      ``S`` slots in which an image gets ``ceil(m / S)`` forward rows; the cuts and each run's ``S`` minimise
      the cost (dynamic programming);
    * greedy: one pass at a time, with the ``S`` that serves most rows per unit of cost, its forward rows
      whole copies (``S`` rows each) of the images with most rows left, then one copy of each image with rows
      left over; an image's rows may spread over passes. Run with the slot cost at 1/2, 1 and 2 times
      ``backward_cost``, and with the first pass's ``S`` fixed at each of :data:`_FIRST_SLOTS` (what that pass
      leaves decides how well the last passes fill).

    Forward rows a pass leaves free are copies whose slots stay empty. An image forwarded alone is listed
    twice in ``samples`` of its pass, so that the layers below the lowest attribution layer never run on one
    image where the rows ran on more (PyTorch computes a one-image convolution another way).

    Parameters
    ----------
    samples : ndarray (R,)
        Sample index of every row; all rows ran in passes of ``size`` rows without sharing.
    size : int
        Rows of every forward and backward pass.
    backward_cost : float
        A backward row's cost in forward rows.

    Returns
    -------
    list of SharedBatch
        ``rows`` index ``samples``; every row is served once.
    """
    plans = [_runs(samples, size, backward_cost)]
    plans += [_greedy(samples, size, factor * backward_cost) for factor in (0.5, 1.0, 2.0)]
    most = int(np.unique(np.asarray(samples), return_counts=True)[1].max()) if len(samples) else 1
    plans += [_greedy(samples, size, backward_cost, first_slots=slots) for slots in _FIRST_SLOTS if slots <= most]
    return min(plans, key=lambda plan: sum(batch.cost(backward_cost) for batch in plan))
