"""Relevance work: which targets and neurons, with which rule, computed chunk by chunk.

A :class:`TargetPlan` names a target (a layer's real channels, or its planted virtual neurons), its
neurons and attribution layers; a :class:`Rule` names the composite, canonizers and the activation
product and builds the engine (:class:`polypure.attribution.engine.ConditionalRelevance`);
:func:`compute_target` explains any subset of a target's rows, forwarding an image once for all the rows
of neighbouring neurons that use it (:mod:`polypure.attribution.sharing`), and hands each finished group of
whole neurons to a writer. All three are plain data or plain functions, so a
range of neurons can be computed in another process (:func:`polypure.pipeline.work_units.relevance_rows`); the stage
that writes the store is :mod:`polypure.pipeline.relevance_stage`.

Example
-------
>>> import numpy as np
>>> from polypure.attribution.relevance_plan import select_neurons
>>> select_neurons("2:5", channels=8).tolist()
[2, 3, 4]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from polypure.attribution.composites import (
    automatic_canonizers,
    composite_kwargs,
    input_bounds,
    make_composite,
    times_activation,
)
from polypure.attribution.engine import ConditionalRelevance, channel_init
from polypure.attribution.planted import VirtualNeurons
from polypure.attribution.precision import auto_batch_size, to_device
from polypure.attribution.sharing import SharedBatch, plan_batches, unshared
from polypure.config.selection import select_neurons
from polypure.errors import ConfigError
from polypure.store.schema import planted_target

INIT_REL = "clamp(min=0)"


@dataclass
class TargetPlan:
    """One target of the relevance stage (plain data: it pickles to worker processes).

    Attributes
    ----------
    name : str
        Store name (``block_3`` or ``block_3@planted``).
    layer : str
        The real layer whose output is the backward pass's start.
    neurons : ndarray (M,)
        Channel ids, or virtual-neuron ids for a planted target.
    attribution_layers : list of str
    virtual : VirtualNeurons, optional
        The planted virtual neurons the ids refer to; None for real channels.
    init_rel : str
        Description stored with the results.
    """

    name: str
    layer: str
    neurons: np.ndarray
    attribution_layers: list[str]
    virtual: VirtualNeurons | None = None
    init_rel: str = INIT_REL

    def make_init(self, ids: torch.Tensor) -> Callable:
        """The initial relevance of rows explaining neurons ``ids`` (one id per row)."""
        return channel_init(ids) if self.virtual is None else self.virtual.init(ids)


@dataclass(frozen=True)
class Rule:
    """How relevance is computed: a composite and its parameters, canonizers by name, the activation product.

    Attributes
    ----------
    composite : str
        ``gradient`` or a registered (zennit) composite.
    canonizers : tuple of str
    times_activation : bool
        Multiply the backward signal by the activation (gradient-type composites).
    params : tuple of (str, value)
        The composite's keyword arguments, input bounds included (lists as tuples, so the rule stays
        hashable); empty for a composite without parameters.
    precision : str
        ``relevance.precision`` (:mod:`polypure.attribution.precision`).
    """

    composite: str = "gradient"
    canonizers: tuple[str, ...] = ()
    times_activation: bool = True
    params: tuple[tuple[str, Any], ...] = ()
    precision: str = "fp32"

    @property
    def params_json(self) -> str:
        """The parameters as JSON, as the store records them (``composite_params``)."""
        return json.dumps({key: list(v) if isinstance(v, tuple) else v for key, v in self.params}, sort_keys=True)

    def engine(self, model, plan: TargetPlan) -> ConditionalRelevance:
        """A fresh engine for ``plan`` on ``model`` (an ExplainedModel); enter it with ``with``."""
        composite = make_composite(self.composite, list(self.canonizers), dict(self.params)) if (
            self.composite != "gradient" or self.canonizers) else None
        from polypure.attribution.composites import GRADIENT_LRP_COMPOSITES
        return ConditionalRelevance(model.module, {plan.layer: model.submodule(plan.layer)},
                                    {name: model.submodule(name) for name in plan.attribution_layers},
                                    composite=composite, times_activation=self.times_activation,
                                    precision=self.precision,
                                    relevance_init=self.composite in GRADIENT_LRP_COMPOSITES and self.times_activation)


def rules_from_config(config, model, dataset=None) -> dict[str, Rule]:
    """The rule of every variant of ``relevance.variants`` (or the one ``relevance.composite`` describes), by id.

    A composite without canonizers gets the model's own, or those whose module types the network has
    (:func:`~polypure.attribution.composites.automatic_canonizers`: ``resnet`` for ResNets, ``mbconv``,
    ``se_gate`` and ``batch_norm`` for EfficientNets, ...).
    Input bounds the composite takes and the config leaves out (the ZBox rule's ``low`` / ``high``) are
    the data's normalised pixel range.

    Parameters
    ----------
    config : Config
    model : ExplainedModel
    dataset : PolypureDataset, optional
        The data, for its normalisation; built from ``config.data`` if a composite needs it and it is
        not given.

    Returns
    -------
    dict of str to Rule
        In the config's order; the id of a config without ``relevance.variants`` is ``default``.
    """
    cache = {}

    def bounds():
        # built once, and only if a composite takes input bounds
        if "bounds" not in cache:
            from polypure.data.datasets import build_dataset
            cache["bounds"] = input_bounds(dataset if dataset is not None else build_dataset(config.data, model))
        return cache["bounds"]

    rules = {}
    named = config.relevance.variants is not None
    for i, variant in enumerate(config.relevance.variant_list):
        name = variant.composite_name
        canonizers = list(variant.canonizers) or automatic_canonizers(model, name)
        key = f"relevance.variants[{i}] ({variant.id}).composite" if named else "relevance.composite"
        params = composite_kwargs(name, variant.composite_params, bounds, key=key)
        rules[variant.id] = Rule(name, tuple(canonizers), times_activation(name, variant.times_activation),
                                 tuple((key, tuple(v) if isinstance(v, list) else v) for key, v in params.items()),
                                 config.relevance.precision)
    return rules


def rule_from_config(config, model, dataset=None, variant: str | None = None) -> Rule:
    """The rule of one variant (by default the first) of a config: see :func:`rules_from_config`."""
    rules = rules_from_config(config, model, dataset)
    return rules[variant] if variant is not None else next(iter(rules.values()))


def plan_targets(config, channels: dict[str, int], virtual: dict[str, VirtualNeurons]) -> list[TargetPlan]:
    """The targets a config asks for, real ones first, then planted ones.

    Parameters
    ----------
    config : Config
    channels : dict of str to int
        Channels of every real target layer.
    virtual : dict of str to VirtualNeurons
        The planted virtual neurons of every planted layer of the config.

    Raises
    ------
    ConfigError
        For neuron ids out of range, a planted layer without attribution layers, a target listed twice.
    """
    cfg = config.relevance
    plans = []
    for i, spec in enumerate(cfg.target_list):
        key = "relevance.neurons" if cfg.targets is None else f"relevance.targets[{i}].neurons"
        plans.append(TargetPlan(spec.layer, spec.layer, select_neurons(spec.neurons, channels[spec.layer], key),
                                list(spec.attribution_layers)))
    for planted in cfg.planted_list:
        layers = planted.attribution_layers
        if layers is None:
            same = [t for t in cfg.target_list if t.layer == planted.layer]
            if not same:
                raise ConfigError(f"relevance.planted: give attribution_layers for layer {planted.layer!r} "
                                  "(no real target on that layer to take them from)")
            layers = list(same[0].attribution_layers)
        neurons = virtual[planted.layer]
        plans.append(TargetPlan(planted_target(planted.layer), planted.layer, np.arange(len(neurons), dtype=np.int64),
                                list(layers), neurons, f"planted: {', '.join(planted.modes)}, {INIT_REL}"))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ConfigError("relevance.targets: a target layer is listed twice")
    return plans


def resolve_batch_size(config, model, plan: TargetPlan, dataset, device: str | torch.device, rule: Rule) -> int:
    """``relevance.batch_size``, with ``auto`` measured on ``device`` (:func:`polypure.attribution.precision.auto_batch_size`).

    Resolved once by the process that runs the stage, so that every worker of a distributed run cuts its
    chunks as a local run does.
    """
    setting = config.relevance.batch_size
    if setting != "auto":
        return int(setting)
    image = dataset[0][0].unsqueeze(0).to(device)

    def measure(rows: int) -> None:
        with rule.engine(model, plan) as engine:
            engine(image, torch.zeros(rows, dtype=torch.int64), plan.make_init(torch.as_tensor(plan.neurons[:1]).repeat(
                rows)))

    return auto_batch_size(measure, device)


def neurons_per_chunk(batch_size: int, n_refs: int) -> int:
    """Whole neurons in a chunk of :func:`compute_target`: as many as ``batch_size`` rows hold (at least one).

    A chunk's rows are cut into passes of ``batch_size`` rows; the size of the pass a row falls in is the size
    of every pass that computes it, shared or not (:mod:`polypure.attribution.sharing`).
    """
    return max(1, batch_size // n_refs)


#: Passes' worth of rows (``SHARE_PASSES * batch_size``, whole chunks) whose forward passes :func:`compute_target`
#: shares and writes to the store together: the more neurons, the more references they share; the fewer, the less
#: an interrupted run has to do again.
SHARE_PASSES = 32


def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


class _ImageLoader:
    """Loads model inputs by sample index on worker threads, one pass ahead of the computation."""

    def __init__(self, dataset, workers: int):
        self.dataset = dataset
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def submit(self, indices: np.ndarray):
        futures = [self.pool.submit(lambda i: self.dataset[int(i)][0], i) for i in indices]
        return indices, futures

    @staticmethod
    def result(pending) -> tuple[np.ndarray, torch.Tensor]:
        indices, futures = pending
        return indices, torch.stack([f.result() for f in futures])

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SharingStats:
    """What :func:`compute_target` ran: rows explained and rows forwarded and propagated back.

    Attributes
    ----------
    pairs : int
        (neuron, reference) rows explained.
    forward_rows : int
        Rows the forward passes above the lowest attribution layer ran (``pairs`` without sharing).
    backward_rows : int
        Rows the backward passes ran (``pairs`` without sharing; more where slots stay empty).
    """

    pairs: int = 0
    forward_rows: int = 0
    backward_rows: int = 0

    @property
    def shared(self) -> float:
        """The share of pairs whose forward row another pair computed: ``1 - forward_rows / pairs``."""
        return 1.0 - self.forward_rows / self.pairs if self.pairs else 0.0

    def add(self, batch: SharedBatch) -> None:
        """Count one pass."""
        self.pairs += len(batch.rows)
        self.forward_rows += len(batch.forward)
        self.backward_rows += len(batch.forward) * batch.slots_count


def _units(chunks: list[np.ndarray], n_refs: int, share_rows: int) -> Iterator[list[np.ndarray]]:
    """Consecutive chunks of at most ``share_rows`` rows together (one chunk at least)."""
    unit: list[np.ndarray] = []
    for chunk in chunks:
        if unit and (sum(len(c) for c in unit) + len(chunk)) * n_refs > share_rows:
            yield unit
            unit = []
        unit.append(chunk)
    if unit:
        yield unit


def plan_unit(samples: np.ndarray, chunk_sizes: list[int], n_refs: int, batch_size: int,
              backward_cost: float, share: bool = True) -> list[SharedBatch]:
    """The passes that explain the rows of consecutive chunks, each row at the pass size it has unshared.

    Parameters
    ----------
    samples : ndarray (R,)
        Sample index of every row, chunk after chunk, neuron-major within a chunk.
    chunk_sizes : list of int
        Neurons of each chunk.
    n_refs, batch_size : int
    backward_cost : float
        A backward row's cost in forward rows (:attr:`ConditionalRelevance.backward_cost`).
    share : bool
        False: the passes without sharing, those of :meth:`ConditionalRelevance.__call__`.

    Returns
    -------
    list of SharedBatch
        Their ``rows`` index ``samples``.
    """
    pools: dict[int, list[np.ndarray]] = {}
    batches = []
    offset = 0
    for neurons in chunk_sizes:
        for start in range(0, neurons * n_refs, batch_size):
            rows = np.arange(offset + start, offset + min(start + batch_size, neurons * n_refs))
            if not share or len(np.unique(samples[rows])) == 1:
                # a pass of one image ran its layers below the lowest attribution layer on that image alone
                batches.append(unshared(samples[rows], rows))
            else:
                pools.setdefault(len(rows), []).append(rows)
        offset += neurons * n_refs
    for size, parts in pools.items():
        rows = np.concatenate(parts)
        alone = [unshared(samples[part], part) for part in parts]
        if len(np.unique(samples[rows])) == len(rows):
            # no image serves two rows: nothing to share
            batches.extend(alone)
            continue
        planned = plan_batches(samples[rows], size, backward_cost)
        if sum(b.cost(backward_cost) for b in planned) >= sum(b.cost(backward_cost) for b in alone):
            batches.extend(alone)
            continue
        for batch in planned:
            batch.rows = rows[batch.rows]
        batches.extend(planned)
    return batches


def plan_passes(refs: np.ndarray, todo: np.ndarray, batch_size: int, backward_cost: float,
                share_passes: int | None = None) -> Iterator[tuple[np.ndarray, SharedBatch, bool]]:
    """The passes :func:`compute_target` runs for rows ``todo``, planned one group of chunks at a time.

    Parameters
    ----------
    refs : ndarray (M, n_refs)
    todo : ndarray
    batch_size : int
    backward_cost : float
        :attr:`ConditionalRelevance.backward_cost`.
    share_passes : int, optional
        As for :func:`compute_target`.

    Yields
    ------
    neurons : ndarray
        The rows of ``todo`` the pass's group of chunks explains; ``batch.rows`` index their
        (neuron, reference) rows, neuron-major.
    batch : SharedBatch
    last : bool
        Whether it is the group's last pass.
    """
    n_refs = refs.shape[1]
    share_passes = SHARE_PASSES if share_passes is None else share_passes
    chunks = list(_chunks(todo, neurons_per_chunk(batch_size, n_refs)))
    for unit in _units(chunks, n_refs, share_passes * batch_size):
        neurons = np.concatenate(unit)
        planned = plan_unit(refs[neurons].reshape(-1), [len(c) for c in unit], n_refs, batch_size, backward_cost,
                            share=share_passes > 0)
        for number, batch in enumerate(planned):
            yield neurons, batch, number == len(planned) - 1


def compute_target(dataset, plan: TargetPlan, refs: np.ndarray, todo: np.ndarray, engine: ConditionalRelevance,
                   write: Callable[[np.ndarray, dict[str, np.ndarray]], None], *, batch_size: int = 64,
                   num_workers: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                   desc: str | None = None, share_passes: int | None = None) -> SharingStats:
    """Explain rows ``todo`` of a target and hand each finished group of whole neurons to ``write``.

    ``todo`` is cut into chunks of whole neurons (:func:`neurons_per_chunk`), and each chunk into passes of
    ``batch_size`` (neuron, reference) rows. Chunks of up to ``share_passes`` passes' worth of rows together
    share forward passes: an image several of their neurons use as a reference is forwarded once, and the
    backward passes of all its rows run on that graph (:mod:`polypure.attribution.sharing`). Every pass that
    computes a row has the size the row's pass has without sharing, so the relevance is the same float32
    numbers either way.

    Parameters
    ----------
    dataset : Dataset
        Items ``(input, label)``; references are loaded by sample index.
    plan : TargetPlan
    refs : ndarray (M, n_refs)
        Sample index of every reference of every neuron.
    todo : ndarray
        Rows (positions in ``plan.neurons``) still to do, computed in this order.
    engine : ConditionalRelevance
        Entered (``with engine:``), built for ``plan`` on the model.
    write : callable
        ``write(rows, arrays)`` with arrays shaped (len(rows), n_refs, C), for whole chunks in the order of ``todo``.
    batch_size : int
        (neuron, reference) rows per forward and backward pass.
    num_workers : int
        Threads loading the next pass's images while one is computed.
    device : str or torch.device
    progress : bool
        Show a progress bar.
    desc : str, optional
        Its label (``relevance <target>`` by default).
    share_passes : int, optional
        Passes' worth of rows whose forward passes are shared, whole chunks, written together (0: no sharing,
        every pair has a forward row of its own); :data:`SHARE_PASSES` by default.

    Returns
    -------
    SharingStats
    """
    n_refs = refs.shape[1]
    stats = SharingStats()
    loader = _ImageLoader(dataset, num_workers)
    bar = tqdm(total=len(todo), desc=desc or f"relevance {plan.name}", unit="neuron", disable=not progress, leave=False)
    work = plan_passes(refs, todo, batch_size, engine.backward_cost, share_passes)
    try:
        current = next(work, None)
        pending = loader.submit(current[1].samples) if current else None
        parts: dict[str, np.ndarray] = {}
        while current is not None:
            neurons, batch, last = current
            _, images = loader.result(pending)
            current = next(work, None)
            if current is not None:
                pending = loader.submit(current[1].samples)
            ids = torch.as_tensor(np.repeat(plan.neurons[neurons], n_refs)[batch.rows])
            out = engine.explain(to_device(images, device), torch.as_tensor(batch.forward),
                                 torch.as_tensor(batch.forward_rows), torch.as_tensor(batch.slots),
                                 plan.make_init(ids))
            stats.add(batch)
            for name, value in {**out.relevance, "activation": out.activation}.items():
                if name not in parts:
                    parts[name] = np.empty((len(neurons) * n_refs, value.shape[1]), np.float32)
                parts[name][batch.rows] = value.float().cpu().numpy()
            if last:
                write(neurons, {name: value.reshape(len(neurons), n_refs, -1) for name, value in parts.items()})
                parts = {}
                bar.update(len(neurons))
    finally:
        loader.close()
        bar.close()
    return stats
