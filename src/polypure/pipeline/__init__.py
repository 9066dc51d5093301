"""The pipeline: the stages of a run and where their work is done.

- :mod:`~polypure.pipeline.stages`: the stage list, in run order (its one owner);
- :mod:`~polypure.pipeline.context`: what a stage may use of its run;
- ``*_stage`` modules: one stage each (top-K, relevance, embed, cluster, selectivity, evaluate, report);
- :mod:`~polypure.pipeline.preflight`: checks of every name and number before the first stage;
- :mod:`~polypure.pipeline.executor`: this process or a Ray cluster;
- :mod:`~polypure.pipeline.work_units`: units of work that need no store (shards, ranges, chunks).
"""
