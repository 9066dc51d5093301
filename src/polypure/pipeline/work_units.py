"""Units of work that need no Experiment and no store: top-K shards, ranges of neurons, images to embed.

Each takes a :class:`WorkSource` (or just the config), builds the model and data itself (exactly as a run
does: seeded, from the same config) and returns arrays. That makes it callable in another process (a
``multiprocessing`` spawn worker, a Ray task or actor: :mod:`polypure.pipeline.executor`) whose results the one
process that writes the store merges: top-K shards with :meth:`polypure.attribution.topk.TopK.merge`, relevance rows
and embeddings by writing them to their rows.

Example
-------
>>> from polypure.config.settings import load_config
>>> from polypure.pipeline.work_units import topk_shard
>>> cfg = load_config("demo", ["data.synthetic.n=24", "topk.k=4", "relevance.n_refs=4"])
>>> first, second = topk_shard(cfg, ["logits"], 0, 12), topk_shard(cfg, ["logits"], 12, 24)
>>> merged = first["logits"].merge(second["logits"])
>>> merged.indices.shape
torch.Size([4, 4])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from polypure.attribution.planted import VirtualNeurons
from polypure.attribution.relevance_plan import Rule, TargetPlan, compute_target
from polypure.attribution.topk import Scorer, TopK, channel_scorer, collect_topk
from polypure.config.settings import Config
from polypure.data.datasets import PolypureDataset, build_dataset
from polypure.models.factory import ExplainedModel, build_model

#: Environment variable of the crash test: it names a folder, and while that folder exists the first unit of
#: each kind (``topk``, ``relevance``, ``embed``) to reach :func:`kill_once_for_test` kills its own process
#: in the middle of its work, leaving a file of the kind's name there so that it happens once.
KILL_ONCE_ENV = "POLYPURE_TEST_KILL_ONCE"


@dataclass
class WorkSource:
    """What a worker builds its model and data from: the config, or a run's in-memory objects.

    Attributes
    ----------
    config : Config
    model : ExplainedModel, optional
        An in-memory model (``Experiment(model=...)``), shipped instead of built from ``config.model``.
    dataset : PolypureDataset, optional
        An in-memory dataset, shipped instead of built from ``config.data``.
    cwd : str, optional
        The driver's working directory: relative paths of the config (data, weights, ``python:`` files)
        mean the same in a worker that changes into it (where it exists on the worker's machine).
    token : str
        Names this source in a worker process's cache, so that tasks of one run reuse what an earlier
        task of the run built there.
    """

    config: Config
    model: ExplainedModel | None = None
    dataset: PolypureDataset | None = None
    cwd: str | None = None
    token: str = field(default_factory=lambda: os.urandom(8).hex())

    def build(self, device: str | torch.device = "cpu") -> tuple[ExplainedModel, PolypureDataset]:
        """The model (on ``device``) and the data, built once per process and device."""
        key = (self.token, str(device))
        if _BUILT.get("key") != key:
            if self.cwd is not None and os.path.isdir(self.cwd):
                os.chdir(self.cwd)
            model = self.model if self.model is not None else build_model(self.config)
            model.module.eval().to(device)
            dataset = self.dataset if self.dataset is not None else build_data(self.config, model)
            _BUILT.update(key=key, parts=(model, dataset), builds=_BUILT.get("builds", 0) + 1)
        return _BUILT["parts"]


# one source's model and data per process: a worker serves one run at a time
_BUILT: dict = {}


def builds() -> int:
    """How many times this process built a source's model and data (a worker's statistics: once per run)."""
    return _BUILT.get("builds", 0)


def _source(source: WorkSource | Config) -> WorkSource:
    return source if isinstance(source, WorkSource) else WorkSource(source, token="config:" + source.to_yaml())


def kill_once_for_test(kind: str) -> None:
    """The crash test's hook (:data:`KILL_ONCE_ENV`): kill this process once per kind, as a machine failure would."""
    folder = os.environ.get(KILL_ONCE_ENV)
    if not folder or not os.path.isdir(folder):
        return
    try:
        os.close(os.open(os.path.join(folder, kind), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), 9)


def build_data(config: Config, model: ExplainedModel) -> PolypureDataset:
    """The samples a config's ``data`` section describes (normalised for ``model``)."""
    return build_dataset(config.data, model)


def topk_shard(source: WorkSource | Config, layers: list[str], start: int, stop: int, *,
               virtual: dict[str, tuple[str, VirtualNeurons]] | None = None,
               done: dict[str, int] | None = None, with_labels: bool = False,
               device: str | torch.device = "cpu") -> dict[str, TopK] | tuple[dict[str, TopK], np.ndarray]:
    """The top-K of samples ``start:stop`` for some layers (and planted virtual neurons).

    Parameters
    ----------
    source : WorkSource or Config
    layers : list of str
        Real layers; each is scored by its channels' ``topk.statistic``.
    start, stop : int
        The shard of sample indices.
    virtual : dict, optional
        ``name -> (layer, virtual neurons)`` for planted targets scored from a real layer's output.
    done : dict of str to int, optional
        Per result name, samples before this index are left out of it (they are in the driver's state).
    with_labels : bool
        Also return the labels the items of the shard carry (for data whose labels come from its items).
    device : str or torch.device

    Returns
    -------
    dict of str to TopK
        Partial results to merge with the other shards' (disjoint samples merge exactly); with
        ``with_labels``, a pair of it and the labels of samples ``start:stop``.
    """
    source = _source(source)
    config = source.config
    model, dataset = source.build(device)
    modules = {layer: model.submodule(layer) for layer in layers}
    statistic = config.topk.statistic
    x = dataset[0][0].unsqueeze(0).to(device)
    from polypure.attribution.hooks import probe_layers
    shapes, _ = probe_layers(model.module, modules, x)
    scorers = [channel_scorer(layer, shapes[layer][0], statistic) for layer in layers]
    for name, (layer, neurons) in (virtual or {}).items():
        modules.setdefault(layer, model.submodule(layer))
        scorers.append(Scorer(name, layer, len(neurons), lambda out, v=neurons: v.scored(out, statistic),
                              {"truth": torch.int64}))
    labels = np.full(len(dataset), -1, np.int64) if with_labels else None
    states = collect_topk(model.module, dataset, modules, scorers, config.topk.k, start=start, stop=stop,
                          batch_size=config.data.batch_size, num_workers=config.data.num_workers, device=device,
                          progress=False, done=done, labels=labels)
    kill_once_for_test("topk")
    return (states, labels[start:stop]) if with_labels else states


def relevance_rows(source: WorkSource | Config, plan: TargetPlan, refs: np.ndarray, rows: np.ndarray, rule: Rule, *,
                   batch_size: int | None = None, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Conditional relevance of some neurons (rows of a target) and their activation baseline.

    Parameters
    ----------
    source : WorkSource or Config
    plan : TargetPlan
        The target: its layer, neuron ids and attribution layers.
    refs : ndarray (M, n_refs)
        Sample index of every reference of every neuron of the target.
    rows : ndarray
        Positions in ``plan.neurons`` to compute.
    rule : Rule
        Composite, canonizers, whether to multiply by the activation, precision.
    batch_size : int, optional
        Rows per backward pass: the driver's resolved ``relevance.batch_size`` (``auto`` is measured once, by
        the driver); by default the config's, ``auto`` read as 64.
    device : str or torch.device

    Returns
    -------
    dict of str to ndarray
        Per attribution layer and ``activation``, (len(rows), n_refs, C) float32, in the order of ``rows``.
    """
    source = _source(source)
    config = source.config
    model, dataset = source.build(device)
    parts: dict[str, list[np.ndarray]] = {}

    def keep(chunk: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            parts.setdefault(name, []).append(value)
        kill_once_for_test("relevance")

    with rule.engine(model, plan) as engine:
        # chunks are computed and handed back in the order of rows
        compute_target(dataset, plan, refs, np.asarray(rows), engine, keep,
                       batch_size=batch_size or config.relevance.rows_per_pass, num_workers=config.data.num_workers,
                       device=device)
    return {name: np.concatenate(values) for name, values in parts.items()}


def embed_chunk(source: WorkSource | Config, evaluator, indices: np.ndarray, *,
                device: str | torch.device = "cpu") -> np.ndarray:
    """Embeddings of samples ``indices`` (whole images) by an evaluator, (len(indices), D) float32.

    Parameters
    ----------
    source : WorkSource or Config
    evaluator : Evaluator
        Made by :func:`polypure.evaluation.evaluators.make_evaluator`; it computes on its own ``device`` setting, or on
        ``device`` when it has none.
    indices : ndarray
        Sample indices, embedded as one batch.
    device : str or torch.device
    """
    _, dataset = _source(source).build(device)
    if evaluator.settings.device is None:
        evaluator.device = torch.device(device)
    vectors = evaluator.embed_samples(dataset, np.asarray(indices), len(indices))
    kill_once_for_test("embed")
    return vectors
