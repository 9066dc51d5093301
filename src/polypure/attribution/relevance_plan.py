"""Relevance work: which targets and neurons, with which rule, computed chunk by chunk.

A :class:`TargetPlan` names a target (a layer's real channels, or its planted virtual neurons), its
neurons and attribution layers; a :class:`Rule` names the composite, canonizers and the activation
product and builds the engine (:class:`polypure.attribution.engine.ConditionalRelevance`);
:func:`compute_target` explains any subset of a target's rows with one backward pass per batch and hands
each finished chunk of whole neurons to a writer. All three are plain data or plain functions, so a
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
    """Whole neurons :func:`compute_target` explains per chunk: as many as ``batch_size`` rows hold (at least one)."""
    return max(1, batch_size // n_refs)


def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


class _ImageLoader:
    """Loads model inputs by sample index on worker threads, one chunk ahead of the computation."""

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


def compute_target(dataset, plan: TargetPlan, refs: np.ndarray, todo: np.ndarray, engine: ConditionalRelevance,
                   write: Callable[[np.ndarray, dict[str, np.ndarray]], None], *, batch_size: int = 64,
                   num_workers: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                   desc: str | None = None) -> None:
    """Explain rows ``todo`` of a target and hand each finished chunk of whole neurons to ``write``.

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
        ``write(rows, arrays)`` with arrays shaped (len(rows), n_refs, C).
    batch_size : int
        (neuron, reference) rows per backward pass.
    num_workers : int
        Threads loading the next chunk's images while one is computed.
    device : str or torch.device
    progress : bool
        Show a progress bar.
    desc : str, optional
        Its label (``relevance <target>`` by default).
    """
    n_refs = refs.shape[1]
    batch = batch_size
    per_chunk = neurons_per_chunk(batch, n_refs)
    chunks = list(_chunks(todo, per_chunk))
    loader = _ImageLoader(dataset, num_workers)
    bar = tqdm(total=len(todo), desc=desc or f"relevance {plan.name}", unit="neuron", disable=not progress, leave=False)
    try:
        pending = loader.submit(np.unique(refs[chunks[0]])) if chunks else None
        for number, chunk in enumerate(chunks):
            unique, images = loader.result(pending)
            if number + 1 < len(chunks):
                pending = loader.submit(np.unique(refs[chunks[number + 1]]))
            images = to_device(images, device)
            flat_samples = refs[chunk].reshape(-1)
            flat_neurons = torch.as_tensor(np.repeat(plan.neurons[chunk], n_refs))
            image_rows = torch.as_tensor(np.searchsorted(unique, flat_samples))
            parts: dict[str, list[torch.Tensor]] = {}
            for start in range(0, len(flat_samples), batch):
                sl = slice(start, start + batch)
                rows = image_rows[sl]
                # only the images this sub-batch uses go through the forward pass
                used, local = torch.unique(rows, return_inverse=True)
                out = engine(images[used], local, plan.make_init(flat_neurons[sl]))
                for name, value in {**out.relevance, "activation": out.activation}.items():
                    parts.setdefault(name, []).append(value.float().cpu())
            arrays = {name: torch.cat(values).view(len(chunk), n_refs, -1).numpy()
                      for name, values in parts.items()}
            write(chunk, arrays)
            bar.update(len(chunk))
    finally:
        loader.close()
        bar.close()
