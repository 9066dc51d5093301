"""The top-K stage: the references of every layer the config needs, and of planted virtual neurons.

One resumable streaming pass over the data for the real layers (:func:`polypure.attribution.topk.collect_topk`),
checkpointed into ``/topk/<layer>``; then, for each planted layer, its pairs are chosen from the real
channels' top-K and a second pass finds the virtual neurons' own references. A stored top-K made with
another ``k`` or statistic is stale (refused, or recomputed with ``--overwrite``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypure.errors import StaleResultError
from polypure.store.schema import planted_target

if TYPE_CHECKING:
    from polypure.attribution.topk import Scorer, TopK
    from polypure.pipeline.context import StageContext

NAME = "topk"
WRITES = True
HELP = "find each layer's top-K most-activating samples"


def topk_layers(config) -> list[str]:
    """Every real layer that needs a top-K: ``topk.layers``, relevance targets and planted layers."""
    layers = list(config.topk.layers)
    layers += [t.layer for t in config.relevance.target_list]
    layers += [p.layer for p in config.relevance.planted_list]
    return list(dict.fromkeys(layers))


def _run_pass(ctx, store, scorers: list[Scorer], modules: dict, shipped: tuple[list[str], dict]) -> None:
    """One resumable streaming pass for some scorers, checkpointed into the store.

    A dataset whose labels are the ones its items carry has them collected on the way: each checkpoint
    writes them to ``/samples/labels`` before the top-K it covers, so a resumed pass has every label too.
    ``shipped`` is what a worker rebuilds the scorers from: the real layers, and ``name -> (layer, virtual
    neurons)`` of planted targets.
    """
    from polypure.attribution.topk import TopK, collect_topk

    cfg = ctx.config.topk
    labels = store.labels().copy() if ctx.dataset.labels_from_items else None
    states, done = {}, {}
    for scorer in scorers:
        progress = store.topk_progress(scorer.name)
        if progress is not None:
            values, indices, samples_done, _ = progress
            payloads = {n: store.topk_payload(scorer.name, n) for n in scorer.payloads}
            states[scorer.name] = TopK.from_arrays(values, indices, payloads)
            done[scorer.name] = samples_done

    def save(current: dict[str, TopK], samples_done: dict[str, int], complete: bool = False) -> None:
        if labels is not None:
            store.update_labels(labels)
        for scorer in scorers:
            values, indices, payloads = current[scorer.name].arrays()
            store.write_topk(scorer.name, values, indices, cfg.statistic, samples_done[scorer.name], complete,
                             extra=payloads)
        store.flush()

    n = len(ctx.dataset)
    if ctx.executor is not None:
        states = _distributed_pass(ctx, scorers, shipped, states, done, save, labels)
    else:
        states = collect_topk(ctx.model.module, ctx.dataset, modules, scorers, cfg.k, batch_size=ctx.batch_size,
                              num_workers=ctx.num_workers, device=ctx.device, states=states, done=done,
                              checkpoint=save, checkpoint_every=cfg.checkpoint_every, progress=ctx.progress,
                              labels=labels)
    save(states, {scorer.name: n for scorer in scorers}, complete=True)
    if labels is not None:
        ctx.dataset.labels = labels


def _distributed_pass(ctx, scorers: list[Scorer], shipped: tuple[list[str], dict], states: dict, done: dict, save,
                      labels) -> dict:
    """The pass of :func:`_run_pass` as shards on the executor's workers, merged here in sample order.

    Shards start where the local pass's batches do, so every batch a worker computes is one the local pass
    computes. A shard that finishes early waits until the shards before it are merged; the state is
    checkpointed after each merge, so an interrupted pass resumes from the last shard merged.
    """
    from tqdm.auto import tqdm

    from polypure.attribution.topk import TopK
    from polypure.pipeline.executor import aligned

    cfg = ctx.config.topk
    n = len(ctx.dataset)
    for scorer in scorers:
        states.setdefault(scorer.name, TopK(scorer.channels, cfg.k, scorer.payloads))
    done = {scorer.name: done.get(scorer.name, 0) for scorer in scorers}
    first = min(done.values())
    # no more than a fair share per worker: a small dataset still keeps every worker busy
    share = -(-(n - first) // ctx.config.executor.workers)
    size = aligned(min(ctx.config.executor.shard_size, share), ctx.batch_size)
    shards = [(start, min(start + size, n)) for start in range(first, n, size)]
    layers, virtual = shipped
    waiting: dict[int, tuple] = {}
    merged = 0
    with tqdm(total=n - first, desc="top-K", unit="img", disable=not ctx.progress, leave=False) as bar:
        for number, result in ctx.executor.topk(layers, virtual, shards, done, labels is not None):
            waiting[number] = result
            while merged in waiting:
                result = waiting.pop(merged)
                parts, shard_labels = result if labels is not None else (result, None)
                start, stop = shards[merged]
                for name, part in parts.items():
                    states[name].merge(part)
                    done[name] = max(done[name], stop)
                if labels is not None:
                    labels[start:stop] = shard_labels
                merged += 1
                bar.update(stop - start)
                if merged < len(shards):
                    save(states, dict(done))
    return states


def _stale(ctx, store, what: str, changes: list[str], drop) -> None:
    """Refuse a stored result made with other settings, or with ``overwrite`` drop it to be recomputed."""
    if not changes:
        return
    if not ctx.overwrite:
        raise StaleResultError(f"store {str(store.path)!r}: {what} was made with a different config "
                               f"({'; '.join(changes)}); rerun with --overwrite to recompute it and what depends "
                               "on it, or set another store path")
    drop()
    ctx.log(f"top-K: {what} made with other settings ({'; '.join(changes)}), recomputing")


def _check_stored(ctx, store, name: str, layer: str, drop) -> None:
    """A stored top-K (complete or not) must have the config's k and statistic."""
    state = store.topk_progress(name)
    if state is None:
        return
    cfg = ctx.config.topk
    stored_k = state[0].shape[1]
    statistic = store.topk_statistic(name)
    changes = [f"topk.k: {stored_k} -> {cfg.k}"] if stored_k != cfg.k else []
    if statistic != cfg.statistic:
        changes.append(f"topk.statistic: {statistic!r} -> {cfg.statistic!r}")
    _stale(ctx, store, f"the top-K of {name!r}", changes, lambda: drop(layer))


def _planted_settings(planted) -> dict:
    """What decides a layer's planted pairs and virtual neurons (kept as attributes of ``/planted/<layer>``)."""
    return {"pairs_asked": planted.pairs, "seed": planted.seed, "max_overlap": planted.max_overlap}


def _check_planted(ctx, store, planted) -> None:
    """Stored planted pairs must come from the same settings, and their virtual neurons from the same modes."""
    planted_target(planted.layer)
    if not store.has_planted_pairs(planted.layer):
        return
    stored = store.planted_settings(planted.layer)
    changes = [f"relevance.planted.{key.removesuffix('_asked')}: {stored[key]!r} -> {value!r}"
               for key, value in _planted_settings(planted).items() if key in stored and stored[key] != value]
    modes = store.planted_modes(planted.layer)
    if modes is not None and list(dict.fromkeys(modes)) != planted.modes:
        changes.append(f"relevance.planted.mode: {list(dict.fromkeys(modes))} -> {planted.modes}")

    def drop():
        # the real layer's top-K stays valid: only the pairs and what was computed from them go
        store.drop_planted(planted.layer)

    _stale(ctx, store, f"the planted neurons of {planted.layer!r}", changes, drop)


def run(ctx: StageContext) -> None:
    """Find the top-K references of every layer the config needs (and of planted virtual neurons)."""
    # engines load on use: listing the stages (the command line's help) must not import torch
    import torch

    from polypure.attribution.planted import choose_pairs, virtual_neurons
    from polypure.attribution.topk import Scorer, channel_scorer
    from polypure.pipeline.preflight import check_samples

    cfg = ctx.config.topk
    n = len(ctx.dataset)
    check_samples(ctx.config, n)
    with ctx.open_store() as store:
        ids = list(ctx.dataset.ids)
        if store.has_samples():
            store.check_samples(ids)
        else:
            store.write_samples(ids, ctx.dataset.labels, ctx.dataset.factors, ctx.dataset.class_names)
        layers = topk_layers(ctx.config)
        shapes = ctx.layer_shapes(layers)
        for layer in layers:
            _check_stored(ctx, store, layer, layer, store.drop_topk)
        pending = [layer for layer in layers if not (store.topk_progress(layer) or (0, 0, 0, False))[3]]
        if pending:
            scorers = [channel_scorer(layer, shapes[layer][0], cfg.statistic) for layer in pending]
            _run_pass(ctx, store, scorers, {layer: ctx.model.submodule(layer) for layer in pending}, (pending, {}))
            ctx.log(f"top-K: {', '.join(pending)} over {n} samples (K={cfg.k}, {cfg.statistic})")
        else:
            ctx.log(f"top-K: {', '.join(layers)} complete, skipped")

        # planted pairs are chosen from the real channels' top-K, so their own top-K needs a second pass
        for planted in ctx.config.relevance.planted_list:
            name = planted_target(planted.layer)
            _check_planted(ctx, store, planted)
            _check_stored(ctx, store, name, planted.layer, store.drop_topk)
            if (store.topk_progress(name) or (0, 0, 0, False))[3]:
                ctx.log(f"top-K: {name} complete, skipped")
                continue
            if not store.has_planted_pairs(planted.layer):
                values, indices = store.read_topk(planted.layer)
                pairs, scales = choose_pairs(values, indices, planted.pairs, planted.max_overlap, planted.seed)
                if len(pairs) < planted.pairs:
                    ctx.log(f"planted {planted.layer}: only {len(pairs)} of {planted.pairs} pairs overlap by at most "
                            f"{planted.max_overlap:.0%}")
                store.write_planted_pairs(planted.layer, pairs, scales, _planted_settings(planted))
            virtual = virtual_neurons(store, planted)
            scorer = Scorer(name, planted.layer, len(virtual), lambda out, v=virtual: v.scored(out, cfg.statistic),
                            {"truth": torch.int64})
            _run_pass(ctx, store, [scorer], {planted.layer: ctx.model.submodule(planted.layer)},
                      ([], {name: (planted.layer, virtual)}))
            truth = store.topk_payload(name, "truth")[:, :ctx.config.relevance.n_refs]
            store.write_planted_truth(planted.layer, truth, virtual.modes)
            store.flush()
            ctx.log(f"top-K: {name}, {len(virtual)} virtual neuron(s) ({', '.join(planted.modes)})")
