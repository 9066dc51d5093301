"""The selectivity stage: is each split real? Ablate every cluster's circuit and measure whom it silences.

For every target, every attribution-layer space ``L`` (``selectivity.spaces``, by default all of them,
every rule variant's) and every clustering stored in that space, each neuron's clusters get a circuit:
the ``selectivity.m`` channels of ``L`` with the largest mean relevance over the cluster's references.
Zeroing a circuit at ``L`` (:class:`polypure.attribution.ablation.Ablation`) should silence the neuron on
its cluster's references and spare the other clusters'; the score (:mod:`polypure.evaluation.selectivity`)
is the own minus the other relative drop, averaged over the clusters, and its null the same for random
sets of ``m`` channels. The neuron's activation is its top-K statistic clamped at 0, or for a planted
virtual neuron its definition (sum or max of the scaled pair).

Per neuron, one forward pass (or a few, ``selectivity.batch_size``) carries its references under every
ablation of every clustering of the space, each image forwarded once below ``L``. Results go to
``/metrics/<target>/{selectivity, selectivity_null, selectivity_drops, selectivity_circuits}/<space>/<method
id>`` (:meth:`~polypure.store.hdf5_store.Store.write_selectivity`), one space at a time; a result stored with
the same signature (``m``, ``null_draws``, the seed, the top-K statistic, the clustering's own signature)
is kept. A neuron whose space is degenerate or whose clustering is no split (the checks of
:mod:`polypure.evaluation.metrics`) gets NaN without a forward pass, as do the neurons of a layer with
``m`` channels or fewer (the space is skipped, with a warning).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from polypure.pipeline.context import StageContext

NAME = "selectivity"
WRITES = True
HELP = "ablate each cluster's circuit: is the split real? (selectivity.enabled)"

log = logging.getLogger("polypure")


def layer_spaces(store, target: str, wanted: list[str] | None) -> list[str]:
    """The relevance spaces of a target to test: ``wanted`` ones it has (``selectivity.spaces``), else all."""
    spaces = store.relevance_spaces(target)
    return spaces if wanted is None else [s for s in wanted if s in spaces]


def signature(section, seed: int, statistic: str, clustering: str) -> str:
    """What a stored selectivity was computed with; another value makes it stale."""
    return json.dumps({"m": section.m, "null_draws": section.null_draws, "seed": seed, "statistic": statistic,
                       "clustering": clustering}, sort_keys=True)


def _activations(store, target: str, statistic: str):
    """``neuron id -> activation function`` of a target's neurons (:mod:`polypure.attribution.ablation`)."""
    from polypure.attribution.ablation import channel_activation, planted_activation
    from polypure.attribution.planted import VirtualNeurons
    from polypure.store.schema import planted_layer

    layer = planted_layer(target)
    if layer is None:
        return lambda neuron: channel_activation(int(neuron), statistic)
    pairs, scales = store.planted_pairs(layer)
    virtual = VirtualNeurons.build(pairs, scales, list(dict.fromkeys(store.planted_modes(layer))))
    return lambda neuron: planted_activation(virtual, int(neuron), statistic)


def _padded(rows: list, width: int, depth: int, fill, dtype) -> np.ndarray:
    """Per-neuron (K_i, depth) arrays as one (M, width, depth) array, ``fill`` where a neuron has fewer."""
    out = np.full((len(rows), width, depth), fill, dtype)
    for i, row in enumerate(rows):
        if row is not None and len(row):
            out[i, :len(row), :row.shape[1]] = row
    return out


def _arrays(splits: list, m: int) -> dict[str, np.ndarray]:
    """One clustering's results, a :class:`~polypure.evaluation.selectivity.Split` or None per neuron, as stored."""
    from polypure.store import schema

    width = max([len(s.drops) for s in splits if s is not None], default=0)
    return {schema.SELECTIVITY: np.array([s.selectivity if s else np.nan for s in splits], np.float64),
            schema.SELECTIVITY_NULL: np.array([s.null if s else np.nan for s in splits], np.float64),
            schema.SELECTIVITY_DROPS: _padded([s.drops if s else None for s in splits], width,
                                              len(schema.SELECTIVITY_DROP_COLUMNS), np.nan, np.float64),
            schema.SELECTIVITY_CIRCUITS: _padded([s.circuits if s else None for s in splits], width, m, -1, np.int64)}


def _stale(ctx: StageContext, store, target: str, space: str, statistic: str) -> dict[str, str]:
    """The clusterings of a space whose stored selectivity is missing or stale: method id -> signature."""
    from polypure.store.schema import SELECTIVITY

    todo = {}
    for method in [mt for sp, mt in store.clusterings(target) if sp == space]:
        wanted = signature(ctx.config.selectivity, ctx.config.seed, statistic,
                           str(store.cluster_attrs(target, space, method).get("signature", "")))
        if store.metric_attrs(target, SELECTIVITY, space, method).get("signature") != wanted:
            todo[method] = wanted
    return todo


def _measure_space(ctx: StageContext, store, target: str, space: str, methods: list[str], statistic: str) -> dict:
    """Per method, a Split (or None: no score) per neuron of a target, for the clusterings of one space."""
    import torch
    from tqdm.auto import tqdm

    from polypure.attribution.ablation import Ablation
    from polypure.config.settings import split_space
    from polypure.evaluation.metrics import clustering_status, degenerate
    from polypure.evaluation.selectivity import measure

    section, seed = ctx.config.selectivity, ctx.config.seed
    _, name = split_space(space)
    neurons, refs = store.neurons(target), store.reference_indices(target)
    relevance = store.relevance(target, space)
    labels = {method: store.cluster_labels(target, space, method) for method in methods}
    # the checks of the evaluate stage, so that a non-result is NaN here too, never a number
    space_ok = degenerate(relevance, normalised=True) == ""
    ok = {method: space_ok & (clustering_status(labels[method]) == "") for method in methods}
    ablate = Ablation(ctx.model.module, name, ctx.model.submodule(name),
                      ctx.model.submodule(store.target_attrs(target)["layer"]), ctx.device, section.batch_size)
    activation_of = _activations(store, target, statistic)
    results: dict[str, list] = {method: [None] * len(neurons) for method in methods}
    for row in tqdm(range(len(neurons)), desc=f"selectivity {target} {space}", unit="neuron",
                    disable=not ctx.progress, leave=False):
        chosen = {method: labels[method][row] for method in methods if ok[method][row]}
        if not chosen:
            continue
        images = torch.stack([ctx.dataset[int(i)][0] for i in refs[row]])
        activation = activation_of(neurons[row])

        def ablated(keep, images=images, activation=activation):
            return ablate(images, keep, activation)

        found = measure(ablated, relevance[row], chosen, section.m, section.null_draws, seed, int(neurons[row]))
        for method, split in found.items():
            results[method][row] = split
    return results


def run(ctx: StageContext) -> None:
    """Measure the causal selectivity of every stored clustering in every attribution-layer space."""
    section = ctx.config.selectivity
    if not section.enabled:
        ctx.log("selectivity: disabled (selectivity.enabled: false), skipped")
        return
    with ctx.open_store() as store:
        for target in store.relevance_targets():
            if not store.clusterings(target):
                ctx.log(f"selectivity {target}: no clusterings in the store (run the cluster stage first), skipped")
                continue
            statistic = store.topk_statistic(target)
            done = []
            for space in layer_spaces(store, target, section.spaces):
                todo = _stale(ctx, store, target, space, statistic)
                if not todo:
                    continue
                channels = store.space_shape(target, space)[2]
                if section.m >= channels:
                    log.warning(f"selectivity {target}: selectivity.m={section.m} is not fewer than the {channels} "
                                f"channels of {space!r}: ablating all of them tells nothing; space not tested")
                    continue
                results = _measure_space(ctx, store, target, space, list(todo), statistic)
                for method, wanted in todo.items():
                    store.write_selectivity(target, space, method, _arrays(results[method], section.m), attrs={
                        "signature": wanted, "m": section.m, "null_draws": section.null_draws})
                    done.append((space, method))
                store.flush()
            ctx.log(f"selectivity {target}: {len(done)} clustering(s) tested" if done
                    else f"selectivity {target}: up to date, skipped")
