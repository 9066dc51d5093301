"""The relevance stage: conditional relevance vectors of every selected neuron's references.

For each target (a layer's real channels, or its planted virtual neurons), each rule variant
(``relevance.variants``) and each selected neuron, the ``n_refs`` first references of its top-K are
explained at every attribution layer, an image several neurons share forwarded once for all their rows
(:func:`polypure.attribution.relevance_plan.compute_target`). The variants share the rows and the references; a variant
added to a config later is computed alone. Whole neurons are written at a time and flagged in
``/relevance/<target>/complete``, so an interrupted run continues where it stopped; neurons a config adds
later are appended and computed alone.

Rows whose relevance vanished below the normalisation floor (``sum |R| < 1e-10``: stored, they are rounding,
not a direction) are counted as they are written and reported in one warning per target; the evaluate stage
marks their neurons degenerate (``vanishing``, :func:`polypure.evaluation.metrics.degenerate`) so they are
not scored.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from polypure.errors import ConfigError

if TYPE_CHECKING:
    from polypure.pipeline.context import StageContext

NAME = "relevance"
WRITES = True
HELP = "compute conditional relevance of the references at the attribution layers"

log = logging.getLogger("polypure")


def plans(ctx: StageContext, store) -> list:
    """The targets of the config (:func:`polypure.attribution.relevance_plan.plan_targets`), with planted neurons from the store."""
    from polypure.attribution.planted import virtual_neurons
    from polypure.attribution.relevance_plan import plan_targets

    rel = ctx.config.relevance
    channels = {t.layer: ctx.layer_shapes([t.layer])[t.layer][0] for t in rel.target_list}
    virtual = {p.layer: virtual_neurons(store, p) for p in rel.planted_list}
    return plan_targets(ctx.config, channels, virtual)


def run(ctx: StageContext) -> None:
    """Compute (or finish) the relevance of every target and rule variant in the config, writing to the store."""
    from polypure.attribution.composites import warn_uncanonized
    from polypure.attribution.relevance_plan import compute_target, resolve_batch_size, rules_from_config

    cfg = ctx.config.relevance
    rules = rules_from_config(ctx.config, ctx.model, ctx.dataset)
    warned = set()
    with ctx.open_store() as store:
        for plan in plans(ctx, store):
            values, indices = store.read_topk(plan.name)
            shapes = ctx.layer_shapes(plan.attribution_layers + [plan.layer])
            layer_channels = {name: shapes[name][0] for name in plan.attribution_layers}
            settings = {"init_rel": plan.init_rel, "n_refs": cfg.n_refs, "layer": plan.layer,
                        "module": ctx.model.module_path(plan.layer), "attribution_layers": plan.attribution_layers}
            for variant, rule in rules.items():
                attrs = {**settings, "composite": rule.composite, "canonizers": list(rule.canonizers),
                         "times_activation": rule.times_activation, "precision": rule.precision}
                if rule.params:
                    attrs["composite_params"] = rule.params_json
                store.prepare_relevance(plan.name, plan.neurons, cfg.n_refs, layer_channels, shapes[plan.layer][0],
                                        attrs, overwrite=ctx.overwrite, variant=variant)
            if ctx.overwrite:
                # as for neurons: --overwrite drops what the config no longer asks for
                for variant in [v for v in store.variants(plan.name) if v not in rules]:
                    store.drop_variant(plan.name, variant)
            # the store's row order: neurons added by a later run follow the ones it already had
            plan.neurons = store.neurons(plan.name)
            refs = indices[plan.neurons, :cfg.n_refs]
            if (refs < 0).any():
                raise ConfigError(f"target {plan.name!r}: fewer than relevance.n_refs={cfg.n_refs} references")
            computed = False
            batch = None
            vanished: Counter = Counter()  # (variant, layer) -> rows below the floor
            flagged: set[int] = set()      # rows (neurons) with any of them
            for variant, rule in rules.items():
                which = plan.name if len(rules) == 1 else f"{plan.name} [{variant}]"
                todo = np.flatnonzero(~store.complete(plan.name, variant))
                if len(todo) == 0:
                    ctx.log(f"relevance {which}: complete, skipped")
                    continue
                computed = True
                if batch is None:
                    batch = resolve_batch_size(ctx.config, ctx.model, plan, ctx.dataset, ctx.device, rule)
                    if cfg.batch_size == "auto":
                        ctx.log(f"relevance {plan.name}: batch_size auto -> {batch} rows per backward pass")
                if rule not in warned:
                    warn_uncanonized(ctx.model.module, rule.composite, list(rule.canonizers),
                                     sample=ctx.dataset[0][0].unsqueeze(0).to(ctx.device), params=dict(rule.params))
                    warned.add(rule)

                def write(rows, arrays, name=plan.name, variant=variant, layers=tuple(plan.attribution_layers),
                          vanished=vanished, flagged=flagged):
                    store.write_relevance_rows(name, rows, arrays, variant=variant)
                    count_vanished(rows, {layer: arrays[layer] for layer in layers}, variant, vanished, flagged)

                shared = ""
                if ctx.executor is not None:
                    _distributed(ctx, plan, refs, todo, rule, batch, write, f"relevance {which}")
                else:
                    with rule.engine(ctx.model, plan) as engine:
                        stats = compute_target(ctx.dataset, plan, refs, todo, engine, write, batch_size=batch,
                                               num_workers=ctx.num_workers, device=ctx.device,
                                               progress=ctx.progress, desc=f"relevance {which}")
                    shared = f" ({stats.pairs} pairs from {stats.forward_rows} forward rows, {stats.shared:.0%} shared)"
                ctx.log(f"relevance {which}: {len(todo)} neuron(s) x {cfg.n_refs} references at "
                        f"{', '.join(plan.attribution_layers)}{shared}")
            if vanished:
                warn_vanished(plan.name, vanished, len(flagged), cfg.n_refs)
            # said once, when the relevance is made: reading every variant back costs time at scale
            for same in identical_variants(store, plan.name, list(rules)) if computed and len(rules) > 1 else []:
                ctx.log(f"relevance {plan.name}: variants {', '.join(same)} gave the same relevance at every "
                        "attribution layer, bit for bit (their rules act alike on the modules between the target "
                        "and its attribution layers)")


def count_vanished(rows: np.ndarray, arrays: dict[str, np.ndarray], variant: str, counts: Counter,
                   flagged: set[int]) -> None:
    """Count the written rows whose relevance is below the normalisation floor, per (variant, layer).

    ``arrays`` maps each attribution layer to its (neurons, n_refs, channels) block; ``flagged`` collects the
    neurons (rows of the target) that have any such reference row.
    """
    from polypure.evaluation.metrics import below_floor

    for layer, data in arrays.items():
        below = below_floor(data)
        if below.any():
            counts[variant, layer] += int(below.sum())
            flagged.update(int(r) for r in np.asarray(rows)[below.any(axis=1)])


def warn_vanished(target: str, counts: Counter, neurons: int, n_refs: int) -> None:
    """One warning for a target: how many rows vanished below the floor, where, and what becomes of them."""
    where = ", ".join(f"{layer} [{variant}]: {n}" for (variant, layer), n in counts.items())
    log.warning("relevance %s: rows of (neuron, reference) whose relevance is below the normalisation floor "
                "(sum |R| < 1e-10, %d reference(s) per neuron): %s; their %d neuron(s) are marked degenerate "
                "('vanishing') in those spaces and not scored (polypure check-rules shows where the relevance "
                "is lost)", target, n_refs, where, neurons)


def _distributed(ctx, plan, refs: np.ndarray, todo: np.ndarray, rule, batch: int, write, desc: str) -> None:
    """Rows ``todo`` of a target on the executor's actors, in ranges of whole neurons, written as they arrive.

    A range holds whole chunks of the local computation (:func:`polypure.attribution.relevance_plan.neurons_per_chunk`), so
    every row runs in passes of the size the local stage gives it, and its relevance is the local stage's (a worker
    shares forward passes among the rows of its own ranges only).
    """
    from tqdm.auto import tqdm

    from polypure.attribution.relevance_plan import neurons_per_chunk
    from polypure.pipeline.executor import aligned

    cfg = ctx.config.relevance
    # no more than a fair share per worker: a small target still keeps every worker busy
    share = -(-len(todo) // ctx.config.executor.workers)
    size = aligned(min(ctx.config.executor.neurons_per_task, share), neurons_per_chunk(batch, cfg.n_refs))
    tasks = [todo[start:start + size] for start in range(0, len(todo), size)]
    with tqdm(total=len(todo), desc=desc, unit="neuron", disable=not ctx.progress, leave=False) as bar:
        for rows, arrays in ctx.executor.relevance(plan, refs, tasks, rule, batch):
            write(rows, arrays)
            bar.update(len(rows))


def identical_variants(store, target: str, variants: list[str]) -> list[list[str]]:
    """Groups of two or more variants whose relevance is equal at every attribution layer of a target.

    Rules that differ on paper can act alike on a network: ``epsilon_plus_flat`` differs from ``epsilon_plus``
    only below every attribution layer, and a composite whose rule maps ``torch.nn.ReLU`` leaves ``ReLU6``
    (EfficientNet) to the gradient. Saying so keeps a tie in a leaderboard from reading as a finding.
    """
    from polypure.config.settings import space_name

    groups: list[list[str]] = []
    arrays: dict[str, list[np.ndarray]] = {}
    for variant in variants:
        arrays[variant] = [store.relevance(target, space_name(variant, layer))
                           for layer in store.attribution_layers(target)]
        for group in groups:
            if all(np.array_equal(a, b, equal_nan=True) for a, b in zip(arrays[group[0]], arrays[variant])):
                group.append(variant)
                break
        else:
            groups.append([variant])
    return [group for group in groups if len(group) > 1]
