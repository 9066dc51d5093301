"""The stages of a run, in the order ``polypure run`` executes them.

Each stage is a module here with the same small contract: ``NAME``, a one-line ``HELP``, ``WRITES``
(whether it writes the store: a run holds the store's lock and commits after such a stage) and
``run(context, **options)``. A stage reads what the stages before it wrote to the store, calls an engine
(:mod:`polypure.attribution.topk`, :mod:`polypure.attribution.engine`, :mod:`polypure.evaluation.clustering`, ...) and writes its own
results; it skips work the store already holds for the same settings, so every stage can run alone and
again. The context is anything that satisfies :class:`~polypure.pipeline.context.StageContext` (an
:class:`~polypure.experiment.Experiment` does). Stage modules import their engines inside ``run`` so that
listing the stages (``polypure --help``) stays fast.

Example
-------
>>> from polypure.pipeline.stages import NAMES, get
>>> NAMES
('topk', 'dictionary', 'relevance', 'embed', 'cluster', 'selectivity', 'evaluate', 'report')
>>> get("cluster").HELP
"cluster each neuron's references in every space"
"""

from __future__ import annotations

from types import ModuleType

from polypure.errors import ConfigError
from polypure.pipeline import (
    cluster_stage,
    dictionary_stage,
    embed_stage,
    evaluate_stage,
    relevance_stage,
    report_stage,
    selectivity_stage,
    topk_stage,
)

#: The stage modules, in run order. ``dictionary`` needs only the top-K (its spaces decompose the references), so
#: it runs right after it; ``selectivity``, the causal test of the splits, reads the clusters and writes metrics
#: the evaluate stage summarises.
STAGES: tuple[ModuleType, ...] = (
    topk_stage,
    dictionary_stage,
    relevance_stage,
    embed_stage,
    cluster_stage,
    selectivity_stage,
    evaluate_stage,
    report_stage,
)
#: Their names, in run order.
NAMES: tuple[str, ...] = tuple(stage.NAME for stage in STAGES)


def get(name: str) -> ModuleType:
    """The stage module of a name.

    Raises
    ------
    ConfigError
        For a name that is no stage, listing the stages.
    """
    for stage in STAGES:
        if stage.NAME == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(NAMES)}")
