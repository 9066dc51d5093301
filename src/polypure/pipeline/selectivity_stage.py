"""The selectivity stage: is each split real? Ablate every cluster's circuit and measure whom it silences.

For every target, every space with something to ablate (``selectivity.spaces``, by default all of them) and
every clustering stored in that space, each neuron's clusters get a circuit of ``selectivity.m`` of the
space's dimensions, those with the largest mean value over the cluster's references:

* in an attribution-layer space ``L`` (every rule variant's), ``m`` channels of ``L``, by mean relevance;
  ablating them zeroes them at ``L`` (:class:`polypure.attribution.ablation.ChannelMasks`) for the forward
  pass from ``L`` to the neuron;
* in a dictionary space (:mod:`polypure.dictionaries`), ``m`` of the concepts the neuron keeps, by mean
  contribution; ablating them subtracts their terms ``z_j D[j, :]`` from the dictionary's layer at every
  position, ``z`` encoded from the layer's own output
  (:class:`~polypure.attribution.ablation.ConceptSubtraction`). The dictionary's layer is the neuron's own,
  so nothing of the network runs between the edit and the neuron (docs/method.md, Causal selectivity).

The ablation should silence the neuron on its cluster's references and spare the other clusters'; the score
(:mod:`polypure.evaluation.selectivity`) is the own minus the other relative drop, averaged over the clusters,
and its null the same for random sets of ``m`` dimensions. The neuron's activation is its top-K statistic
clamped at 0, or for a planted virtual neuron its definition (sum or max of the scaled pair).

The ablations of every clustering of a neuron in a space are stacked, and those of consecutive neurons share
forward passes of ``selectivity.batch_size`` rows (a pass holds at least one whole ablation of a neuron's
references), each image forwarded once below ``L``; a dictionary's layer output and codes are computed once
per image for a chunk of neurons. Results go to
``/metrics/<target>/{selectivity, selectivity_null, selectivity_drops, selectivity_circuits}/<space>/<method
id>`` (:meth:`~polypure.store.hdf5_store.Store.write_selectivity`; the circuits as channel or concept ids),
one space at a time; a result stored with the same signature (``m``, ``null_draws``, the seed, the top-K
statistic, the clustering's own signature) is kept. A neuron whose space is degenerate or whose clustering is
no split (the checks of :mod:`polypure.evaluation.metrics`) gets NaN without a forward pass, as do the neurons
of a space with ``m`` dimensions or fewer (the space is skipped, with a warning).
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


def tested_spaces(store, target: str, wanted: list[str] | None) -> list[str]:
    """The spaces of a target to test: ``wanted`` ones it has (``selectivity.spaces``), else all.

    Those with something to ablate: the relevance spaces (channels of an attribution layer) and the dictionary
    spaces (concepts of a dictionary).
    """
    spaces = [*store.relevance_spaces(target), *store.dictionary_spaces(target)]
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


class _ChannelAblations:
    """Ablations of a relevance space: the circuit's channels of the attribution layer zeroed."""

    def __init__(self, ctx: StageContext, store, target: str, space: str):
        from polypure.attribution.ablation import Ablation
        from polypure.config.settings import split_space

        _, name = split_space(space)
        self.ctx, self.refs = ctx, store.reference_indices(target)
        self.ablation = Ablation(ctx.model.module, name, ctx.model.submodule(name),
                                 ctx.model.submodule(store.target_attrs(target)["layer"]), ctx.device,
                                 ctx.config.selectivity.batch_size)

    def request(self, row: int, keep: np.ndarray, activation):
        """One row's references with the channels where ``keep`` (A, C) is False zeroed, for :meth:`Ablation.batch`."""
        import torch

        from polypure.attribution.ablation import ChannelMasks, Request

        images = torch.stack([self.ctx.dataset[int(i)][0] for i in self.refs[row]])
        return Request(images, ChannelMasks(keep), activation)

    def circuits(self, row: int, dims: np.ndarray) -> np.ndarray:
        """A circuit's dimensions of the space are the layer's channels."""
        return dims


class _ConceptAblations:
    """Ablations of a dictionary space: the circuit's concepts subtracted from the dictionary's layer.

    The space's dimensions for a row are the row's kept concepts (:meth:`Store.dictionary_concepts`); a keep
    mask over them becomes a :class:`~polypure.attribution.ablation.ConceptSubtraction`. The rows' reference
    images are forwarded to the dictionary's layer and encoded once per chunk of consecutive rows (as many as
    hold at most :data:`~polypure.dictionaries.space.CHUNK_VALUES` values of outputs and codes of their
    images); where the layer is the target's own, the activation is read from the edited outputs without
    another forward pass.
    """

    def __init__(self, ctx: StageContext, store, target: str, space: str, rows: list[int], shared: dict):
        import json

        import torch

        from polypure.attribution.ablation import Ablation
        from polypure.config.settings import DictionarySection
        from polypure.dictionaries.kinds import make_kind, seeded
        from polypure.dictionaries.space import CHUNK_VALUES
        from polypure.store import schema

        attrs = store.dictionary_attrs(space)
        dictionary, bias, state = store.dictionary_arrays(space)
        # the settings it was trained with, as stored (the config may name it differently or not at all)
        settings = json.loads(attrs[schema.SIGNATURE_ATTR])
        spec = DictionarySection(id=space, **{key: value for key, value in settings.items() if key != "seed"})
        with seeded(ctx.config.seed, ctx.device):
            self.kind = make_kind(spec, dictionary.shape[1], ctx.device)
        self.kind.load_encoder(dictionary, bias, state)
        layer = attrs[schema.LAYER_ATTR]
        self.ctx, self.layer, self.refs = ctx, layer, store.reference_indices(target)
        self.dictionary = torch.as_tensor(dictionary, dtype=torch.float32)
        self.concepts = store.dictionary_concepts(space, target)
        self.ablation = Ablation(ctx.model.module, layer, ctx.model.submodule(layer),
                                 ctx.model.submodule(store.target_attrs(target)["layer"]), ctx.device,
                                 ctx.config.selectivity.batch_size)
        shape = ctx.layer_shapes([layer])[layer]
        positions = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        # images per chunk: their outputs and codes within the budget
        self.chunk = max(1, CHUNK_VALUES // (positions * (shape[0] + dictionary.shape[0])))
        self.rows = list(rows)
        # the layer's output on a chunk's images, kept for the next dictionary of the layer (the same chunk)
        self.shared = shared
        self.samples = np.zeros(0, np.int64)
        self.outputs = self.codes = None
        self.loaded: set[int] = set()

    def _load(self, row: int) -> None:
        """Forward and encode the reference images of the chunk of rows starting at ``row``."""
        from polypure.dictionaries.space import encoded_outputs

        chunk, samples = [], set()
        for later in self.rows[self.rows.index(row):]:
            if chunk and len(samples | set(self.refs[later].tolist())) > self.chunk:
                break
            chunk.append(later)
            samples |= set(self.refs[later].tolist())
        self.samples = np.array(sorted(samples), np.int64)
        self.outputs = self.codes = None
        key = (self.layer, self.samples.tobytes())
        outputs = self.shared.get(key)
        self.shared.clear()
        self.outputs, self.codes = encoded_outputs(self.kind, self.ctx.model.module, self.ctx.dataset,
                                                   self.ctx.model.submodule(self.layer), self.samples,
                                                   self.ctx.batch_size, self.ctx.num_workers, self.ctx.device,
                                                   outputs=outputs)
        self.shared[key] = self.outputs
        self.loaded = set(chunk)

    def request(self, row: int, keep: np.ndarray, activation):
        """One row's references with the concepts where ``keep`` (A, T) is False removed, for :meth:`Ablation.batch`."""
        import torch

        from polypure.attribution.ablation import ConceptSubtraction, Request

        if row not in self.loaded:
            self._load(row)
        local = torch.as_tensor(np.searchsorted(self.samples, self.refs[row]))
        kept = torch.as_tensor(self.concepts[row])
        edits = ConceptSubtraction(self.codes[local][:, :, kept], self.dictionary[kept], keep)
        if self.ablation.at_target:
            return Request(None, edits, activation, self.outputs[local])
        return Request(torch.stack([self.ctx.dataset[int(i)][0] for i in self.refs[row]]), edits, activation)

    def circuits(self, row: int, dims: np.ndarray) -> np.ndarray:
        """A circuit's dimensions of the space are the row's kept concepts: stored as concept ids."""
        return np.where(dims >= 0, self.concepts[row][np.maximum(dims, 0)], -1)


def _measure_space(ctx: StageContext, store, target: str, space: str, methods: list[str], statistic: str,
                   shared: dict) -> dict:
    """Per method, a Split (or None: no score) per neuron of a target, for the clusterings of one space.

    ``shared`` keeps a dictionary layer's output on the last chunk of reference images for the next dictionary
    space of the target.
    """
    from tqdm.auto import tqdm

    from polypure.evaluation.metrics import clustering_status, degenerate
    from polypure.evaluation.selectivity import plan, scores

    section, seed = ctx.config.selectivity, ctx.config.seed
    neurons = store.neurons(target)
    features = store.features(target, space)
    labels = {method: store.cluster_labels(target, space, method) for method in methods}
    # the checks of the evaluate stage, so that a non-result is NaN here too, never a number
    space_ok = degenerate(features, normalised=space in store.relevance_spaces(target)) == ""
    ok = {method: space_ok & (clustering_status(labels[method]) == "") for method in methods}
    rows = [row for row in range(len(neurons)) if any(ok[method][row] for method in methods)]
    ablations = (_ConceptAblations(ctx, store, target, space, rows, shared) if space in store.dictionary_spaces(target)
                 else _ChannelAblations(ctx, store, target, space))
    activation_of = _activations(store, target, statistic)
    results: dict[str, list] = {method: [None] * len(neurons) for method in methods}
    pending: list[tuple[int, dict, object, object]] = []

    def flush() -> None:
        # the planned neurons' ablations together: their rows share forward passes of ``batch_size`` rows
        values = ablations.ablation.batch([request for _, _, _, request in pending])
        for (row, chosen, found, _), value in zip(pending, values):
            for method, split in scores(found, chosen, value, section.m).items():
                split.circuits = ablations.circuits(row, split.circuits)
                results[method][row] = split
            bar.update(1)
        pending.clear()

    with tqdm(total=len(rows), desc=f"selectivity {target} {space}", unit="neuron", disable=not ctx.progress,
              leave=False) as bar:
        for row in rows:
            chosen = {method: labels[method][row] for method in methods if ok[method][row]}
            found = plan(features[row], chosen, section.m, section.null_draws, seed, int(neurons[row]))
            request = ablations.request(row, found.keep, activation_of(neurons[row]))
            pending.append((row, chosen, found, request))
            if sum(len(f.keep) for _, _, f, _ in pending) * features.shape[1] >= section.batch_size:
                flush()
        if pending:
            flush()
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
            done, shared = [], {}
            for space in tested_spaces(store, target, section.spaces):
                todo = _stale(ctx, store, target, space, statistic)
                if not todo:
                    continue
                width = store.space_shape(target, space)[2]
                if section.m >= width:
                    what = ("concepts each neuron keeps in" if space in store.dictionary_spaces(target)
                            else "channels of")
                    log.warning(f"selectivity {target}: selectivity.m={section.m} is not fewer than the {width} "
                                f"{what} {space!r}: ablating all of them tells nothing; space not tested")
                    continue
                results = _measure_space(ctx, store, target, space, list(todo), statistic, shared)
                for method, wanted in todo.items():
                    store.write_selectivity(target, space, method, _arrays(results[method], section.m), attrs={
                        "signature": wanted, "m": section.m, "null_draws": section.null_draws})
                    done.append((space, method))
                store.flush()
            ctx.log(f"selectivity {target}: {len(done)} clustering(s) tested" if done
                    else f"selectivity {target}: up to date, skipped")
