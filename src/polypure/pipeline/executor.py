"""Where a run's heavy work goes: this process (``executor.kind: local``) or the workers of a Ray cluster.

The stages stay the only writers of the store. With Ray they cut their work into units
(:mod:`polypure.pipeline.work_units`), a :class:`RayExecutor` runs the units on the cluster, and the stage merges what comes
back as it arrives:

* top-K: shards of sample indices as Ray tasks; the stage folds each shard's partial top-K into its state
  in sample order and checkpoints after each, so an interrupted distributed pass resumes where the local
  one would;
* relevance: ranges of whole neurons on a pool of actors, each holding the model on its own device; the
  stage writes each range's rows and marks them complete;
* embeddings: chunks of the unique reference images on the same actors.

Units are cut at the boundaries of the local computation's batches and chunks, so each row a worker
computes runs in passes of the size the local run gives it (the size is what a row's numbers can depend on:
:mod:`polypure.attribution.sharing`), and the store comes out the same. A task whose worker dies is
retried (Ray's task retries), an actor that dies is restarted with its calls retried. The data and the
weights must be readable at the same path on every worker (relative paths mean the driver's working
directory; a worker changes into it where that folder exists).

Example
-------
>>> from polypure.config.settings import load_config
>>> from polypure.pipeline.executor import make_executor
>>> make_executor(load_config("demo"), None) is None  # local: the stages compute in this process
True
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from polypure.errors import ConfigError, PolypureError

if TYPE_CHECKING:
    from polypure.attribution.relevance_plan import Rule, TargetPlan
    from polypure.config.settings import Config
    from polypure.pipeline.work_units import WorkSource

log = logging.getLogger("polypure")

#: The executor kinds ``executor.kind`` takes.
KINDS = ("local", "ray")


def make_executor(config: Config, source: WorkSource | None) -> RayExecutor | None:
    """The executor of ``config.executor``: None for ``local`` (the stages compute in-process).

    Raises
    ------
    ConfigError
        For ``kind: ray`` where Ray is not installed (one line naming the extra).
    """
    if config.executor.kind == "local":
        return None
    return RayExecutor(config, source)


def aligned(size: int, unit: int) -> int:
    """``size`` rounded up to a multiple of ``unit`` (a shard or task cut at a batch's boundary)."""
    return max(unit, -(-size // unit) * unit)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("executor.kind: ray needs Ray, which is not installed; pip install 'polypure[ray]'") from None
    return ray


def _unwrap(exc: Exception) -> Exception:
    """The error a worker raised, instead of Ray's wrapper (a bad config stays a ConfigError, exit 2)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


class RayExecutor:
    """Runs units of work on a Ray cluster: top-K shards as tasks, relevance and embeddings on actors.

    Parameters
    ----------
    config : Config
        The run's config; ``config.executor`` says where and how wide.
    source : WorkSource
        What workers build the model and data from.

    Notes
    -----
    Connects on first use: to ``executor.address`` when given (``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``), to a Ray already initialised in this process, or else to a local Ray started here
    (and stopped by :meth:`close`).
    """

    def __init__(self, config: Config, source: WorkSource | None):
        self.ray = _import_ray()
        self.config = config
        self.settings = config.executor
        self.source = source
        self._started = False
        self._actors: list = []
        self._source_ref = None

    # -- connection --------------------------------------------------------------------------------

    def _connect(self) -> None:
        ray = self.ray
        if self._source_ref is not None:
            return
        if not ray.is_initialized():
            address = self.settings.address
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING,
                         runtime_env={"env_vars": _forwarded_env()} if address is None else None)
            except ConnectionError as exc:
                raise ConfigError(f"executor.address: cannot reach a Ray cluster at {address!r} ({exc})") from None
            self._started = True
            resources = ray.cluster_resources()
            log.info("executor: Ray with %g CPU(s) and %g GPU(s), %d worker(s)", resources.get("CPU", 0),
                     resources.get("GPU", 0), self.settings.workers)
        # shipped once; tasks and actors get the reference, not a copy each
        self._source_ref = ray.put(self.source)

    def close(self) -> None:
        """Stop the actors (and Ray, where this executor started it)."""
        ray = self.ray
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        self._source_ref = None
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    @property
    def _resources(self) -> dict[str, float]:
        return {"num_cpus": self.settings.cpus_per_worker, "num_gpus": self.settings.gpus_per_worker}

    def _device(self) -> str:
        return "cuda" if self.settings.gpus_per_worker > 0 and self.config.device != "cpu" else "cpu"

    def _actor_pool(self) -> list:
        self._connect()
        if not self._actors:
            worker = self.ray.remote(_Worker).options(max_restarts=3, max_task_retries=3, **self._resources)
            # the source by value where it is small (a config): Ray keeps it with the actor for restarts, instead of
            # depending on an object-store copy (a shipped in-memory model still goes through the store)
            source = self.source if self.source.model is None and self.source.dataset is None else self._source_ref
            self._actors = [worker.remote(source, self._device()) for _ in range(self.settings.workers)]
        return self._actors

    def _gather(self, pending: dict) -> Iterator[tuple[Any, Any]]:
        """``(pending[ref], result)`` of submitted calls as they finish; a worker's own error is raised as it is.

        ``pending`` maps object refs to what the caller needs back; the caller may add to it between items.
        """
        ray = self.ray
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                key = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    raise _unwrap(exc) from None
                yield key, result
        finally:
            # an error or an interrupted run: what is still running is of no use
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:  # a call that finished meanwhile cannot be cancelled
                    pass

    # -- work --------------------------------------------------------------------------------------

    def topk(self, layers: list[str], virtual: dict | None, shards: list[tuple[int, int]],
             done: dict[str, int], with_labels: bool) -> Iterator[tuple[int, Any]]:
        """Each shard's :func:`polypure.pipeline.work_units.topk_shard` result, ``(shard number, result)``, as they finish."""
        from polypure.pipeline.work_units import topk_shard

        self._connect()
        task = self.ray.remote(topk_shard).options(max_retries=3, **self._resources)
        queue = list(enumerate(shards))
        pending: dict = {}
        # a bounded number in flight: a shard's partial top-K waits in the object store until it is merged
        limit = 2 * self.settings.workers
        gathered = self._gather(pending)
        while queue or pending:
            while queue and len(pending) < limit:
                number, (start, stop) = queue.pop(0)
                pending[task.remote(self._source_ref, layers, start, stop, virtual=virtual, done=done,
                                    with_labels=with_labels, device=self._device())] = number
            yield next(gathered)

    def relevance(self, plan: TargetPlan, refs: np.ndarray, tasks: list[np.ndarray], rule: Rule,
                  batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """``(rows, arrays)`` of each range of neurons (:func:`polypure.pipeline.work_units.relevance_rows`), as they finish."""
        actors = self._actor_pool()
        plan_ref, refs_ref = self.ray.put(plan), self.ray.put(refs)
        calls = [(rows, lambda actor, rows=rows: actor.relevance.remote(plan_ref, refs_ref, rows, rule, batch_size))
                 for rows in tasks]
        yield from self._on_actors(actors, calls)

    def embed(self, name: str, settings: dict, chunks: list[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """``(chunk number, embeddings)`` of chunks of sample indices (:func:`polypure.pipeline.work_units.embed_chunk`)."""
        actors = self._actor_pool()
        calls = [(number, lambda actor, chunk=chunk: actor.embed.remote(name, settings, chunk))
                 for number, chunk in enumerate(chunks)]
        yield from self._on_actors(actors, calls)

    def _on_actors(self, actors: list, calls: list) -> Iterator[tuple[Any, Any]]:
        # two calls per actor in flight: the next one is queued while the actor returns the last
        queue = list(calls)
        pending: dict = {}
        gathered = self._gather(pending)

        def submit(actor):
            key, call = queue.pop(0)
            pending[call(actor)] = (key, actor)

        for actor in actors * 2:
            if queue:
                submit(actor)
        while pending:
            (key, actor), result = next(gathered)
            if queue:
                submit(actor)
            yield key, result


class _Worker:
    """A Ray actor: the model and data built once on the actor's device, evaluators loaded on first use."""

    def __init__(self, source: WorkSource, device: str):
        import torch

        self.source = source
        self.device = device if device != "cuda" or torch.cuda.is_available() else "cpu"
        self.evaluators: dict[str, Any] = {}
        source.build(self.device)

    def relevance(self, plan: TargetPlan, refs: np.ndarray, rows: np.ndarray, rule: Rule,
                  batch_size: int) -> dict[str, np.ndarray]:
        from polypure.pipeline.work_units import relevance_rows

        return relevance_rows(self.source, plan, refs, rows, rule, batch_size=batch_size, device=self.device)

    def embed(self, name: str, settings: dict, indices: np.ndarray) -> np.ndarray:
        from polypure.evaluation.evaluators import make_evaluator
        from polypure.pipeline.work_units import embed_chunk

        key = repr((name, sorted(settings.items())))
        if key not in self.evaluators:
            self.evaluators[key] = make_evaluator(name, settings)
        return embed_chunk(self.source, self.evaluators[key], indices, device=self.device)


def _forwarded_env() -> dict[str, str]:
    """Environment variables a local Ray's workers get from the driver (the crash test's hook)."""
    from polypure.pipeline.work_units import KILL_ONCE_ENV

    return {key: os.environ[key] for key in (KILL_ONCE_ENV,) if key in os.environ}


def check_available(kind: str) -> None:
    """Raise the one-line error for an executor kind that cannot run here (``ray`` without Ray)."""
    if kind not in KINDS:
        raise PolypureError(f"executor.kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "ray":
        _import_ray()
