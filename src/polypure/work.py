"""Units of work that need no Experiment and no store: a shard of the top-K pass, a range of neurons.

Each takes the config and plain arrays, builds the model and data itself (exactly as a run does:
seeded, from the same config) and returns arrays. That makes it callable in another process (a
``multiprocessing`` spawn worker, a Ray task) whose results the one process that writes the store merges:
top-K shards with :meth:`polypure.topk.TopK.merge`, relevance rows by writing them to their rows.

Example
-------
>>> from polypure.config import load_config
>>> from polypure.work import topk_shard
>>> cfg = load_config("demo", ["data.synthetic.n=24", "topk.k=4", "relevance.n_refs=4"])
>>> first, second = topk_shard(cfg, ["logits"], 0, 12), topk_shard(cfg, ["logits"], 12, 24)
>>> merged = first["logits"].merge(second["logits"])
>>> merged.indices.shape
torch.Size([4, 4])
"""

from __future__ import annotations

import numpy as np
import torch

from .config import Config
from .data import PolypureDataset, build_dataset
from .models import ExplainedModel, build_model
from .planted import VirtualNeurons
from .relevance import Rule, TargetPlan, compute_target
from .topk import Scorer, TopK, channel_scorer, collect_topk


def build_data(config: Config, model: ExplainedModel) -> PolypureDataset:
    """The samples a config's ``data`` section describes (normalised for ``model``)."""
    return build_dataset(config.data, model)


def topk_shard(config: Config, layers: list[str], start: int, stop: int, *,
               virtual: dict[str, tuple[str, VirtualNeurons]] | None = None,
               device: str | torch.device = "cpu") -> dict[str, TopK]:
    """The top-K of samples ``start:stop`` for some layers (and planted virtual neurons).

    Parameters
    ----------
    config : Config
    layers : list of str
        Real layers; each is scored by its channels' ``topk.statistic``.
    start, stop : int
        The shard of sample indices.
    virtual : dict, optional
        ``name -> (layer, virtual neurons)`` for planted targets scored from a real layer's output.
    device : str or torch.device

    Returns
    -------
    dict of str to TopK
        Partial results to merge with the other shards' (disjoint samples merge exactly).
    """
    model = build_model(config, device)
    dataset = build_data(config, model)
    modules = {layer: model.submodule(layer) for layer in layers}
    statistic = config.topk.statistic
    x = dataset[0][0].unsqueeze(0).to(device)
    from .hooks import probe_layers
    shapes, _ = probe_layers(model.module, modules, x)
    scorers = [channel_scorer(layer, shapes[layer][0], statistic) for layer in layers]
    for name, (layer, neurons) in (virtual or {}).items():
        modules.setdefault(layer, model.submodule(layer))
        scorers.append(Scorer(name, layer, len(neurons), lambda out, v=neurons: v.scored(out, statistic),
                              {"truth": torch.int64}))
    return collect_topk(model.module, dataset, modules, scorers, config.topk.k, start=start, stop=stop,
                        batch_size=config.data.batch_size, num_workers=config.data.num_workers, device=device,
                        progress=False)


def relevance_rows(config: Config, plan: TargetPlan, refs: np.ndarray, rows: np.ndarray, rule: Rule, *,
                   device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Conditional relevance of some neurons (rows of a target) and their activation baseline.

    Parameters
    ----------
    config : Config
    plan : TargetPlan
        The target: its layer, neuron ids and attribution layers.
    refs : ndarray (M, n_refs)
        Sample index of every reference of every neuron of the target.
    rows : ndarray
        Positions in ``plan.neurons`` to compute.
    rule : Rule
        Composite, canonizers and whether to multiply by the activation.
    device : str or torch.device

    Returns
    -------
    dict of str to ndarray
        Per attribution layer and ``activation``, (len(rows), n_refs, C) float32, in the order of ``rows``.
    """
    model = build_model(config, device)
    dataset = build_data(config, model)
    parts: dict[str, list[np.ndarray]] = {}

    def keep(chunk: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            parts.setdefault(name, []).append(value)

    with rule.engine(model, plan) as engine:
        # chunks are computed and handed back in the order of rows
        compute_target(dataset, plan, refs, np.asarray(rows), engine, keep, batch_size=config.relevance.batch_size,
                       num_workers=config.data.num_workers, device=device)
    return {name: np.concatenate(values) for name, values in parts.items()}
