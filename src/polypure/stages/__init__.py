"""The stages of a run, in the order ``polypure run`` executes them.

Each stage is a module here with the same small contract: ``NAME``, a one-line ``HELP``, ``WRITES``
(whether it writes the store: a run holds the store's lock and commits after such a stage) and
``run(context, **options)``. A stage reads what the stages before it wrote to the store, calls an engine
(:mod:`polypure.topk`, :mod:`polypure.attribution`, :mod:`polypure.clustering`, ...) and writes its own
results; it skips work the store already holds for the same settings, so every stage can run alone and
again. The context is anything that satisfies :class:`~polypure.stages.context.StageContext` (an
:class:`~polypure.experiment.Experiment` does). Stage modules import their engines inside ``run`` so that
listing the stages (``polypure --help``) stays fast.

Example
-------
>>> from polypure.stages import NAMES, get
>>> NAMES
('topk', 'relevance', 'embed', 'cluster', 'evaluate', 'report')
>>> get("cluster").HELP
"cluster each neuron's references in every space"
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError
from . import cluster, embed, evaluate, relevance, report, topk

#: The stage modules, in run order.
STAGES: tuple[ModuleType, ...] = (topk, relevance, embed, cluster, evaluate, report)
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
