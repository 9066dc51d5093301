"""A store's results for notebooks: per-neuron metrics, the summary and comparisons as pandas DataFrames.

:func:`open_results` opens a store read-only and gives

* :meth:`Results.metrics`: every per-neuron metric in long form, one row per neuron, space, cluster method,
  reference or label set and metric, with the value (NaN kept) and why a missing value is missing;
* :meth:`Results.summary`: the stored summary table (:data:`polypure.evaluation.summary.FIELDS`);
* :meth:`Results.comparisons`: the comparisons the evaluate stage stored (the config's ``compare`` section:
  :mod:`polypure.evaluation.comparisons`), Holm-adjusted over the whole run;
* :meth:`Results.compare`: one metric (or every one) compared between each space and a baseline space over
  the same neurons (:func:`polypure.evaluation.statistics.paired`), computed from the stored per-neuron metrics when asked
  for, Holm-adjusted over the returned table;
* :meth:`Results.relevance`, :meth:`Results.embeddings`, :meth:`Results.features`: the arrays, as numpy;
* :attr:`Results.targets`, :meth:`Results.neurons`, :meth:`Results.attribution_layers`, :meth:`Results.spaces`,
  :meth:`Results.embedding_spaces`: what the store holds, by the names (and with the values) of the
  :class:`~polypure.store.hdf5_store.Store` methods of the same name.

:func:`export` (``polypure export STORE DIR``) writes the three tables as CSV or Parquet files.

Example
-------
>>> import polypure                                                    # doctest: +SKIP
>>> with polypure.open_results("storage/demo.h5") as results:         # doctest: +SKIP
...     metrics = results.metrics()
...     table = results.compare("ARI shape", baseline="activation", target="block_3")
>>> metrics.groupby(["space", "metric", "of"]).value.mean()          # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from polypure.config.paths import require_output_folder
from polypure.errors import ConfigError
from polypure.evaluation import comparisons, summary
from polypure.evaluation.metrics import REASONS
from polypure.store.hdf5_store import Store
from polypure.store.schema import planted_layer

#: Columns of :meth:`Results.metrics`.
METRIC_COLUMNS = ("target", "neuron", "row", "mode", "space", "method", "of", "metric", "value", "skipped")
#: Columns of :meth:`Results.compare` and :meth:`Results.comparisons`.
COMPARISON_COLUMNS = comparisons.COLUMNS
#: The tables :func:`export` writes, one file each.
TABLES = ("metrics", "summary", "comparisons")
#: Metric names, in the order the summary shows them: reference-space metrics, purity, selectivity, then ground truth.
METRICS = summary.KINDS

#: Integer and float columns of the three tables (a comparison's own are :mod:`polypure.evaluation.comparisons`').
_INTS = ("neuron", "row", "neurons", *comparisons.INTS)
_FLOATS = ("value", "mean", "std", *comparisons.FLOATS)


def open_results(path: str | Path) -> Results:
    """Open a store's results read-only (see :class:`Results`)."""
    return Results(path)


class Results:
    """The results of one store, read-only, as DataFrames and arrays.

    A context manager: ``with open_results(path) as results: ...`` closes the file at the end; otherwise
    :meth:`close` does, or the garbage collector.

    Parameters
    ----------
    path : str or Path
        A store written by polypure.

    Attributes
    ----------
    store : polypure.store.hdf5_store.Store
        The open store, for anything not offered here.

    Raises
    ------
    StoreError
        If the file is missing or not a polypure store.
    """

    def __init__(self, path: str | Path):
        self.store = Store(path, "r")

    @property
    def path(self) -> Path:
        """The store's file."""
        return self.store.path

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    def __enter__(self) -> Results:
        """Return the results themselves, closed at the end of the ``with`` block."""
        return self

    def __exit__(self, *exc) -> None:
        """Close the store."""
        self.close()

    def __repr__(self) -> str:
        """Return the store's path and targets."""
        return f"Results({str(self.path)!r}, targets={self.targets})"

    # -- what the store holds ----------------------------------------------------------------------

    @property
    def targets(self) -> list[str]:
        """The relevance targets (``block_3``, ``logits``, ``block_3@planted``), in store order."""
        return self.store.relevance_targets()

    def config(self) -> dict:
        """The resolved config the store was last written with."""
        return self.store.config()

    def neurons(self, target: str) -> np.ndarray:
        """Neuron (or virtual-neuron) id of every row of a target: (M,) int64."""
        return self.store.neurons(self._target(target))

    def attribution_layers(self, target: str) -> list[str]:
        """A target's attribution layers (``block_2``), from the lowest as configured."""
        return self.store.attribution_layers(self._target(target))

    def spaces(self, target: str) -> list[str]:
        """A target's own spaces: every rule variant's attribution layers (``lrp:block_2``), then ``activation``."""
        return self.store.spaces(self._target(target))

    def embedding_spaces(self, target: str) -> list[str]:
        """The evaluators with embeddings of a target: spaces of :meth:`features` beside :meth:`spaces`."""
        return self.store.embedding_spaces(self._target(target))

    def relevance(self, target: str, space: str) -> np.ndarray:
        """A target's relevance in one space, or its ``activation`` baseline: (M, n_refs, C) float32.

        A space is an attribution layer of the ``default`` rule variant (``block_2``) or of another variant
        (``lrp:block_2``).

        Raises
        ------
        ConfigError
            If ``space`` is not a relevance space of the target nor ``activation``.
        """
        spaces = self.spaces(target)
        if space not in spaces:
            raise ConfigError(f"target {target!r} has no relevance at {space!r}; its spaces: {', '.join(spaces)}")
        return self.store.relevance(target, space)

    def embeddings(self, evaluator: str, target: str) -> np.ndarray:
        """An evaluator's embedding of every reference of a target: (M, n_refs, D) float32.

        Raises
        ------
        ConfigError
            If the store has no embeddings of the target by that evaluator.
        """
        known = self.embedding_spaces(target)
        if evaluator not in known:
            raise ConfigError(f"no {evaluator!r} embeddings of target {target!r} in the store; evaluators with "
                              f"embeddings of it: {', '.join(known) or 'none'}")
        return self.store.embeddings(evaluator, target)

    def features(self, target: str, space: str) -> np.ndarray:
        """The vectors a space gives a target's references (relevance, activation or an embedding): (M, n_refs, D).

        Raises
        ------
        ConfigError
            If the target has no such space (:meth:`spaces`, :meth:`embedding_spaces`).
        """
        spaces = [*self.spaces(target), *self.embedding_spaces(target)]
        if space not in spaces:
            raise ConfigError(f"target {target!r} has no space {space!r}; its spaces: {', '.join(spaces)}")
        return self.store.features(target, space)

    def _target(self, target: str) -> str:
        if target not in self.targets:
            raise ConfigError(f"store {str(self.path)!r} has no target {target!r}; targets: "
                              f"{', '.join(self.targets) or 'none'}")
        return target

    # -- tables ------------------------------------------------------------------------------------

    def metrics(self, target: str | None = None) -> pd.DataFrame:
        """Every per-neuron metric of the store (or of one target) in long form.

        Parameters
        ----------
        target : str, optional
            Only this target.

        Returns
        -------
        DataFrame
            One row per neuron and stored metric, with the columns of :data:`METRIC_COLUMNS`:

            - ``target``, ``neuron`` (its id), ``row`` (its row in the target's arrays, as in
              :meth:`relevance`);
            - ``mode``: the planted mode (``sum``, ``max``) of a virtual neuron, ``""`` for a real one;
            - ``space``: where the clustering or distances were computed;
            - ``method``: the cluster method id, ``""`` for a distance correlation (no clustering);
            - ``of``: the reference space (``corr``, ``inner``, ``inter``, ``gain`` and the purity scores) or
              the label set (``ARI``, ``NMI``): ``metric + " " + of`` is the summary's metric label
              (``ARI shape``). The purity scores ``clarity``, ``polysem``, ``mono-topK`` (monosemanticity
              restricted to the neuron's top-K references) and ``redundancy`` (the neuron's largest
              similarity with another neuron; its mean over a target is the target's redundancy) are one
              value per neuron: their ``space`` is the reference space and their ``method`` ``""``;
              ``selectivity`` (the causal test of a clustering, :mod:`polypure.evaluation.selectivity`) is
              ``of`` ``circuit`` (each cluster's circuit ablated) or ``null`` (random sets of as many
              channels, or concepts in a dictionary space, instead);
            - ``metric``: one of :data:`METRICS`; ``value``: float, NaN where there is no score;
            - ``skipped``: why there is none, from the stored checks (``constant``, ``one-hot``,
              ``all-noise``, ``one-cluster``, ``one-label``, ``unique-labels``, comma-separated; ``undefined`` for a NaN no check
              explains), ``""`` for a score. Counted per group, these are the summary's ``skipped``.

            String columns hold ``""``, never a missing value, so that ``groupby`` keeps every row.
        """
        targets = self.targets if target is None else [self._target(target)]
        parts = [self._target_metrics(t) for t in targets]
        parts = [p for p in parts if len(p)]
        frame = pd.concat(parts, ignore_index=True) if parts else _empty(METRIC_COLUMNS)
        return _typed(frame)

    def _target_metrics(self, target: str) -> pd.DataFrame:
        store = self.store
        neurons = store.neurons(target)
        rows = np.arange(len(neurons))
        layer = planted_layer(target)
        modes = store.planted_modes(layer) if layer is not None else None
        mode = np.asarray(modes if modes is not None and len(modes) == len(neurons) else [""] * len(neurons),
                          dtype=object)
        columns: dict[str, list] = {name: [] for name in METRIC_COLUMNS}
        for metric, of, space, method, values, check in self.metric_values(target):
            because = summary.reasons(store, target, **check)
            values = np.asarray(values, np.float64)
            reasons = [", ".join(r for r in REASONS if because[r][i]) for i in rows]
            reasons = [r or (summary.UNDEFINED if not np.isfinite(v) else "") for r, v in zip(reasons, values, strict=True)]
            for name, column in (("target", [target] * len(rows)), ("neuron", neurons), ("row", rows),
                                 ("mode", mode), ("space", [space] * len(rows)), ("method", [method] * len(rows)),
                                 ("of", [of] * len(rows)), ("metric", [metric] * len(rows)), ("value", values),
                                 ("skipped", reasons)):
                columns[name].append(np.asarray(column, dtype=object if name not in _INTS + _FLOATS else None))
        if not columns["target"]:
            return _empty(METRIC_COLUMNS)
        return pd.DataFrame({name: np.concatenate(parts) for name, parts in columns.items()})

    def metric_values(self, target: str) -> list[tuple[str, str, str, str, np.ndarray, dict]]:
        """Every per-neuron metric of a target as arrays, in the order of :meth:`metrics`.

        Returns
        -------
        list of tuple
            ``(metric, of, space, method, values, check)``: the columns of :meth:`metrics` of the same
            name, ``values`` (M,) in the target's row order, and ``check`` the keyword arguments of
            :func:`polypure.evaluation.summary.reasons` for the metric.
        """
        target = self._target(target)
        out = list(summary.metric_entries(self.store, target))
        names = summary.names_order(self.store)
        spaces = [*self.spaces(target), *self.embedding_spaces(target)]
        methods = self.store.cluster_methods(target)

        def position(item: list[str], name: str) -> int:
            return item.index(name) if name in item else len(item)

        def order(entry):
            metric, of, space, method = entry[:4]
            return (metric in summary.GROUND_TRUTH, position(names, of), of, METRICS.index(metric),
                    position(spaces, space), space, position(methods, method), method)

        return sorted(out, key=order)

    def summary(self) -> pd.DataFrame:
        """The stored summary table: one row per group of neurons, space, method and metric label.

        Returns
        -------
        DataFrame
            The columns of :data:`polypure.evaluation.summary.FIELDS` (``target, group, space, method, metric, mean,
            std, n, neurons, skipped``), as :func:`polypure.evaluation.summary.read` gives them; empty before the
            evaluate stage ran.
        """
        return _typed(pd.DataFrame(summary.read(self.store), columns=list(summary.FIELDS)))

    def compare(self, metric: str | None = None, baseline: str | None = None, *, target: str | None = None,
                group: str | None = None, method: str | None = None, n_resamples: int = 2000,
                confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """Compare a metric between every space and a baseline space, over the same neurons.

        For each target, group of neurons (as in the summary: the target, its neurons polysemantic by
        ``evaluate.polysemantic_by``, the virtual neurons of each planted mode), cluster method and space
        other than the baseline: :func:`polypure.evaluation.statistics.paired` of the baseline's values (``a``) and the
        space's (``b``), so a positive ``mean_diff`` or ``effect`` means the space scores higher. Neurons
        without a score on either side are dropped and counted. The store keeps no comparisons; they are
        computed here from the stored per-neuron metrics.

        Parameters
        ----------
        metric : str, optional
            A metric label as the summary shows it (``"ARI shape"``, ``"corr clip"``, ``"inner clip"``);
            every one by default.
        baseline : str, optional
            The space compared against (``"activation"``, ``"block_2"``); by default each target's
            :meth:`~polypure.store.hdf5_store.Store.baseline_space`, its last attribution layer (the layer right below
            it, where PURE computes relevance).
        target, group, method : str, optional
            Only this target, group of neurons (``"block_3 [polysemantic by shape]"``, ``"block_3@planted
            (max)"``) or cluster method id.
        n_resamples, confidence, seed
            Of the bootstrap interval (:func:`polypure.evaluation.statistics.paired`); the same seed gives the same table.

        Returns
        -------
        DataFrame
            The columns of :data:`COMPARISON_COLUMNS`: the :class:`polypure.evaluation.statistics.PairedResult` of each
            comparison (``space_a`` the baseline, ``space_b`` the space) and ``p_holm``, its p-value
            Holm-adjusted over every row of the returned table (a narrower table is a smaller family).

        Raises
        ------
        ConfigError
            If ``metric``, ``baseline``, ``target``, ``group`` or ``method`` is named and gives no comparison;
            the message names what there is.
        """
        if target is not None:
            self._target(target)
        polysemantic_by = (self.config().get("evaluate") or {}).get("polysemantic_by")
        rows = comparisons.compare(self.store, metrics=None if metric is None else [metric], baseline=baseline,
                                   target=target, group=group, method=method, polysemantic_by=polysemantic_by,
                                   n_resamples=n_resamples, confidence=confidence, seed=seed)
        return _typed(pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS)))

    def comparisons(self) -> pd.DataFrame:
        """The comparisons the evaluate stage stored (``/comparisons``), as the config's ``compare`` asked.

        Returns
        -------
        DataFrame
            The columns of :data:`COMPARISON_COLUMNS`, every target's rows, ``p_holm`` Holm-adjusted over the
            whole table; empty before the evaluate stage ran. :attr:`comparison_settings` tells how they
            were made.
        """
        rows, _ = comparisons.read(self.store)
        return _typed(pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS)))

    @property
    def comparison_settings(self) -> dict:
        """The settings of the stored comparisons: ``seed``, ``n_resamples``, ``confidence``, ``baseline``."""
        return comparisons.read(self.store)[1]


def _empty(columns) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series([], dtype=np.int64 if name in _INTS else np.float64 if name in _FLOATS
                                         else object) for name in columns})


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer and float columns as int64 / float64, whatever the rows gave (also for an empty table)."""
    for name in frame.columns:
        if name in _INTS:
            frame[name] = frame[name].astype(np.int64)
        elif name in _FLOATS:
            frame[name] = frame[name].astype(np.float64)
    return frame


def _check_parquet() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ConfigError("--format parquet needs pyarrow, which is not installed: pip install "
                          "'polypure[parquet]'") from None


def export(store: str | Path, out: str | Path, format: str = "csv", baseline: str | None = None) -> list[Path]:
    """Write a store's per-neuron metrics, summary and comparisons as tables: ``polypure export``.

    Parameters
    ----------
    store : str or Path
        The store.
    out : str or Path
        The folder to write into (made if needed): ``metrics``, ``summary`` and ``comparisons`` with the
        format's suffix, each replacing a file of that name.
    format : {"csv", "parquet"}
        CSV (NaN written as ``NaN``, no index; ``pandas.read_csv(path, keep_default_na=False,
        na_values=["NaN"])`` reads a table back as it was), or Parquet (needs pyarrow: the ``parquet`` extra).
    baseline : str, optional
        The space the comparisons are against (:meth:`Results.compare`). By default the comparisons the
        evaluate stage stored (:meth:`Results.comparisons`), or, for a store without them, every space
        against each target's last attribution layer.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    ConfigError
        For an unknown format, Parquet without pyarrow, an output folder of the wrong kind (a file where
        the folder goes; all before anything is read or written), or a baseline that gives no comparison.
    """
    if format not in ("csv", "parquet"):
        raise ConfigError(f"--format: {format!r} is not one of csv, parquet")
    # the folder's kind before the store is read: nothing is computed for a folder that cannot take it
    out = require_output_folder(out, "export folder")
    if format == "parquet":
        _check_parquet()
    with Results(store) as results:
        stored = results.comparisons() if baseline is None else None
        tables = {"metrics": results.metrics(), "summary": results.summary(),
                  "comparisons": stored if stored is not None and len(stored) else results.compare(baseline=baseline)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in TABLES:
        path = out / f"{name}.{format}"
        if format == "csv":
            tables[name].to_csv(path, index=False, na_rep="NaN")
        else:
            tables[name].to_parquet(path, index=False)
        paths.append(path)
    return paths
