"""The HDF5 store: everything a run produced, in one file with a documented schema (version 2).

Schema (paths other tools rely on; the README has the full table)::

    /                      attrs: format="polypure", format_version=2, config, created, polypure_version
    /samples/ids           (N,) UTF-8      stable ids (path relative to the data root, or index:<i>)
    /samples/labels        (N,) int64      -1 where unknown
    /samples/factors/<f>   (N,) int64      generative factors; attr ``values`` names the codes
    /topk/<layer>/indices  (C, K) int64    sample indices by decreasing value
    /topk/<layer>/values   (C, K) float32  attrs: statistic, samples_done, complete
    /relevance/<target>/neurons      (M,) int64      rows shared by every rule variant; attr ``variants``
    /relevance/<target>/<layer>      (M, n_refs, C_layer) float32   the ``default`` variant
    /relevance/<target>/activation   (M, n_refs, C_target) float32
    /relevance/<target>/complete     (M,) bool
    /relevance/<target>/<variant>/<layer>, activation, complete     any other variant (its rule as attrs)
    /planted/<layer>/pairs, truth, modes, scales
    /clusters/<target>/<space>/<method id>       (M, n_refs) int64   -1: noise; attr ``not_clustered``: dead rows
    /embeddings/<evaluator>/<target>             (M, n_refs, D) float32
    /metrics/...
    /comparisons/<target>                        table: paired comparisons of metrics between spaces

A space is named ``<layer>`` for the ``default`` variant and ``<variant>:<layer>`` for any other
(:func:`polypure.config.settings.space_name`). A version 1 store is a version 2 store with the ``default`` variant alone.

Only one process writes a store at a time (the stage runner); readers open it read-only.

Example
-------
>>> import h5py                                     # doctest: +SKIP
>>> with h5py.File("storage/demo.h5", "r") as f:    # doctest: +SKIP
...     print(f["relevance/block_3/block_2"].shape)
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from polypure import __version__
from polypure.config.settings import DEFAULT_VARIANT, space_name, split_space
from polypure.errors import ConfigError, StaleResultError, StoreError
from polypure.store.write_session import kill_inside_write_for_test, whole_write

FORMAT = "polypure"
#: A planted target is named after its layer: ``block_3@planted``.
PLANTED_SUFFIX = "@planted"
#: The space of a target's own activations (beside its attribution layers).
ACTIVATION = "activation"
#: Label sets of references: the planted split, and the samples' classes (factors go by their own names).
PLANTED = "planted"
CLASS = "class"
#: Version 2 added rule variants (``/relevance/<target>/<variant>/``); version 1 stores read as one ``default``.
FORMAT_VERSION = 2
STR = h5py.string_dtype("utf-8")

#: Config sections every result depends on: a store made with other values holds nothing reusable.
#: Other settings (top-K, relevance rules, planted pairs) are checked result by result, so that a study can
#: grow (more neurons, another target) without redoing what is finished.
GLOBAL_SECTIONS = ("model", "data", "seed")

#: Attributes of a relevance variant that make its rule; the others belong to the target.
RULE_KEYS = ("composite", "canonizers", "times_activation", "composite_params", "precision")

#: Datasets of a relevance target that are bookkeeping of its rows, not a feature space.
_ROW_BOOKKEEPING = ("neurons", "complete")

#: Where the results derived from one relevance target live (recomputed when its rows change).
_DERIVED = ("clusters/{t}", "crops/{t}", "metrics/{t}", "comparisons/{t}")


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def attr_value(value):
    """An attribute value h5py can store: lists of strings become UTF-8 string arrays."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return np.array(list(value), dtype=object).astype(STR)
    return value


def read_attr(value):
    """An attribute as Python data: string arrays become lists of str."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return _decode(value)


def _check_version(path: Path, attrs) -> None:
    """Refuse a store written by a newer polypure, whose layout this one cannot know."""
    version = int(attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise StoreError(f"store {str(path)!r} has format version {version}; this polypure ({__version__}) reads up "
                         f"to {FORMAT_VERSION}: upgrade polypure or set another store path")


class Store:
    """An open polypure store.

    Parameters
    ----------
    path : str or Path
        The HDF5 file.
    mode : {"r", "a"}
        Read only, or read and write (the one writer).
    """

    def __init__(self, path: str | Path, mode: str = "r", *, file: str | Path | None = None,
                 on_flush: Callable[[], None] | None = None, on_write: Callable[[], None] | None = None):
        self.path = Path(path)
        # the file opened: the store itself, or the working copy a run writes (session.WriteSession)
        self.file_path = Path(file) if file is not None else self.path
        self.on_flush = on_flush
        self.on_write = on_write
        if mode == "r" and not self.file_path.is_file():
            raise StoreError(f"store {str(self.path)!r} does not exist")
        try:
            self.file = h5py.File(self.file_path, mode)
        except OSError as exc:
            raise StoreError(f"store {str(self.path)!r} cannot be opened: {exc}") from None
        try:
            self._check_format()
        except StoreError:
            # a refused file must not stay open: a notebook could not overwrite or reopen it
            self.file.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------

    def _check_format(self) -> None:
        attrs = self.file.attrs
        if "format" not in attrs and len(self.file.keys()) == 0:
            return
        if _decode(attrs.get("format")) != FORMAT:
            raise StoreError(f"{str(self.path)!r} is an HDF5 file but not a polypure store")
        _check_version(self.path, attrs)

    @classmethod
    def open_for_run(cls, path: str | Path, config_yaml: str, overwrite: bool = False, **options) -> Store:
        """Open (or create) the store a run writes, checking it was made for the same model and data.

        Only the sections every result depends on (:data:`GLOBAL_SECTIONS`) are compared here; the
        stages check their own results (a top-K's k and statistic, a relevance target's rule) and grow
        the store where the config asks for more.

        Parameters
        ----------
        path : str or Path
        config_yaml : str
            The run's resolved config.
        overwrite : bool
            Start a new store instead of refusing when the model, data or seed differ.
        **options
            ``file`` (the working copy to open instead of ``path``), ``on_flush``, ``on_write``: see
            :class:`Store`.

        Raises
        ------
        StaleResultError
            If the store was made for another model, data or seed and ``overwrite`` is False.
        StoreError
            If the file exists and is not a polypure store, or is one of a newer format version (refused
            with ``overwrite`` too: it is never deleted by a polypure that cannot read it).
        """
        from polypure.config.settings import config_differences

        path = Path(path)
        file = Path(options.get("file") or path)
        if file.exists():
            try:
                with h5py.File(file, "r") as probe:
                    fmt = _decode(probe.attrs.get("format"))
                    old_yaml = _decode(probe.attrs.get("config", ""))
                    if fmt == FORMAT:
                        # read only, before --overwrite below could delete a store this polypure cannot read
                        _check_version(path, probe.attrs)
            except OSError:
                raise StoreError(f"{str(path)!r} exists and is not an HDF5 file; remove it or set another store "
                                 "path") from None
            if fmt != FORMAT:
                raise StoreError(f"{str(path)!r} exists and is not a polypure store; remove it or set another "
                                 "store path")
            old = yaml.safe_load(old_yaml) or {}
            new = yaml.safe_load(config_yaml) or {}
            changed = [c for c in config_differences(old, new)
                       if c.split(".", 1)[0].split(":", 1)[0] in GLOBAL_SECTIONS]
            if changed and not overwrite:
                shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
                raise StaleResultError(f"store {str(path)!r} was made with a different config ({shown}); rerun "
                                       "with --overwrite to replace it, or set another store path")
            if changed:
                file.unlink()
        if file.exists():
            store = cls(path, "a", **options)
            if store.config_yaml != config_yaml:
                store.file.attrs["config"] = config_yaml
                store._wrote()
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, "a", **options)
        attrs = store.file.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["config"] = config_yaml
        attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        attrs["polypure_version"] = __version__
        store._wrote()
        return store

    def _wrote(self) -> None:
        if self.on_write is not None:
            self.on_write()

    def close(self) -> None:
        """Flush and close the file."""
        if self.file.id.valid:
            self.file.close()

    def flush(self) -> None:
        """Push written data to disk; a run's session may commit the store here (its checkpoints)."""
        self.file.flush()
        if self.on_flush is not None:
            self.on_flush()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def config_yaml(self) -> str:
        """The resolved config the store was last written with, as YAML text."""
        return _decode(self.file.attrs.get("config", ""))

    def _group(self, path: str) -> h5py.Group:
        return self.file.require_group(path)

    def _replace(self, group: h5py.Group, name: str, data, **kwargs) -> h5py.Dataset:
        if name in group:
            del group[name]
        return group.create_dataset(name, data=data, **kwargs)

    # -- samples -----------------------------------------------------------------------------------

    def has_samples(self) -> bool:
        """Whether the sample ids and labels were written."""
        return "samples/ids" in self.file

    def write_samples(self, ids: list[str], labels: np.ndarray,
                      factors: dict[str, tuple[np.ndarray, list[str]]] | None = None,
                      class_names: list[str] | None = None) -> None:
        """Write ids, labels and factors of every sample (once, before any per-sample result)."""
        group = self._group("samples")
        self._replace(group, "ids", np.array(ids, dtype=object), dtype=STR)
        self._replace(group, "labels", np.asarray(labels, np.int64))
        if class_names is not None:
            group["labels"].attrs["classes"] = attr_value(list(class_names))
        for name, (codes, values) in (factors or {}).items():
            ds = self._replace(self._group("samples/factors"), name, np.asarray(codes, np.int64))
            ds.attrs["values"] = attr_value(list(values))

    def sample_ids(self) -> list[str]:
        """The stable id of every sample."""
        return [_decode(s) for s in self.file["samples/ids"][()]]

    def check_samples(self, ids: list[str]) -> None:
        """Refuse to mix results of different datasets in one store."""
        stored = self.sample_ids()
        if stored != list(ids):
            raise StoreError(f"store {str(self.path)!r} holds results for other samples ({len(stored)} stored, "
                             f"{len(ids)} now); use --overwrite or another store path")

    def class_names(self) -> list[str] | None:
        """Names of the classes the labels index, where known."""
        classes = self.file["samples/labels"].attrs.get("classes")
        return read_attr(classes) if classes is not None else None

    def labels(self) -> np.ndarray:
        """Class of every sample, -1 where unknown."""
        return self.file["samples/labels"][()]

    def update_labels(self, labels: np.ndarray) -> None:
        """Replace the class of every sample (labels collected from the items as the top-K pass reads them)."""
        self.file["samples/labels"][:] = np.asarray(labels, np.int64)

    def factors(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        """Generative factors: name -> (code per sample, value names)."""
        out = {}
        if "samples/factors" in self.file:
            for name, ds in self.file["samples/factors"].items():
                out[name] = (ds[()], [_decode(v) for v in ds.attrs.get("values", [])])
        return out

    # -- top-k -------------------------------------------------------------------------------------

    def topk_progress(self, layer: str) -> tuple[np.ndarray, np.ndarray, int, bool] | None:
        """``(values, indices, samples_done, complete)`` of a layer's top-K, or None if not started."""
        key = f"topk/{layer}"
        if key not in self.file:
            return None
        group = self.file[key]
        return (group["values"][()], group["indices"][()], int(group.attrs["samples_done"]),
                bool(group.attrs["complete"]))

    def write_topk(self, layer: str, values: np.ndarray, indices: np.ndarray, statistic: str,
                   samples_done: int, complete: bool, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write (or checkpoint) a layer's top-K."""
        group = self._group(f"topk/{layer}")
        self._replace(group, "indices", np.asarray(indices, np.int64))
        self._replace(group, "values", np.asarray(values, np.float32))
        for name, data in (extra or {}).items():
            self._replace(group, name, data)
        group.attrs["statistic"] = statistic
        group.attrs["samples_done"] = int(samples_done)
        group.attrs["complete"] = bool(complete)

    def topk_statistic(self, name: str) -> str:
        """The statistic (``max`` or ``mean``) a stored top-K ranks by."""
        return read_attr(self.file[f"topk/{name}"].attrs["statistic"])

    def read_topk(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(values, indices)`` of a complete top-K.

        Raises
        ------
        StoreError
            If the top-K of ``layer`` is missing or incomplete.
        """
        state = self.topk_progress(layer)
        if state is None or not state[3]:
            raise StoreError(f"store {str(self.path)!r} has no complete top-K for layer {layer!r}; run "
                             "'polypure topk' first")
        return state[0], state[1]

    # -- relevance ---------------------------------------------------------------------------------

    def prepare_relevance(self, target: str, neurons: np.ndarray, n_refs: int, layer_channels: dict[str, int],
                          target_channels: int, attrs: dict[str, Any], overwrite: bool = False,
                          variant: str = DEFAULT_VARIANT) -> h5py.Group:
        """Create the datasets of one target's rule variant, or fit existing ones to the neurons asked for.

        A target already in the store keeps every finished row: neurons asked for anew are appended (and
        computed by the stage), neurons no longer asked for stay, unless ``overwrite`` is set, which drops
        them. Whenever the rows change, what was derived from them (clusters, embeddings, crops, metrics)
        is deleted so that later stages recompute it for the new rows. All variants of a target share its
        rows; a variant the store does not have yet is added with every row to compute.

        Parameters
        ----------
        target : str
        neurons : ndarray (M,)
            The neurons the config asks for, in its order.
        n_refs : int
        layer_channels : dict of str to int
            Channels of every attribution layer.
        target_channels : int
        attrs : dict
            What computes the target: the variant's rule (:data:`RULE_KEYS`: composite, canonizers, ...) and
            the target's own settings (n_refs, layers, ...). A target made with other settings, or a
            variant made with another rule, is stale.
        overwrite : bool
            Replace a stale target or variant, and drop stored neurons the config no longer asks for.
        variant : str
            The rule variant's id: ``default`` lives in the target's group itself (the version 1 layout),
            any other in a subgroup of that name.

        Returns
        -------
        h5py.Group
            The target's group; its ``neurons`` dataset gives the row order, which may differ from ``neurons``.

        Raises
        ------
        StaleResultError
            If the target or the variant was made with other settings and ``overwrite`` is False.
        """
        path = f"relevance/{target}"
        neurons = np.asarray(neurons, np.int64)
        rule = {key: value for key, value in attrs.items() if key in RULE_KEYS}
        settings = {key: value for key, value in attrs.items() if key not in RULE_KEYS}
        if path in self.file:
            group = self.file[path]
            stale = _rule_differences(group, settings, layer_channels)
            if stale and not overwrite:
                raise StaleResultError(f"store {str(self.path)!r}: relevance of target {target!r} was made with a "
                                       f"different config ({'; '.join(stale)}); rerun with --overwrite to "
                                       "recompute it, or set another store path")
            if stale:
                self.drop(path)
                self.drop_derived(target)
            else:
                stored = group["neurons"][()]
                new = neurons[~np.isin(neurons, stored)]
                keep = np.flatnonzero(np.isin(stored, neurons)) if overwrite else None
                if keep is not None and len(keep) == len(stored):
                    keep = None
                if len(new) or keep is not None:
                    _resize_rows(group, keep, new)
                    self.drop_derived(target)
        if path not in self.file:
            group = self._group(path)
            group.create_dataset("neurons", data=neurons, maxshape=(None,), chunks=True)
            for key, value in settings.items():
                group.attrs[key] = attr_value(value)
        group = self.file[path]
        self._prepare_variant(target, variant, rule, layer_channels, target_channels, n_refs, overwrite)
        return group

    def _prepare_variant(self, target: str, variant: str, rule: dict[str, Any], layer_channels: dict[str, int],
                         target_channels: int, n_refs: int, overwrite: bool) -> None:
        group = self.file[f"relevance/{target}"]
        vgroup = group if variant == DEFAULT_VARIANT else group.require_group(variant)
        if "complete" in vgroup:
            stale = _rule_differences(vgroup, rule, layer_channels)
            if stale and not overwrite:
                which = f"target {target!r}" + (f", variant {variant!r}," if variant != DEFAULT_VARIANT else "")
                raise StaleResultError(f"store {str(self.path)!r}: relevance of {which} was made with a different "
                                       f"config ({'; '.join(stale)}); rerun with --overwrite to recompute it, or "
                                       "set another store path" + (" or variant id" if variant != DEFAULT_VARIANT
                                                                   else ""))
            if stale:
                self.drop_variant(target, variant, forget=False)
                vgroup = group if variant == DEFAULT_VARIANT else group.require_group(variant)
        if "complete" not in vgroup:
            m = len(group["neurons"])
            for name, channels in {**layer_channels, ACTIVATION: target_channels}.items():
                vgroup.create_dataset(name, shape=(m, n_refs, channels), dtype=np.float32,
                                      maxshape=(None, n_refs, channels), chunks=(1, n_refs, channels),
                                      fillvalue=np.nan)
            vgroup.create_dataset("complete", shape=(m,), dtype=bool, maxshape=(None,), chunks=True, fillvalue=False)
            for key, value in rule.items():
                vgroup.attrs[key] = attr_value(value)
        known = self.variants(target)
        if variant not in known:
            group.attrs["variants"] = attr_value([*known, variant])
            if variant != DEFAULT_VARIANT:
                # a version 1 reader would not see this variant: the store now has the layout of version 2
                self.file.attrs["format_version"] = FORMAT_VERSION
            self.drop("metrics/summary")

    def drop_variant(self, target: str, variant: str, forget: bool = True) -> None:
        """Delete one variant's relevance and what was derived from its spaces.

        With ``forget`` False the variant keeps its place in the target's list (it is about to be recomputed).
        """
        group = self.file[f"relevance/{target}"]
        spaces = self.variant_spaces(target, variant)
        if self.variants(target)[:1] == [variant]:
            # the first variant's activations are the target's 'activation' space
            spaces.append(ACTIVATION)
        if variant == DEFAULT_VARIANT:
            for name in [*self.attribution_layers(target), ACTIVATION, "complete"]:
                if name in group:
                    del group[name]
            for key in RULE_KEYS:
                if key in group.attrs:
                    del group.attrs[key]
        else:
            self.drop(f"relevance/{target}/{variant}")
        if forget:
            group.attrs["variants"] = attr_value([v for v in self.variants(target) if v != variant])
        for space in spaces:
            self.drop(f"clusters/{target}/{space}")
        if f"clusters/{target}" in self.file and not len(self.file[f"clusters/{target}"]):
            self.drop(f"clusters/{target}")
        self.drop(f"metrics/{target}")
        self.drop(f"comparisons/{target}")
        self.drop("metrics/summary")

    def write_relevance_rows(self, target: str, rows: np.ndarray, arrays: dict[str, np.ndarray],
                             variant: str = DEFAULT_VARIANT) -> None:
        """Write whole neurons (rows of the target) of one variant and mark them complete, in one flush."""
        group = self.file[self._variant_path(target, variant)]
        rows = np.asarray(rows)
        order = np.argsort(rows)
        for start, stop in _runs(rows[order]):
            sel = order[start:stop]
            lo, hi = int(rows[sel[0]]), int(rows[sel[-1]]) + 1
            for name, data in arrays.items():
                group[name][lo:hi] = data[sel]
            kill_inside_write_for_test()
            group["complete"][lo:hi] = True
        self.flush()

    def relevance_targets(self) -> list[str]:
        """Names of the relevance targets in the store."""
        return list(self.file["relevance"].keys()) if "relevance" in self.file else []

    # -- invalidation ------------------------------------------------------------------------------

    def drop(self, path: str) -> None:
        """Delete a group or dataset if present."""
        if path in self.file:
            del self.file[path]

    def drop_derived(self, target: str) -> None:
        """Delete what was computed from a target's relevance rows: clusters, embeddings, crops, metrics."""
        for template in _DERIVED:
            self.drop(template.format(t=target))
        for evaluator in list(self.file["embeddings"].keys()) if "embeddings" in self.file else []:
            self.drop(f"embeddings/{evaluator}/{target}")
        self.drop("metrics/summary")

    def drop_planted(self, layer: str) -> None:
        """Delete a layer's planted pairs and what was computed from them (the real layer's top-K stays)."""
        target = planted_target(layer)
        for path in (f"planted/{layer}", f"topk/{target}", f"relevance/{target}"):
            self.drop(path)
        self.drop_derived(target)

    def drop_topk(self, layer: str) -> None:
        """Delete a layer's top-K and everything chosen from it.

        That is the layer's planted pairs and their top-K, and every relevance target on the layer (real
        or planted) with its derived results: their references came from this top-K.
        """
        planted = planted_target(layer)
        for path in (f"topk/{layer}", f"topk/{planted}", f"planted/{layer}"):
            self.drop(path)
        for target in self.relevance_targets():
            if target in (layer, planted):
                self.drop(f"relevance/{target}")
                self.drop_derived(target)

    # -- targets and their spaces ------------------------------------------------------------------

    def attributes(self) -> dict[str, Any]:
        """The store's own attributes (format, version, creation time, ...) without its config."""
        return {k: read_attr(v) for k, v in self.file.attrs.items() if k != "config"}

    def config(self) -> dict:
        """The resolved config the store was last written with, as a mapping (empty if none)."""
        return yaml.safe_load(self.config_yaml) or {}

    def target_attrs(self, target: str) -> dict[str, Any]:
        """The attributes of a relevance target (its layer and attribution layers; the ``default`` variant's rule)."""
        return {key: read_attr(value) for key, value in self.file[f"relevance/{target}"].attrs.items()}

    def variant_attrs(self, target: str, variant: str) -> dict[str, Any]:
        """The rule of one variant of a target (:data:`RULE_KEYS`)."""
        attrs = self.file[self._variant_path(target, variant)].attrs
        return {key: read_attr(attrs[key]) for key in RULE_KEYS if key in attrs}

    def attribution_layers(self, target: str) -> list[str]:
        """A target's attribution layers, from the lowest as configured."""
        return list(read_attr(self.file[f"relevance/{target}"].attrs.get("attribution_layers", [])))

    def variants(self, target: str) -> list[str]:
        """Ids of the rule variants a target has, in the order they were added (``default`` alone in version 1)."""
        group = self.file[f"relevance/{target}"]
        if "variants" in group.attrs:
            return list(read_attr(group.attrs["variants"]))
        return [DEFAULT_VARIANT] if "complete" in group else []

    def variant_spaces(self, target: str, variant: str) -> list[str]:
        """The relevance spaces of one variant: ``<variant>:<layer>`` per attribution layer (plain for ``default``)."""
        return [space_name(variant, layer) for layer in self.attribution_layers(target)]

    def relevance_spaces(self, target: str) -> list[str]:
        """Every relevance space of a target: each variant's attribution layers, variant by variant."""
        return [space for variant in self.variants(target) for space in self.variant_spaces(target, variant)]

    def spaces(self, target: str) -> list[str]:
        """A target's own feature spaces: every variant's attribution layers, then ``activation``."""
        return [*self.relevance_spaces(target), ACTIVATION]

    def baseline_space(self, target: str) -> str:
        """The space comparisons are made against by default: the last attribution layer of the first variant.

        That is the layer right below the target, where PURE computes relevance; ``activation`` for a
        target without attribution layers.
        """
        spaces = self.relevance_spaces(target)
        return self.variant_spaces(target, self.variants(target)[0])[-1] if spaces else ACTIVATION

    def neurons(self, target: str) -> np.ndarray:
        """Neuron (or virtual-neuron) id of every row of a target."""
        return self.file[f"relevance/{target}/neurons"][()]

    def complete(self, target: str, variant: str | None = None) -> np.ndarray:
        """Which rows of a target are finished: for one variant, or (None) for every variant it has."""
        variants = self.variants(target) if variant is None else [variant]
        done = np.ones(len(self.neurons(target)), bool)
        for name in variants:
            done &= self.file[f"{self._variant_path(target, name)}/complete"][()]
        return done

    def n_refs(self, target: str) -> int:
        """References per neuron of a target."""
        return int(self.file[self._space_path(target, ACTIVATION)].shape[1])

    def reference_indices(self, target: str) -> np.ndarray:
        """Sample index of every reference of every stored neuron of a target: (M, n_refs)."""
        return self.read(f"topk/{target}/indices")[self.neurons(target), :self.n_refs(target)]

    def relevance(self, target: str, space: str) -> np.ndarray:
        """A target's relevance in one space (``lrp:block_2``), or its ``activation`` baseline: (M, n_refs, C)."""
        return self.read(self._space_path(target, space))

    def space_shape(self, target: str, space: str) -> tuple[int, ...]:
        """The shape (M, n_refs, D) of a space's features, without reading them."""
        for path in (self._space_path(target, space), f"embeddings/{space}/{target}"):
            if path in self.file and isinstance(self.file[path], h5py.Dataset):
                return tuple(self.file[path].shape)
        raise StoreError(f"store {str(self.path)!r} has no space {space!r} for target {target!r}")

    def has_space(self, target: str, space: str) -> bool:
        """Whether the store has features of ``space`` for ``target`` (a layer, activation or an embedding)."""
        if space in _ROW_BOOKKEEPING:
            return False
        return any(path in self.file and isinstance(self.file[path], h5py.Dataset)
                   for path in (self._space_path(target, space), f"embeddings/{space}/{target}"))

    def features(self, target: str, space: str, row: int | None = None) -> np.ndarray:
        """The features of a space for a target: relevance, activation or an evaluator's embedding.

        Parameters
        ----------
        target, space : str
        row : int, optional
            One neuron's (n_refs, D) features instead of all (M, n_refs, D).

        Raises
        ------
        StoreError
            If the store has no such space for the target.
        """
        for path in (self._space_path(target, space), f"embeddings/{space}/{target}"):
            if path in self.file and space not in _ROW_BOOKKEEPING and isinstance(self.file[path], h5py.Dataset):
                return self.file[path][()] if row is None else self.file[path][row]
        raise StoreError(f"store {str(self.path)!r} has no space {space!r} for target {target!r} (attribution "
                         "layers, 'activation', or evaluator embeddings)")

    def _variant_path(self, target: str, variant: str) -> str:
        return f"relevance/{target}" if variant == DEFAULT_VARIANT else f"relevance/{target}/{variant}"

    def _space_path(self, target: str, space: str) -> str:
        """Where a relevance space lives; ``activation`` is the first variant's (the variants agree on it)."""
        if space == ACTIVATION:
            variants = self.variants(target) if f"relevance/{target}" in self.file else []
            return f"{self._variant_path(target, variants[0] if variants else DEFAULT_VARIANT)}/{ACTIVATION}"
        variant, layer = split_space(space)
        return f"{self._variant_path(target, variant)}/{layer}"

    def target_spaces(self, configured: list[str] | None = None) -> dict[str, list[str]]:
        """The spaces of every target: ``configured`` ones (``cluster.spaces``) where it has them, else its own.

        Raises
        ------
        ConfigError
            If a configured space exists for no target at all.
        """
        out = {}
        for target in self.relevance_targets():
            out[target] = self.spaces(target) if configured is None else [
                s for s in configured if self.has_space(target, s)]
        for space in configured or []:
            if not any(space in spaces for spaces in out.values()):
                raise ConfigError(f"cluster.spaces: {space!r} is neither an attribution layer of any target, "
                                  "'activation', nor an evaluator embedding in the store (run the embed stage first)")
        return out

    def planted_targets(self) -> list[str]:
        """The relevance targets made of planted virtual neurons."""
        return [t for t in self.relevance_targets() if planted_layer(t) is not None]

    # -- planted -----------------------------------------------------------------------------------

    def has_planted_pairs(self, layer: str) -> bool:
        """Whether pairs were chosen for a layer's planted neurons."""
        return f"planted/{layer}/pairs" in self.file

    def write_planted_pairs(self, layer: str, pairs: np.ndarray, scales: np.ndarray, settings: dict[str, Any]) -> None:
        """Keep a layer's planted channel pairs, their scales and the settings they were chosen with."""
        self.write_array(f"planted/{layer}/pairs", pairs)
        self.write_array(f"planted/{layer}/scales", scales)
        for key, value in settings.items():
            self.file[f"planted/{layer}"].attrs[key] = value

    def planted_pairs(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(pairs, scales)`` of a layer's planted neurons."""
        return self.read(f"planted/{layer}/pairs"), self.read(f"planted/{layer}/scales")

    def planted_settings(self, layer: str) -> dict[str, Any]:
        """The settings a layer's pairs were chosen with (empty for stores written before they were kept)."""
        group = f"planted/{layer}"
        return {k: read_attr(v) for k, v in self.file[group].attrs.items()} if group in self.file else {}

    def write_planted_truth(self, layer: str, truth: np.ndarray, modes: list[str]) -> None:
        """The true split of each planted neuron's references and the mode of each virtual neuron."""
        self.write_array(f"planted/{layer}/truth", np.asarray(truth, np.int64))
        self.write_array(f"planted/{layer}/modes", list(modes))

    def planted_modes(self, layer: str) -> list[str] | None:
        """The mode of each virtual neuron of a layer, or None before they were stored."""
        path = f"planted/{layer}/modes"
        return list(read_attr(self.read(path))) if path in self.file else None

    def topk_payload(self, name: str, payload: str) -> np.ndarray:
        """A per-entry payload kept with a top-K (``truth`` of planted neurons)."""
        return self.read(f"topk/{name}/{payload}")

    # -- labels of references ----------------------------------------------------------------------

    def label_sets(self) -> list[str]:
        """Names of the label sets known for the samples: ``planted``, the factors, then ``class``."""
        return [PLANTED, *self.factors()] + ([CLASS] if self.has_samples() and (self.labels() >= 0).any() else [])

    def known_labels(self, target: str, full_topk: bool = False) -> dict[str, np.ndarray]:
        """Every label set known for a target's references, each (M, n_refs), or (M, K) with ``full_topk``."""
        neurons = self.neurons(target)
        indices = self.read(f"topk/{target}/indices")[neurons]
        refs = indices if full_topk else indices[:, :self.n_refs(target)]
        out = {}
        if planted_layer(target) is not None:
            # the truth of every top-K entry, in the target's row order: /planted/<layer>/truth has the n_refs of
            # the run that chose the pairs and one row per virtual neuron, which a later run may not share
            out[PLANTED] = self.topk_payload(target, "truth")[neurons][:, :refs.shape[1]]
        for name, (codes, _) in self.factors().items():
            out[name] = codes[refs]
        labels = self.labels()
        if (labels >= 0).any():
            out[CLASS] = labels[refs]
        return out

    # -- embeddings and crops ----------------------------------------------------------------------

    def embedding_names(self) -> list[str]:
        """Evaluators with stored embeddings."""
        return list(self.file["embeddings"].keys()) if "embeddings" in self.file else []

    def has_embeddings(self, evaluator: str, target: str, signature: str | None = None) -> bool:
        """Whether embeddings of a target by an evaluator are stored (with this signature, if given)."""
        return self._current(f"embeddings/{evaluator}/{target}", signature)

    def embedding_attrs(self, evaluator: str, target: str) -> dict[str, Any]:
        """The attributes of an evaluator's embeddings of a target (its signature, view); empty if none."""
        path = f"embeddings/{evaluator}/{target}"
        return {key: read_attr(value) for key, value in self.file[path].attrs.items()} if path in self.file else {}

    def embeddings(self, evaluator: str, target: str) -> np.ndarray:
        """An evaluator's embedding of every reference of a target: (M, n_refs, D)."""
        return self.read(f"embeddings/{evaluator}/{target}")

    def write_embeddings(self, evaluator: str, target: str, data: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store an evaluator's embeddings of a target's references (rows aligned with its relevance)."""
        self.write_array(f"embeddings/{evaluator}/{target}", np.asarray(data, np.float32), attrs=attrs)

    def write_crops(self, target: str, boxes: np.ndarray, composite: str) -> None:
        """Crop boxes of a target's references (row start, row stop, column start, column stop; -1: whole image)."""
        self.write_array(f"crops/{target}", np.asarray(boxes, np.int64),
                         attrs={"composite": composite, "columns": ["row_start", "row_stop", "col_start", "col_stop"]})

    def crop_boxes(self, target: str) -> np.ndarray | None:
        """The crop boxes of a target, or None where the crop view was not used."""
        path = f"crops/{target}"
        return self.read(path) if path in self.file else None

    # -- clusters ----------------------------------------------------------------------------------

    def has_clusters(self, target: str, space: str, method: str, signature: str | None = None) -> bool:
        """Whether a clustering is stored (made with this signature, if given)."""
        return self._current(f"clusters/{target}/{space}/{method}", signature)

    def write_clusters(self, target: str, space: str, method: str, labels: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store cluster labels (M, n_refs) of a target in a space by a method id."""
        self.write_array(f"clusters/{target}/{space}/{method}", np.asarray(labels, np.int64),
                         attrs={**attrs, "space": space})

    def cluster_labels(self, target: str, space: str, method: str, row: int | None = None) -> np.ndarray | None:
        """Cluster labels of a target in a space by a method (one row, or all), None where not clustered."""
        path = f"clusters/{target}/{space}/{method}"
        if path not in self.file:
            return None
        return self.file[path][()] if row is None else self.file[path][row]

    def clusterings(self, target: str) -> list[tuple[str, str]]:
        """``(space, method id)`` of every stored clustering of a target."""
        path = f"clusters/{target}"
        if path not in self.file:
            return []
        return [(space, method) for space, methods in self.file[path].items() for method in methods]

    def cluster_methods(self, target: str) -> list[str]:
        """Method ids with a clustering of a target in any space, in first-seen order."""
        return list(dict.fromkeys(method for _, method in self.clusterings(target)))

    def _current(self, path: str, signature: str | None) -> bool:
        if path not in self.file:
            return False
        return signature is None or self.file[path].attrs.get("signature") == signature

    # -- metrics -----------------------------------------------------------------------------------

    def write_metric(self, target: str, kind: str, key: Iterable[str], values, attrs: dict[str, Any] | None = None,
                     ) -> None:
        """Store a per-neuron metric of a target: ``/metrics/<target>/<kind>/<key...>``.

        Parameters
        ----------
        target : str
        kind : str
            ``distance_correlation`` (key: reference, space), ``cluster_distances`` (reference, space,
            method), ``ari`` / ``nmi`` (labels, space, method), ``mixture`` (labels), ``degenerate`` (space),
            ``cluster_status`` (space, method), ``single_label`` (labels), the purity scores ``clarity``,
            ``polysemanticity``, ``monosemanticity_topk``, ``nearest_similarity`` and ``redundancy`` (a
            scalar) (reference), or ``split_gain`` (reference, space, method).
        key : iterable of str
        values : array-like, (M,) or (M, k)
        attrs : dict, optional
        """
        self.write_array("/".join(["metrics", target, kind, *key]), values, attrs=attrs)

    def metric(self, target: str, kind: str, *key: str) -> np.ndarray | None:
        """A stored per-neuron metric (strings decoded), or None where it is not stored."""
        path = "/".join(["metrics", target, kind, *key])
        if path not in self.file:
            return None
        ds = self.file[path]
        if h5py.check_string_dtype(ds.dtype) is not None:
            return np.asarray(ds.asstr()[()], dtype=str)
        return ds[()]

    def metric_keys(self, target: str, kind: str, *key: str) -> list[str]:
        """The names directly under ``/metrics/<target>/<kind>/<key...>`` (references, label sets, spaces)."""
        path = "/".join(["metrics", target, kind, *key])
        return list(self.file[path].keys()) if path in self.file else []

    def metric_entries(self, target: str) -> list[tuple[str, tuple[str, ...], np.ndarray]]:
        """``(kind, key, values)`` of every per-neuron metric stored for a target."""
        root = f"metrics/{target}"
        if root not in self.file:
            return []
        found: list[tuple[str, h5py.Dataset]] = []
        self.file[root].visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset)
                                   else None)
        out = []
        for name, ds in found:
            kind, *key = name.split("/")
            out.append((kind, tuple(key), ds[()]))
        return out

    def write_summary(self, table: np.ndarray) -> None:
        """Store the summary table (a structured array) as ``/metrics/summary``."""
        self.write_array("metrics/summary", table)

    def summary_table(self) -> np.ndarray | None:
        """The stored summary table, or None before the evaluate stage ran."""
        return self.read("metrics/summary") if "metrics/summary" in self.file else None

    # -- comparisons -------------------------------------------------------------------------------

    def write_comparisons(self, target: str, table: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """Store a target's comparisons (a structured array, one row per comparison) as ``/comparisons/<target>``."""
        self.write_array(f"comparisons/{target}", table, attrs=attrs)

    def drop_comparisons(self) -> None:
        """Delete every stored comparison (the evaluate stage writes them anew, as one Holm family)."""
        self.drop("comparisons")

    def comparison_targets(self) -> list[str]:
        """Targets with stored comparisons, in store order."""
        return list(self.file["comparisons"].keys()) if "comparisons" in self.file else []

    def comparisons(self, target: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """A target's stored comparisons and their attributes, or None where none are stored."""
        path = f"comparisons/{target}"
        if path not in self.file:
            return None
        ds = self.file[path]
        return ds[()], {key: read_attr(value) for key, value in ds.attrs.items()}

    # -- generic -----------------------------------------------------------------------------------

    def write_array(self, path: str, data, attrs: dict[str, Any] | None = None) -> h5py.Dataset:
        """Write (replacing) one dataset at ``path`` with attributes."""
        parent, _, name = path.rpartition("/")
        if isinstance(data, (list, tuple)) and data and all(isinstance(v, str) for v in data):
            ds = self._replace(self._group(parent), name, np.array(list(data), dtype=object), dtype=STR)
        else:
            ds = self._replace(self._group(parent), name, data)
        for key, value in (attrs or {}).items():
            ds.attrs[key] = attr_value(value)
        return ds

    def read(self, path: str):
        """A dataset at ``path`` as an array."""
        if path not in self.file:
            raise StoreError(f"store {str(self.path)!r} has no {path!r}")
        return self.file[path][()]

    def __contains__(self, path: str) -> bool:
        return path in self.file


def planted_target(layer: str) -> str:
    """The store name of a layer's planted virtual neurons: ``<layer>@planted``."""
    return f"{layer}{PLANTED_SUFFIX}"


def planted_layer(target: str) -> str | None:
    """The layer of a planted target (``block_3@planted`` -> ``block_3``), None for a real one."""
    return target.removesuffix(PLANTED_SUFFIX) if target.endswith(PLANTED_SUFFIX) else None


def _rule_differences(group: h5py.Group, attrs: dict[str, Any], layer_channels: dict[str, int]) -> list[str]:
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


def _resize_rows(group: h5py.Group, keep: np.ndarray | None, new_neurons: np.ndarray) -> None:
    """Keep rows ``keep`` (all when None) of every dataset of a target, then append ``new_neurons`` as empty rows.

    Appended rows hold the datasets' fill values (NaN, not complete) until the stage computes them.
    """
    stored = len(group["neurons"])
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
    group["neurons"][kept:] = np.asarray(new_neurons, np.int64)


def _runs(sorted_rows: np.ndarray) -> Iterable[tuple[int, int]]:
    """Positions ``[start, stop)`` of runs of consecutive integers in a sorted array."""
    if len(sorted_rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_rows)]])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        yield int(start), int(stop)


def _whole(method: Callable) -> Callable:
    """A store write that Ctrl-C and SIGTERM cannot cut in half (:func:`polypure.store.write_session.whole_write`)."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        with whole_write():
            result = method(self, *args, **kwargs)
            self._wrote()
            kill_inside_write_for_test()
            return result
    return write


# every method that changes the file, found by name so that a new one cannot be left out
for _name in [n for n in vars(Store) if n.startswith(("write_", "update_", "prepare_", "drop"))]:
    setattr(Store, _name, _whole(vars(Store)[_name]))
del _name
