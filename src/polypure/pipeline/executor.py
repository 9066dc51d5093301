"""Where a run's heavy work goes: this process (``executor.kind: local``) or the workers of a Ray cluster.

The stages stay the only writers of the store. With Ray they cut their work into units
(:mod:`polypure.pipeline.work_units`), a :class:`RayExecutor` runs the units on a pool of ``executor.workers``
actors, and the stage merges what comes back as it arrives:

* top-K: shards of sample indices; the stage folds each shard's partial top-K into its state in sample
  order and checkpoints after each, so an interrupted distributed pass resumes where the local one would;
* relevance: ranges of whole neurons; the stage writes each range's rows and marks them complete;
* embeddings: chunks of the unique reference images.

The actors are started once per executor (one per run: :meth:`polypure.Experiment.close` stops them) and
serve every stage: each builds the model and the data once, on its own device, and keeps the evaluators
it loads. Worker processes, their imports and their models are what a Ray run pays on top of a local one,
so none of it is paid twice (top-K shards as Ray tasks would start processes of their own).

Units are cut at the boundaries of the local computation's batches and chunks, so each row a worker
computes runs in passes of the size the local run gives it (the size is what a row's numbers can depend on:
:mod:`polypure.attribution.sharing`), and the store comes out the same. An actor that dies is restarted
(building its model again) and its calls are retried. The data and the weights must be readable at the
same path on every worker (relative paths mean the driver's working directory; a worker changes into it
where that folder exists).

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
    """Runs units of work on a pool of Ray actors that serves every stage of a run.

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
    (and stopped by :meth:`close`). The ``executor.workers`` actors are started then too, once: top-K,
    relevance and embeddings all run on them, so a run starts its worker processes and builds its model in
    each of them once, whatever the number of stages, targets and variants.
    """

    def __init__(self, config: Config, source: WorkSource | None):
        self.ray = _import_ray()
        self.config = config
        self.settings = config.executor
        self.source = source
        self._started = False
        self._actors: list = []
        self._source_ref = None
        #: Actors this executor started (a restart after a crash is Ray's, not counted here).
        self.actors_started = 0

    # -- connection --------------------------------------------------------------------------------

    def _connect(self) -> None:
        ray = self.ray
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

    def close(self) -> None:
        """Stop the actors (and Ray, where this executor started it); safe to call twice."""
        ray = self.ray
        # killed, not asked to finish: after an error or Ctrl-C, what an actor still computes is of no use
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
        """The actors, started on the first call (every stage after it gets the same ones)."""
        self._connect()
        if not self._actors:
            worker = self.ray.remote(_Worker).options(max_restarts=3, max_task_retries=3, **self._resources)
            # the source by value where it is small (a config): Ray keeps it with the actor for restarts, instead of
            # depending on an object-store copy; a shipped in-memory model goes through the store, once for all actors
            source = self.source
            if source.model is not None or source.dataset is not None:
                self._source_ref = source = self.ray.put(self.source)  # held here while the actors may restart
            self._actors = [worker.remote(source, self._device()) for _ in range(self.settings.workers)]
            self.actors_started += len(self._actors)
        return self._actors

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per actor: its process id (``pid``), how often that process built the model (``builds``), its calls.

        ``calls`` counts the units each kind of work (``topk``, ``relevance``, ``embed``) sent to the process.
        An actor restarted after a crash is a new process and counts from zero.
        """
        return self.ray.get([actor.stats.remote() for actor in self._actors])

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
        """Each shard's :func:`polypure.pipeline.work_units.topk_shard` result, ``(shard number, result)``, as they finish.

        Two shards per actor are in flight at a time: a shard's partial top-K waits in the object store only
        until the stage merges it.
        """
        actors = self._actor_pool()
        calls = [(number, lambda actor, start=start, stop=stop: actor.topk.remote(layers, start, stop, virtual, done,
                                                                                  with_labels))
                 for number, (start, stop) in enumerate(shards)]
        yield from self._on_actors(actors, calls)

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
    """A Ray actor: the model and data built once on the actor's device, evaluators loaded on first use.

    One actor serves every stage of a run, so what it builds is built once per process.
    """

    def __init__(self, source: WorkSource, device: str):
        import torch

        from polypure.allocator import keep_freed_memory

        keep_freed_memory()
        self.source = source
        self.device = device if device != "cuda" or torch.cuda.is_available() else "cpu"
        self.evaluators: dict[str, Any] = {}
        self.calls: dict[str, int] = {}
        source.build(self.device)

    def _count(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def topk(self, layers: list[str], start: int, stop: int, virtual: dict | None, done: dict[str, int],
             with_labels: bool):
        from polypure.pipeline.work_units import topk_shard

        self._count("topk")
        return topk_shard(self.source, layers, start, stop, virtual=virtual, done=done, with_labels=with_labels,
                          device=self.device)

    def relevance(self, plan: TargetPlan, refs: np.ndarray, rows: np.ndarray, rule: Rule,
                  batch_size: int) -> dict[str, np.ndarray]:
        from polypure.pipeline.work_units import relevance_rows

        self._count("relevance")
        return relevance_rows(self.source, plan, refs, rows, rule, batch_size=batch_size, device=self.device)

    def embed(self, name: str, settings: dict, indices: np.ndarray) -> np.ndarray:
        from polypure.evaluation.evaluators import make_evaluator
        from polypure.pipeline.work_units import embed_chunk

        self._count("embed")
        key = repr((name, sorted(settings.items())))
        if key not in self.evaluators:
            self.evaluators[key] = make_evaluator(name, settings)
        return embed_chunk(self.source, self.evaluators[key], indices, device=self.device)

    def stats(self) -> dict[str, Any]:
        from polypure.pipeline.work_units import builds

        return {"pid": os.getpid(), "builds": builds(), "calls": dict(self.calls)}


def _forwarded_env() -> dict[str, str]:
    """Environment variables a local Ray's workers get from the driver (the crash test's hook, the allocator's switch)."""
    from polypure.allocator import ENVIRONMENT
    from polypure.pipeline.work_units import KILL_ONCE_ENV

    return {key: os.environ[key] for key in (KILL_ONCE_ENV, ENVIRONMENT) if key in os.environ}


def check_available(kind: str) -> None:
    """Raise the one-line error for an executor kind that cannot run here (``ray`` without Ray)."""
    if kind not in KINDS:
        raise PolypureError(f"executor.kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "ray":
        _import_ray()
