"""Top-K references: for each channel, the K samples on which it is most active.

One streaming forward pass without autograd; memory grows with channels x K, never with the dataset.
A channel's activation map is reduced over positions by ``max`` (zennit-crp's ``max_target="max"``) or
``mean``; equal values go to the smaller sample index. Partial results from shards of the dataset merge
exactly (:meth:`TopK.merge`), which is also how an interrupted pass resumes from its last checkpoint.

Example
-------
>>> import torch
>>> from polypure.attribution.topk import TopK
>>> acc = TopK(channels=2, k=2)
>>> acc.update(torch.tensor([[1., 5.], [3., 5.], [3., 0.]]), torch.arange(3))
>>> acc.indices.tolist()
[[1, 2], [0, 1]]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from polypure.attribution.hooks import forward_to, tap_layers
from polypure.attribution.precision import flags
from polypure.errors import ConfigError, PolypureError

_EMPTY_INDEX = torch.iinfo(torch.int64).max


def channel_statistic(activation: torch.Tensor, statistic: str) -> torch.Tensor:
    """Reduce a layer output (B, C, *positions) to one value per sample and channel.

    ``max`` and ``mean`` reduce over every position (pixels of a CNN map, tokens of a transformer layer,
    which :mod:`polypure.attribution.hooks` records channels first as (B, D, T)); ``cls`` takes the first token, the
    class token of a ViT. A non-spatial output (B, C), such as logits, is its own statistic.
    """
    if activation.ndim == 2:
        return activation
    if statistic == "cls":
        if activation.ndim != 3:
            raise PolypureError(f"topk.statistic 'cls' takes the class token of a (B, T, D) token layer; this layer "
                                f"outputs {tuple(activation.shape[1:])} per sample (channels first)")
        return activation[:, :, 0]
    flat = activation.flatten(2)
    if statistic == "max":
        return flat.amax(dim=2)
    if statistic == "mean":
        return flat.mean(dim=2)
    raise PolypureError(f"topk.statistic must be 'max', 'mean' or 'cls', not {statistic!r}")


class TopK:
    """The running K largest values per channel, with their sample indices and optional payloads.

    Parameters
    ----------
    channels : int
    k : int
    payloads : dict of str to torch.dtype, optional
        Per-(sample, channel) values carried along with each kept entry (e.g. the planted truth).
    """

    def __init__(self, channels: int, k: int, payloads: dict[str, torch.dtype] | None = None):
        self.k = k
        self.values = torch.full((channels, k), -torch.inf)
        self.indices = torch.full((channels, k), _EMPTY_INDEX, dtype=torch.int64)
        self.payloads = {name: torch.zeros((channels, k), dtype=dtype) for name, dtype in (payloads or {}).items()}

    def update(self, values: torch.Tensor, sample_indices: torch.Tensor,
               payloads: dict[str, torch.Tensor] | None = None) -> None:
        """Offer a batch of per-sample statistics.

        Parameters
        ----------
        values : Tensor, shape (B, C)
        sample_indices : Tensor, shape (B,)
        payloads : dict of str to Tensor (B, C), optional
        """
        if torch.isnan(values).any():
            bad = int(sample_indices[torch.isnan(values).any(dim=1)][0])
            raise PolypureError(f"NaN activation at sample {bad}; check the model weights and the input data")
        values = values.detach().float().cpu().T
        indices = sample_indices.detach().cpu().to(torch.int64).view(1, -1).expand_as(values)
        extra = {name: p.detach().cpu().T for name, p in (payloads or {}).items()}
        self._combine(values, indices, extra)

    def _combine(self, values, indices, extra) -> None:
        all_values = torch.cat([self.values, values], dim=1)
        all_indices = torch.cat([self.indices, indices], dim=1)
        by_index = torch.argsort(all_indices, dim=1, stable=True)
        sorted_values = all_values.gather(1, by_index)
        keep = by_index.gather(1, torch.argsort(-sorted_values, dim=1, stable=True)[:, :self.k])
        self.values = all_values.gather(1, keep)
        self.indices = all_indices.gather(1, keep)
        for name in self.payloads:
            joined = torch.cat([self.payloads[name], extra[name].to(self.payloads[name].dtype)], dim=1)
            self.payloads[name] = joined.gather(1, keep)

    def merge(self, other: TopK) -> TopK:
        """Fold in the top-K of another shard of the data (disjoint samples); returns self."""
        self._combine(other.values, other.indices, other.payloads)
        return self

    @property
    def filled(self) -> int:
        """How many of the K slots hold a sample (fewer than K only while fewer samples were seen)."""
        return int((self.indices[0] != _EMPTY_INDEX).sum()) if len(self.indices) else 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(values, indices, payloads)`` as numpy arrays; empty slots hold index -1."""
        indices = self.indices.clone()
        indices[indices == _EMPTY_INDEX] = -1
        return self.values.numpy(), indices.numpy(), {n: p.numpy() for n, p in self.payloads.items()}

    @classmethod
    def from_arrays(cls, values: np.ndarray, indices: np.ndarray,
                    payloads: dict[str, np.ndarray] | None = None) -> TopK:
        """Rebuild a running top-K from stored arrays (to resume or merge)."""
        acc = cls(values.shape[0], values.shape[1])
        acc.values = torch.as_tensor(values, dtype=torch.float32).clone()
        idx = torch.as_tensor(indices, dtype=torch.int64).clone()
        acc.values[idx < 0] = -torch.inf
        idx[idx < 0] = _EMPTY_INDEX
        acc.indices = idx
        acc.payloads = {n: torch.as_tensor(p).clone() for n, p in (payloads or {}).items()}
        return acc


@dataclass
class Scorer:
    """Turns one tapped layer output into per-sample, per-unit values for a top-K.

    Parameters
    ----------
    name : str
        Where the result is stored (``/topk/<name>``).
    layer : str
        The tapped layer it reads.
    channels : int
        Number of units scored.
    fn : callable
        ``fn(output) -> (values (B, units), payloads dict)``.
    payloads : dict of str to torch.dtype
    """

    name: str
    layer: str
    channels: int
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    payloads: dict[str, torch.dtype] = field(default_factory=dict)


def channel_scorer(name: str, channels: int, statistic: str) -> Scorer:
    """The scorer of a real layer: each channel's statistic over positions."""
    return Scorer(name, name, channels, lambda out: (channel_statistic(out, statistic), {}))


def _check_finite(values: torch.Tensor, layer: str, position: int) -> None:
    """A NaN or infinite activation names its layer, sample and channel (bad weights or bad input)."""
    bad = ~torch.isfinite(values)
    if bad.any():
        row, channel = (int(i) for i in bad.nonzero()[0])
        raise ConfigError(f"layer {layer!r}: {float(values[row, channel])} activation at sample {position + row}, "
                          f"channel {channel}; check the model weights and the input data")


def _batches(loader, position: int):
    """The loader's batches; images of different sizes that cannot form a batch are one clear error."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except PolypureError as exc:
            # raised in a loader worker process, it comes back with the worker's traceback in its message
            text = str(exc)
            if "Original Traceback" not in text:
                raise
            last = [line for line in text.splitlines() if line.strip()][-1]
            raise type(exc)(last.split(": ", 1)[1] if last.startswith("polypure.errors.") else last) from None
        except RuntimeError as exc:
            if "stack expects each tensor to be equal size" not in str(exc):
                raise
            raise ConfigError(f"data: the images from sample {position} on differ in size and data.image_size is "
                              f"null (native size); set data.image_size to resize and crop them ({exc})") from None
        position += len(batch[0])
        yield batch


def collect_topk(model: torch.nn.Module, dataset, modules: dict[str, torch.nn.Module], scorers: list[Scorer],
                 k: int, start: int = 0, stop: int | None = None, batch_size: int = 32, num_workers: int = 0,
                 device: str | torch.device = "cpu", states: dict[str, TopK] | None = None,
                 done: dict[str, int] | None = None, checkpoint: Callable[[dict, int], None] | None = None,
                 checkpoint_every: int = 50, progress: bool = True, labels: np.ndarray | None = None
                 ) -> dict[str, TopK]:
    """Stream samples ``start:stop`` of ``dataset`` through ``model`` and keep each scorer's top-K.

    Parameters
    ----------
    model : Module
    dataset : Dataset
        Items ``(input, label)``.
    modules : dict of str to Module
        The layers to tap.
    scorers : list of Scorer
    k : int
    start, stop : int
        The shard of samples to process.
    states : dict of str to TopK, optional
        Running results to continue from (resuming).
    done : dict of str to int, optional
        Per scorer, samples before this index are already in its state and are skipped.
    checkpoint : callable, optional
        ``checkpoint(states, done)`` with ``done`` the per-scorer count of samples in its state; called every
        ``checkpoint_every`` batches, and when the pass stops on an error or interruption.
    progress : bool
        Show a progress bar.
    labels : ndarray of int64, shape (len(dataset),), optional
        Filled in place with the label of each sample streamed (the second part of each item), before
        each checkpoint.

    Returns
    -------
    dict of str to TopK
    """
    stop = len(dataset) if stop is None else stop
    states = states or {}
    # per scorer, the samples already in its state: only these may be skipped on resuming
    done = {s.name: max(start, (done or {}).get(s.name, start)) for s in scorers}
    for scorer in scorers:
        states.setdefault(scorer.name, TopK(scorer.channels, k, scorer.payloads))
    first = min([done[s.name] for s in scorers] + [stop])
    if first >= stop:
        return states
    cuda = torch.device(device).type == "cuda"
    # to a GPU through pinned memory, asynchronously: the next batch's copy overlaps this batch's work
    loader = DataLoader(Subset(dataset, range(first, stop)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, persistent_workers=False, pin_memory=cuda)
    position = first
    bar = tqdm(total=stop - first, desc="top-K", unit="img", disable=not progress, leave=False)
    try:
        with torch.no_grad(), flags(device), tap_layers(modules) as outputs:
            for batch_number, (x, y) in enumerate(_batches(loader, position), 1):
                n = len(x)
                if labels is not None:
                    labels[position:position + n] = np.asarray(y, np.int64)
                forward_to(model, x.to(device, non_blocking=cuda), outputs)
                sample_idx = torch.arange(position, position + n)
                for scorer in scorers:
                    skip = max(0, done[scorer.name] - position)
                    if skip >= n:
                        continue
                    values, payloads = scorer.fn(outputs[scorer.layer])
                    _check_finite(values, scorer.layer, position)
                    states[scorer.name].update(values[skip:], sample_idx[skip:],
                                               {name: p[skip:] for name, p in payloads.items()})
                    done[scorer.name] = position + n
                position += n
                bar.update(n)
                if checkpoint is not None and batch_number % checkpoint_every == 0 and position < stop:
                    checkpoint(states, dict(done))
    except BaseException:
        # a bad image, a crash or Ctrl-C: keep every batch finished so far
        if checkpoint is not None and position > first:
            checkpoint(states, dict(done))
        raise
    finally:
        bar.close()
    return states
