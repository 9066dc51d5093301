"""How a store grows with its config, and when what it holds is stale.

A study grows: more neurons, another target, another rule variant. The store keeps what is finished and
makes room for what is new, rather than starting over:

- :func:`global_changes`: the config sections every result depends on (:data:`GLOBAL_SECTIONS`); a store
  made with other values holds nothing reusable;
- :func:`rule_differences`: what differs between a stored target (or variant) and the settings asked for;
- :func:`fit_rows` and :func:`resize_rows`: the rows of a target kept, dropped and appended when the
  neurons asked for change;
- :func:`create_variant`: a new variant's datasets, resizable along the rows so that they can grow;
- :func:`runs`: contiguous stretches of rows, written with one slice each.

The functions take open ``h5py`` groups: :class:`~polypure.store.hdf5_store.Store` calls them inside its
guarded writes and owns the decisions (refusing, overwriting, dropping derived results).

Example
-------
>>> import numpy as np
>>> from polypure.store.growth import fit_rows
>>> fit_rows(stored=np.array([0, 1, 2]), asked=np.array([2, 3]), overwrite=True)
(array([2]), array([3]))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import h5py
import numpy as np
import yaml

from polypure.config.settings import config_differences
from polypure.store.schema import COMPLETE, NEURONS, RULE_KEYS, attr_value, read_attr

#: Config sections every result depends on: a store made with other values holds nothing reusable.
#: Other settings (top-K, relevance rules, planted pairs) are checked result by result, so that a study can
#: grow (more neurons, another target) without redoing what is finished.
GLOBAL_SECTIONS = ("model", "data", "seed")


def global_changes(old_yaml: str, new_yaml: str) -> list[str]:
    """The differences between two resolved configs in the sections of :data:`GLOBAL_SECTIONS`.

    Returns
    -------
    list of str
        As :func:`polypure.config.settings.config_differences` words them; empty where the store can grow.
    """
    old = yaml.safe_load(old_yaml) or {}
    new = yaml.safe_load(new_yaml) or {}
    return [c for c in config_differences(old, new) if c.split(".", 1)[0].split(":", 1)[0] in GLOBAL_SECTIONS]


def split_rule(attrs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(rule, settings)``: a target's attributes of its variant's rule (:data:`RULE_KEYS`), and the others."""
    rule = {key: value for key, value in attrs.items() if key in RULE_KEYS}
    settings = {key: value for key, value in attrs.items() if key not in RULE_KEYS}
    return rule, settings


def rule_differences(group: h5py.Group, attrs: dict[str, Any], layer_channels: dict[str, int]) -> list[str]:
    """``"key: old -> new"`` for every rule attribute or layer width of a stored target that differs."""
    out = []
    for key, value in attrs.items():
        if key not in group.attrs:
            # a store written before this attribute existed: nothing to compare it with
            continue
        old = read_attr(group.attrs[key])
        new = read_attr(attr_value(value))
        if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
            same = list(old if isinstance(old, (list, tuple)) else [old]) == list(
                new if isinstance(new, (list, tuple)) else [new])
        else:
            same = old == new
        if not same:
            out.append(f"{key}: {old!r} -> {new!r}")
    for name, channels in layer_channels.items():
        if name in group and group[name].shape[2] != channels:
            out.append(f"{name}: {group[name].shape[2]} -> {channels} channels")
    return out


def fit_rows(stored: np.ndarray, asked: np.ndarray, overwrite: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """``(keep, new)``: the stored rows to keep and the neurons to append for the neurons ``asked`` for.

    Every stored row stays (``keep`` None) unless ``overwrite`` drops the neurons no longer asked for;
    ``new`` are the neurons asked for that the store does not have, in the order asked.
    """
    new = asked[~np.isin(asked, stored)]
    keep = np.flatnonzero(np.isin(stored, asked)) if overwrite else None
    if keep is not None and len(keep) == len(stored):
        keep = None
    return keep, new


def resize_rows(group: h5py.Group, keep: np.ndarray | None, new_neurons: np.ndarray) -> None:
    """Keep rows ``keep`` (all when None) of every dataset of a target, then append ``new_neurons`` as empty rows.

    Appended rows hold the datasets' fill values (NaN, not complete) until the stage computes them.
    """
    stored = len(group[NEURONS])
    kept = stored if keep is None else len(keep)
    rows = kept + len(new_neurons)
    datasets: list[str] = []
    # every variant's subgroup shares the target's rows
    group.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
    for name in datasets:
        ds = group[name]
        if keep is None and ds.maxshape[0] is None:
            ds.resize(rows, axis=0)
            continue
        # a fixed-size dataset (written by an older polypure) or dropped rows: rewrite it
        data = ds[()] if keep is None else ds[()][keep]
        spec = dict(dtype=ds.dtype, chunks=ds.chunks or True, fillvalue=ds.fillvalue)
        attrs = dict(ds.attrs)
        del group[name]
        new = group.create_dataset(name, shape=(rows, *data.shape[1:]), maxshape=(None, *data.shape[1:]), **spec)
        new[:kept] = data
        new.attrs.update(attrs)
    group[NEURONS][kept:] = np.asarray(new_neurons, np.int64)


def create_target(group: h5py.Group, neurons: np.ndarray, settings: dict[str, Any]) -> None:
    """Start a target's group: its rows (``neurons``, resizable) and its own settings as attributes."""
    group.create_dataset(NEURONS, data=neurons, maxshape=(None,), chunks=True)
    for key, value in settings.items():
        group.attrs[key] = attr_value(value)


def create_variant(group: h5py.Group, rows: int, n_refs: int, channels: dict[str, int], rule: dict[str, Any]) -> None:
    """A variant's empty datasets: one per space in ``channels`` (NaN), its ``complete`` flags, its rule.

    Every dataset is resizable along the rows and chunked by row, so that the target can grow and a row
    can be written alone.
    """
    for name, width in channels.items():
        group.create_dataset(name, shape=(rows, n_refs, width), dtype=np.float32, maxshape=(None, n_refs, width),
                             chunks=(1, n_refs, width), fillvalue=np.nan)
    group.create_dataset(COMPLETE, shape=(rows,), dtype=bool, maxshape=(None,), chunks=True, fillvalue=False)
    for key, value in rule.items():
        group.attrs[key] = attr_value(value)


def runs(sorted_rows: np.ndarray) -> Iterable[tuple[int, int]]:
    """Positions ``[start, stop)`` of runs of consecutive integers in a sorted array.

    Examples
    --------
    >>> list(runs(np.array([0, 1, 2, 5, 6, 9])))
    [(0, 3), (3, 5), (5, 6)]
    """
    if len(sorted_rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_rows)]])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        yield int(start), int(stop)

