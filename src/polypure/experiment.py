"""The front door: one object that holds a run's config, model, data and store, and runs its stages.

From a config file (what ``polypure run`` does)::

    from polypure import Experiment
    Experiment("configs/demo.yaml").run()

From a notebook, with an in-memory model and dataset and no YAML (the items go to the model as they
are; ``mean`` and ``std`` say how they were normalised, so that evaluators and thumbnails get pixels)::

    import torchvision
    exp = Experiment(model=torchvision.models.resnet18(), dataset=my_dataset, store="r18.h5",
                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                     topk={"k": 20}, relevance={"neurons": "0:8", "n_refs": 20})
    exp.topk()
    exp.relevance()

Each stage reads what the one before wrote to the store, skips work that is already complete for the
same config, and can run alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polypure.allocator import keep_freed_memory
from polypure.attribution.precision import resolve_device
from polypure.config.settings import Config, config_from_dict, load_config
from polypure.data.datasets import MEMORY_DATA_KEYS, PolypureDataset, WrappedDataset, build_dataset
from polypure.errors import ConfigError
from polypure.models.factory import ExplainedModel, build_model
from polypure.pipeline.preflight import check_evaluators
from polypure.pipeline.stages import NAMES
from polypure.pipeline.stages import get as get_stage
from polypure.store.hdf5_store import Store

log = logging.getLogger("polypure")

#: Stage names in the order ``run`` executes them.
STAGES = NAMES


class Experiment:
    """A run: config, model, dataset and store, with one method per stage.

    Parameters
    ----------
    config : Config, dict, str, Path or None
        A validated config, a raw mapping, a YAML file or bundled config name, or None. With an
        in-memory ``model`` and ``dataset`` the config may be left out.
    model : torch.nn.Module or ExplainedModel, optional
        Explain this network instead of building ``config.model``.
    dataset : torch Dataset or PolypureDataset, optional
        Use these samples instead of building ``config.data``. A torch dataset's items are ``image`` or
        ``(image, label, ...)`` with images (C, H, W) tensors prepared for the model: the model gets them
        as they are (cast to its dtype), and they are never changed. Labels come from the dataset's
        ``labels`` or ``targets`` attribute, else from the items. Of ``config.data`` only ``batch_size``
        and ``num_workers`` apply (see :class:`~polypure.data.datasets.WrappedDataset`).
    mean, std : sequence of float, optional
        The normalisation a torch ``dataset``'s items carry (``(pixels - mean) / std``), which evaluators,
        crops and thumbnails undo to get pixels in [0, 1].
    to_pixels : callable or "identity", optional
        Instead of ``mean`` and ``std``: ``to_pixels(image) -> pixels in [0, 1]``, or ``"identity"`` when
        the items already are pixels. Without any of the three, a run whose evaluators look at images is
        refused here, and the report has no thumbnails.
    store : str or Path, optional
        Where to write (overrides ``config.store``).
    overwrite : bool
        Recompute results the store holds for other settings instead of refusing (a store made for
        another model, data or seed is replaced; a top-K or relevance target made with other settings is
        recomputed with what depends on it), and drop stored neurons the config no longer asks for.
    progress : bool
        Show progress bars.
    overrides : list of str, optional
        ``KEY=VALUE`` overrides applied to a config file.
    **sections
        Config sections as keyword arguments (``topk={"k": 20}``), merged over ``config``.
    """

    def __init__(self, config: Config | dict | str | Path | None = None, *, model=None, dataset=None,
                 mean=None, std=None, to_pixels=None, store: str | Path | None = None, overwrite: bool = False,
                 progress: bool = True, overrides: list[str] | None = None, **sections: Any):
        # large batches reuse freed memory instead of the kernel's fresh, zeroed pages (polypure.allocator)
        keep_freed_memory()
        in_memory = model is not None or dataset is not None
        dataset = _wrap_dataset(dataset, model, mean, std, to_pixels)
        if isinstance(config, Config):
            raw = config.model_dump(mode="json")
        elif isinstance(config, dict):
            raw = dict(config)
        elif config is None and in_memory:
            raw = {}
        else:
            raw = load_config(config, overrides).model_dump(mode="json")
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) \
                else value
        if model is not None:
            module = model.module if isinstance(model, ExplainedModel) else model
            raw.setdefault("model", {})["name"] = getattr(model, "name", None) if isinstance(
                model, ExplainedModel) else f"in-memory:{type(module).__name__}"
        if dataset is not None:
            given = [config.get("data") if isinstance(config, dict) else None, sections.get("data")]
            _check_memory_data(given, replaced=None if isinstance(config, dict) else raw.get("data"))
            # loader settings still apply to an in-memory dataset; what the data is does not come from here
            loader = {k: v for k, v in (raw.get("data") or {}).items() if k in MEMORY_DATA_KEYS}
            raw["data"] = {"kind": "memory", "num_workers": 0, **loader}
        if store is not None:
            raw["store"] = str(store)
        self.config = config_from_dict(raw)
        if self.config.data is None and dataset is None:
            raise ConfigError("config: data: missing required section")
        self._model_arg = model
        self._dataset_arg = dataset
        # evaluators are checked now, not with the rest (validate), because they need no model and an in-memory
        # dataset without pixels must be refused before anything is built
        check_evaluators(self.config, self._dataset_arg)
        self.overwrite = overwrite
        self.progress = progress
        self.device = resolve_device(self.config.device)
        self._model: ExplainedModel | None = None
        self._dataset: PolypureDataset | None = None
        self._shapes: dict[str, tuple] = {}
        self._store_checked = False
        self._validated = False
        self.report_path = None
        self._executor = None
        self._writer = None
        self._dirty = False
        if self.config.executor.kind != "local":
            # asked for and not installed: say so now, not after the first stage
            from polypure.pipeline.executor import check_available
            check_available(self.config.executor.kind)

    # -- parts -------------------------------------------------------------------------------------

    @property
    def model(self) -> ExplainedModel:
        """The explained model, built on first use (random weights are seeded by ``config.seed``)."""
        if self._model is None:
            arg = self._model_arg
            if isinstance(arg, ExplainedModel):
                from polypure.models.factory import attach_layers
                model = attach_layers(arg, self.config.model.layers)
            elif isinstance(arg, nn.Module):
                from polypure.models.factory import attach_layers, default_canonizers
                model = attach_layers(ExplainedModel(arg, name=self.config.model.name,
                                                     canonizers=default_canonizers(arg)), self.config.model.layers)
            else:
                model = build_model(self.config)
            model.module.eval().to(self.device)
            self._model = model
        return self._model

    @property
    def dataset(self) -> PolypureDataset:
        """The samples, built on first use."""
        if self._dataset is None:
            arg = self._dataset_arg
            if arg is None:
                self._dataset = build_dataset(self.config.data, self.model)
            else:
                self._dataset = arg
        return self._dataset

    @property
    def num_workers(self) -> int:
        """Loader workers for the data (``data.num_workers``)."""
        return self.config.data.num_workers

    @property
    def batch_size(self) -> int:
        """Samples per forward pass of the top-K stage (``data.batch_size``)."""
        return self.config.data.batch_size

    @property
    def executor(self):
        """Where the top-K, relevance and embedding work runs: None for this process, or a Ray executor.

        A :class:`~polypure.pipeline.executor.RayExecutor` connects on first use and is stopped by :meth:`close`.
        """
        if self._executor is None and self.config.executor.kind != "local":
            import os

            from polypure.pipeline.executor import make_executor
            from polypure.pipeline.work_units import WorkSource
            memory_model = self._model_arg is not None
            source = WorkSource(self.config, model=self.model if memory_model else None,
                                dataset=self._dataset_arg, cwd=os.getcwd())
            self._executor = make_executor(self.config, source)
        return self._executor

    def close(self) -> None:
        """Release the executor's workers (and a Ray this run started); the run can go on later.

        :meth:`run` calls it when it ends, also on an error or Ctrl-C. Stages called one by one share the
        executor's workers until then: call it, or use the experiment as a context manager
        (``with Experiment(...) as exp:``), which calls it on leaving.
        """
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def writing(self):
        """Hold the store for writing: its lock and working copy (:mod:`polypure.store.write_session`), then commit.

        Stages and :meth:`run` enter it; nested entries share one session. On leaving, finished work is
        committed even when an error or Ctrl-C ends the run, and the lock is released.
        """
        if self._writer is not None:
            yield self._writer
            return
        from polypure.store.write_session import WriteSession

        self._writer = WriteSession(self.config.store_path, commit_every=self.config.commit_every).open()
        self._dirty = False
        try:
            yield self._writer
        except OSError as exc:
            # HDF5 reports a full disk as a failed write; say what it is, and where
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
                from polypure.store.write_session import disk_full
                work = self._writer.work_path
                raise disk_full(self.config.store_path, work.stat().st_size if work.exists() else 0) from None
            raise
        finally:
            writer, self._writer = self._writer, None
            writer.close(commit=self._dirty)

    def commit(self) -> None:
        """Make what the stages wrote so far the store (a no-op when nothing changed)."""
        if self._writer is not None and self._dirty:
            self._writer.commit()
            self._dirty = False

    def _checkpoint(self) -> None:
        if self._writer is not None and self._dirty:
            before = self._writer.commits
            self._writer.checkpoint()
            if self._writer.commits != before:
                self._dirty = False

    def _mark_written(self) -> None:
        self._dirty = True

    @contextlib.contextmanager
    def open_store(self):
        """The store, opened for writing (created, or checked against the config, on first use).

        What is written goes to the session's working copy (:meth:`writing`) and becomes the store at the
        next commit: each stage's end, a checkpoint ``commit_every`` seconds after the last, or the end of
        the run.
        """
        with self.writing() as writer:
            options = dict(file=writer.work_path, on_flush=self._checkpoint, on_write=self._mark_written)
            path = self.config.store_path
            if not self._store_checked:
                store = Store.open_for_run(path, self.config.stored_yaml(), overwrite=self.overwrite, **options)
                self._store_checked = True
            else:
                store = Store(path, "a", **options)
            try:
                yield store
            finally:
                store.close()

    def layer_shapes(self, layers: list[str]) -> dict[str, tuple]:
        """Output shapes (without batch) of layers, probed once with the first sample."""
        missing = [name for name in layers if name not in self._shapes]
        if missing:
            self.probe_layers({name: self.model.submodule(name) for name in missing})
        return {name: self._shapes[name] for name in layers}

    def probe_layers(self, modules: dict[str, nn.Module]) -> tuple[dict[str, tuple], list[str]]:
        """Shapes and forward order of layers from one forward pass of the first sample (shapes are kept)."""
        from polypure.attribution.hooks import probe_layers
        x = self.dataset[0][0].unsqueeze(0).to(self.device)
        shapes, order = probe_layers(self.model.module, modules, x)
        self._shapes.update(shapes)
        return shapes, order

    def validate(self, stages: list[str] | None = None) -> Experiment:
        """Check every name and number of the config against the model and data, before any stage runs.

        Called by every stage the first time; call it directly to check a config without computing.

        Parameters
        ----------
        stages : list of str, optional
            The stages about to run (None: all); the report's settings are checked where it is one of them.

        Raises
        ------
        ConfigError
            With one line naming the key and the problem.
        """
        if not self._validated:
            from polypure.pipeline.preflight import check_experiment
            check_experiment(self, stages)
            self._validated = True
        return self

    def check_rules(self, samples: int | None = None, neurons: int | None = None, ideal: bool = False):
        """Check the config's relevance rules on this experiment's model and first samples, before computing.

        What ``polypure check-rules`` does for a config file, for any model and data an ``Experiment`` holds
        (an in-memory network included): per rule variant and layer, conservation of relevance, canonizer
        output changes, silent and non-finite rows.

        Parameters
        ----------
        samples : int, optional
            The first this many samples (default 8, or all where there are fewer).
        neurons : int, optional
            The first this many selected neurons of each target (default 4).
        ideal : bool
            Check a copy without biases and normalisation shifts, where LRP composites conserve exactly.

        Returns
        -------
        polypure.attribution.rule_checks.RuleReport
            ``table()`` formats it; ``passed`` and ``failures`` say what failed.
        """
        from polypure.attribution.rule_checks import check_model
        return check_model(self.config, self.model, self.dataset, samples, neurons, ideal)

    def log(self, message: str) -> None:
        """Report a line of progress through the ``polypure`` logger."""
        log.info(message)

    # -- stages ------------------------------------------------------------------------------------

    def _stage(self, name: str, **options):
        """Run one stage (:mod:`polypure.pipeline.stages`) after checking the config, and commit what it wrote."""
        self.validate([name])
        if get_stage(name).WRITES:
            with self.writing():
                result = get_stage(name).run(self, **options)
                self.commit()
            return result
        return get_stage(name).run(self, **options)

    def topk(self) -> Experiment:
        """Find each needed layer's top-K references (streaming, resumable)."""
        self._stage("topk")
        return self

    def dictionary(self) -> Experiment:
        """Learn each configured dictionary on its layer's activations and decompose the layer's neurons into it."""
        self._stage("dictionary")
        return self

    def relevance(self) -> Experiment:
        """Compute the conditional relevance of every selected neuron's references."""
        self._stage("relevance")
        return self

    def embed(self) -> Experiment:
        """Embed every target's references with the configured evaluators (CLIP, DINOv2, ...)."""
        self._stage("embed")
        return self

    def cluster(self, methods: dict[str, Any] | None = None) -> Experiment:
        """Cluster each neuron's references in every space.

        Parameters
        ----------
        methods : dict of str to estimator, optional
            Objects with ``fit_predict(X)`` by method id, instead of ``config.cluster.methods``.
        """
        self._stage("cluster", methods=methods)
        return self

    def selectivity(self) -> Experiment:
        """Ablate each cluster's circuit to test whether the split is real (``selectivity.enabled``)."""
        self._stage("selectivity")
        return self

    def evaluate(self) -> Experiment:
        """Compute per-neuron metrics and the summary table from the store (kept as ``summary``)."""
        self.summary = self._stage("evaluate")
        return self

    def report(self) -> Experiment:
        """Write the browsable HTML report of the store (``report.enabled``); its path is ``report_path``."""
        self.report_path = self._stage("report")
        return self

    def run(self, stages: list[str] | None = None) -> Experiment:
        """Run stages in order (default: every stage of :data:`polypure.pipeline.stages.NAMES`), after :meth:`validate`."""
        chosen = list(stages or STAGES)
        for name in chosen:
            get_stage(name)
        self.validate(chosen)
        try:
            # one session for every stage: no other writer can slip in between two of them
            with self.writing() if any(get_stage(name).WRITES for name in chosen) else contextlib.nullcontext():
                for name in chosen:
                    getattr(self, name)()
        finally:
            self.close()
        return self


def _wrap_dataset(dataset, model, mean, std, to_pixels) -> PolypureDataset | None:
    """An in-memory ``dataset`` as a PolypureDataset, with the ways to pixels that only a torch dataset takes."""
    given = [name for name, value in (("mean", mean), ("std", std), ("to_pixels", to_pixels)) if value is not None]
    if given and dataset is None:
        raise ConfigError(f"{', '.join(given)}: these describe the items of a dataset passed as "
                          "Experiment(dataset=...); data built from the config is normalised by data.normalize")
    if given and isinstance(dataset, PolypureDataset):
        raise ConfigError(f"{', '.join(given)}: a polypure dataset ({type(dataset).__name__}) makes its own pixels "
                          "and model inputs; these are for other torch datasets")
    if dataset is None or isinstance(dataset, PolypureDataset):
        return dataset
    return WrappedDataset(dataset, mean=mean, std=std, to_pixels=to_pixels, dtype=_input_dtype(model))


def _input_dtype(model) -> torch.dtype:
    """The floating dtype of a model's parameters: what an in-memory dataset's items are cast to."""
    module = model.module if isinstance(model, ExplainedModel) else model
    if isinstance(module, nn.Module):
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    # a model built from the config (or one without parameters) computes in float32
    return torch.float32


def _check_memory_data(given: list[dict | None], replaced: dict | None) -> None:
    """Refuse data settings given beside an in-memory dataset that would not apply to it.

    Parameters
    ----------
    given : list of dict or None
        ``data`` mappings the caller wrote for this run (a dict config's, the ``data=`` keyword's).
    replaced : dict or None
        The ``data`` section of a config file or Config object, which described other data: it is
        replaced (and says so in the log) rather than refused.
    """
    for data in given:
        for key, value in (data or {}).items():
            if key in MEMORY_DATA_KEYS or (key == "kind" and value == "memory"):
                continue
            if key == "normalize":
                raise ConfigError("data.normalize does not apply to an in-memory dataset: its items go to the model "
                                  "as they are; pass Experiment(..., mean=..., std=...) to say how they were "
                                  "normalised, so that evaluators and thumbnails get pixels back")
            raise ConfigError(f"data.{key} does not apply to an in-memory dataset: its items go to the model as they "
                              f"are (of data, only {' and '.join(MEMORY_DATA_KEYS)} apply)")
    if replaced and replaced.get("kind") not in (None, "memory"):
        log.info("data: the in-memory dataset replaces the config's data (kind %s); only %s apply",
                 replaced.get("kind"), " and ".join(MEMORY_DATA_KEYS))
