"""The dictionary stage: learn each dictionary on its layer's activations, then decompose the layer's neurons.

For every entry of ``dictionaries`` (:mod:`polypure.dictionaries`): the positions it learns from and is
measured on are drawn with the run's seed and collected in one forward pass per layer
(:mod:`polypure.dictionaries.samples`); it trains on the run's device epoch by epoch, checkpointed into
``/dictionaries/<id>`` after every epoch, so that an interrupted run resumes at the next epoch
(:mod:`polypure.dictionaries.training`); its concepts, bias, encoder state and quality on the held-out
positions (R², dead concepts, active concepts per position) are stored and logged. A dictionary stored with
other settings is stale: refused, or retrained with ``--overwrite``.

Then every relevance target on a dictionary's layer (its real channels and its planted neurons) gets the
dictionary's space, ``/dictionaries/<id>/spaces/<target>``: for each neuron the contributions of its most
contributing concepts to each reference (:mod:`polypure.dictionaries.space`). It needs the top-K only, so the
stage runs right after it; a space made for other references or settings is made again, and the clusterings
and metrics made from it are dropped with it. The work runs in this process whatever ``executor`` says.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from polypure.errors import ConfigError, StaleResultError, StoreError
from polypure.store import schema

if TYPE_CHECKING:
    from polypure.pipeline.context import StageContext

NAME = "dictionary"
WRITES = True
HELP = "learn each dictionary (sparse autoencoder, NMF) on its layer's activations and decompose its neurons"


def _signature(spec, seed: int) -> str:
    return json.dumps(spec.signature(seed), sort_keys=True)


def _check_stored(ctx: StageContext, store, spec) -> None:
    """A stored dictionary (finished or training) must have the entry's settings; ``--overwrite`` retrains it."""
    attrs = store.dictionary_attrs(spec.id)
    if not attrs or attrs.get(schema.SIGNATURE_ATTR) == _signature(spec, ctx.config.seed):
        return
    old = json.loads(attrs.get(schema.SIGNATURE_ATTR) or "{}")
    new = spec.signature(ctx.config.seed)
    changes = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    if not ctx.overwrite:
        raise StaleResultError(f"store {str(store.path)!r}: dictionary {spec.id!r} was made with a different config "
                               f"({'; '.join(changes)}); rerun with --overwrite to train it again, or give it another "
                               "id")
    store.drop_dictionary(spec.id)
    ctx.log(f"dictionary {spec.id}: made with other settings ({'; '.join(changes)}), training again")


def _train(ctx: StageContext, store, specs: list) -> None:
    """Train the unfinished dictionaries, one pass over the data per layer for their positions."""
    from polypure.dictionaries.kinds import describe
    from polypure.dictionaries.samples import collect, plan_samples
    from polypure.dictionaries.training import quality, train

    seed = ctx.config.seed
    for layer in dict.fromkeys(spec.layer for spec in specs):
        shape = ctx.layer_shapes([layer])[layer]
        channels, positions = shape[0], int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        on_layer = [spec for spec in specs if spec.layer == layer]
        plans = {spec.id: plan_samples(len(ctx.dataset), positions, spec.max_samples, spec.holdout, seed)
                 for spec in on_layer}
        vectors = collect(ctx.model.module, ctx.dataset, ctx.model.submodule(layer), plans,
                          batch_size=ctx.batch_size, num_workers=ctx.num_workers, device=ctx.device,
                          progress=ctx.progress, desc=f"dictionary samples {layer}")
        for spec in on_layer:
            train_vectors, heldout = vectors[spec.id]
            attrs = {schema.KIND_ATTR: spec.kind, schema.LAYER_ATTR: spec.layer,
                     schema.SIGNATURE_ATTR: _signature(spec, seed)}
            epochs_done = int(store.dictionary_attrs(spec.id).get(schema.EPOCHS_DONE_ATTR, 0))
            state = store.dictionary_checkpoint(spec.id) if epochs_done else None
            if epochs_done:
                ctx.log(f"dictionary {spec.id}: resuming after epoch {epochs_done} of {spec.epochs}")

            def save(state, done, spec=spec, attrs=attrs):
                store.write_dictionary_checkpoint(spec.id, attrs, state, done)
                store.flush()

            kind = train(spec, channels, train_vectors, seed, ctx.device, state=state, epochs_done=epochs_done,
                         checkpoint=save, progress=ctx.progress)
            scores = quality(kind, heldout)
            store.write_dictionary(spec.id, kind.dictionary().cpu().numpy(), kind.bias().cpu().numpy(),
                                   kind.encoder_state(), {**scores, "n_train": int(len(train_vectors))})
            store.flush()
            ctx.log(f"dictionary {describe(spec)}: trained {spec.epochs} epoch(s) on {len(train_vectors)} positions")


def _neurons(store, plan) -> np.ndarray:
    """The rows a space needs: the target's stored rows in their order, then the config's new ones."""
    if plan.name not in store.relevance_targets():
        return np.asarray(plan.neurons, np.int64)
    stored = store.neurons(plan.name)
    known = set(stored.tolist())
    return np.concatenate([stored, [n for n in plan.neurons if int(n) not in known]]).astype(np.int64)


def _spaces(ctx: StageContext, store, specs: list) -> None:
    """Give every relevance target on a dictionary's layer the dictionary's space (where it is not current)."""
    import torch

    from polypure.dictionaries.kinds import make_kind, seeded
    from polypure.dictionaries.space import channel_readout, decompose, planted_readout
    from polypure.pipeline.relevance_stage import plans as target_plans

    layers = {spec.layer for spec in specs}
    missing = [p.layer for p in ctx.config.relevance.planted_list
               if p.layer in layers and not store.has_planted_pairs(p.layer)]
    if missing:
        raise StoreError(f"store {str(store.path)!r} has no planted pairs of layer {missing[0]!r}; run the "
                               "topk stage first")
    plans = [plan for plan in target_plans(ctx, store) if plan.layer in layers]
    n_refs = ctx.config.relevance.n_refs
    for spec in specs:
        dictionary, bias, state = store.dictionary_arrays(spec.id)
        kind = None
        for plan in [p for p in plans if p.layer == spec.layer]:
            indices = store.read_topk(plan.name)[1]
            statistic = store.topk_statistic(plan.name)
            neurons = _neurons(store, plan)
            signature = json.dumps({"dictionary": _signature(spec, ctx.config.seed), "keep": spec.concepts_kept,
                                    "n_refs": n_refs, "statistic": statistic, "k": int(indices.shape[1])},
                                   sort_keys=True)
            if store.dictionary_space_attrs(spec.id, plan.name).get(schema.SIGNATURE_ATTR) == signature and \
                    set(neurons.tolist()) <= set(store.dictionary_space(spec.id, plan.name)[0].tolist()):
                ctx.log(f"dictionary {spec.id}: space of {plan.name} up to date, skipped")
                continue
            refs = indices[neurons, :n_refs]
            if (refs < 0).any():
                raise ConfigError(f"target {plan.name!r}: fewer than relevance.n_refs={n_refs} references")
            if kind is None:
                with seeded(ctx.config.seed, ctx.device):
                    kind = make_kind(spec, dictionary.shape[1], ctx.device)
                kind.load_encoder(dictionary, bias, state)
            channels = dictionary.shape[1]
            readout = (channel_readout(neurons, channels) if plan.virtual is None
                       else planted_readout(plan.virtual, neurons, channels))
            concepts, contributions = decompose(kind, torch.as_tensor(dictionary), ctx.model.module, ctx.dataset,
                                                ctx.model.submodule(spec.layer), readout, refs, statistic,
                                                spec.concepts_kept, batch_size=ctx.batch_size,
                                                num_workers=ctx.num_workers, device=ctx.device)
            store.write_dictionary_space(spec.id, plan.name, neurons, concepts, contributions,
                                         attrs={schema.SIGNATURE_ATTR: signature, schema.STATISTIC_ATTR: statistic})
            store.flush()
            ctx.log(f"dictionary {spec.id}: space of {plan.name}, {len(neurons)} neuron(s) x {n_refs} references x "
                    f"{concepts.shape[1]} concepts")


def run(ctx: StageContext) -> None:
    """Train every configured dictionary (or finish its training) and give the targets on its layer its space."""
    from polypure.dictionaries.kinds import describe

    specs = list(ctx.config.dictionaries)
    if not specs and not ctx.overwrite:
        return
    with ctx.open_store() as store:
        if ctx.overwrite:
            # as for rule variants: --overwrite drops what the config no longer asks for
            for dictionary_id in [d for d in store.dictionary_ids() if d not in {s.id for s in specs}]:
                store.drop_dictionary(dictionary_id)
        for spec in specs:
            _check_stored(ctx, store, spec)
        pending = [spec for spec in specs if not store.dictionary_attrs(spec.id).get(schema.COMPLETE_ATTR)]
        if pending:
            _train(ctx, store, pending)
        for spec in specs:
            attrs = store.dictionary_attrs(spec.id)
            ctx.log(f"dictionary {describe(spec)}: R² {attrs['r2']:.3f} on {attrs['n_heldout']} held-out positions, "
                    f"{attrs['dead_share']:.1%} dead concepts, {attrs['mean_active']:.1f} active per position"
                    + ("" if spec in pending else " (stored)"))
        _spaces(ctx, store, specs)
