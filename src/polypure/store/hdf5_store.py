"""The HDF5 store: everything a run produced, in one file, behind typed accessors.

:class:`Store` reads and writes the layout that :mod:`polypure.store.schema` owns (every path and
attribute name, the format version); how a store grows with its config (more neurons, another rule
variant) and when what it holds is stale are plain functions of :mod:`polypure.store.growth`.

Every method that changes the file is marked :func:`writes`: it is one whole write that Ctrl-C and SIGTERM
do not cut in half, and the run's session learns of it. Only one process writes a store at a time (the
stage runner, :mod:`polypure.store.write_session`); readers open it read-only.

Example
-------
>>> from polypure.store.hdf5_store import Store         # doctest: +SKIP
>>> with Store("storage/demo.h5") as store:             # doctest: +SKIP
...     print(store.space_shape("block_3", "block_2"))
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

from polypure.config.paths import require_file
from polypure.config.settings import DEFAULT_VARIANT, space_name
from polypure.errors import ConfigError, StaleResultError, StoreError
from polypure.store import growth, schema
from polypure.store.schema import ACTIVATION, STR, attr_value, decode, read_attr
from polypure.store.write_session import kill_inside_write_for_test, whole_write


def writes(method: Callable) -> Callable:
    """Mark a :class:`Store` method that changes the file: it runs as one whole write.

    Ctrl-C and SIGTERM wait until the method has returned (:func:`polypure.store.write_session.whole_write`),
    the store's ``on_write`` tells the run's session that there is something to commit, and the crash
    harness may kill the process right after the write (``POLYPURE_TEST_KILL_AT=write:N``). Every method
    that writes the file carries this mark, private helpers included; ``tests/test_store_writes.py`` fails
    for one that writes without it.
    """
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        with whole_write():
            result = method(self, *args, **kwargs)
            self._wrote()
            kill_inside_write_for_test()
            return result
    return write


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
        if mode == "r":
            # a folder, /dev/null or a FIFO is no store: said as such, and a FIFO is never opened
            require_file(self.file_path, "store", StoreError)
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
        if schema.FORMAT_ATTR not in attrs and len(self.file.keys()) == 0:
            return
        if decode(attrs.get(schema.FORMAT_ATTR)) != schema.FORMAT:
            raise StoreError(f"{str(self.path)!r} is an HDF5 file but not a polypure store")
        schema.check_version(self.path, attrs)

    @classmethod
    def open_for_run(cls, path: str | Path, config_yaml: str, overwrite: bool = False, **options) -> Store:
        """Open (or create) the store a run writes, checking it was made for the same model and data.

        Only the sections every result depends on (:data:`polypure.store.growth.GLOBAL_SECTIONS`) are
        compared here; the stages check their own results (a top-K's k and statistic, a relevance target's
        rule) and grow the store where the config asks for more.

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
        path = Path(path)
        file = Path(options.get("file") or path)
        if file.exists():
            try:
                with h5py.File(file, "r") as probe:
                    fmt = decode(probe.attrs.get(schema.FORMAT_ATTR))
                    old_yaml = decode(probe.attrs.get(schema.CONFIG_ATTR, ""))
                    if fmt == schema.FORMAT:
                        # read only, before --overwrite below could delete a store this polypure cannot read
                        schema.check_version(path, probe.attrs)
            except OSError:
                raise StoreError(f"{str(path)!r} exists and is not an HDF5 file; remove it or set another store "
                                 "path") from None
            if fmt != schema.FORMAT:
                raise StoreError(f"{str(path)!r} exists and is not a polypure store; remove it or set another "
                                 "store path")
            changed = growth.global_changes(old_yaml, config_yaml)
            if changed and not overwrite:
                shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
                raise StaleResultError(f"store {str(path)!r} was made with a different config ({shown}); rerun "
                                       "with --overwrite to replace it, or set another store path")
            if changed:
                file.unlink()
        if file.exists():
            store = cls(path, "a", **options)
            if store.config_yaml != config_yaml:
                store.write_config(config_yaml)
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, "a", **options)
        store._write_header(config_yaml)
        return store

    @writes
    def _write_header(self, config_yaml: str) -> None:
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for key, value in schema.header(config_yaml, created).items():
            self.file.attrs[key] = value

    @writes
    def write_config(self, config_yaml: str) -> None:
        """Record the resolved config the store is now written with (YAML text, :attr:`config_yaml`)."""
        self.file.attrs[schema.CONFIG_ATTR] = config_yaml

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
        return decode(self.file.attrs.get(schema.CONFIG_ATTR, ""))

    def _group(self, path: str) -> h5py.Group:
        return self.file.require_group(path)

    def _replace(self, group: h5py.Group, name: str, data, **kwargs) -> h5py.Dataset:
        if name in group:
            del group[name]
        return group.create_dataset(name, data=data, **kwargs)

    def _children(self, path: str) -> list[str]:
        """The names in a group, in store order (none where it is absent)."""
        return list(self.file[path].keys()) if path in self.file else []

    # -- samples -----------------------------------------------------------------------------------

    def has_samples(self) -> bool:
        """Whether the sample ids and labels were written."""
        return schema.SAMPLE_IDS in self.file

    @writes
    def write_samples(self, ids: list[str], labels: np.ndarray,
                      factors: dict[str, tuple[np.ndarray, list[str]]] | None = None,
                      class_names: list[str] | None = None) -> None:
        """Write ids, labels and factors of every sample (once, before any per-sample result)."""
        group = self._group(schema.SAMPLES_GROUP)
        self._replace(group, schema.IDS, np.array(ids, dtype=object), dtype=STR)
        self._replace(group, schema.LABELS, np.asarray(labels, np.int64))
        if class_names is not None:
            group[schema.LABELS].attrs[schema.CLASSES_ATTR] = attr_value(list(class_names))
        for name, (codes, values) in (factors or {}).items():
            ds = self._replace(self._group(schema.FACTORS), name, np.asarray(codes, np.int64))
            ds.attrs[schema.FACTOR_VALUES_ATTR] = attr_value(list(values))

    def sample_ids(self) -> list[str]:
        """The stable id of every sample."""
        return [decode(s) for s in self.file[schema.SAMPLE_IDS][()]]

    def check_samples(self, ids: list[str]) -> None:
        """Refuse to mix results of different datasets in one store."""
        stored = self.sample_ids()
        if stored != list(ids):
            raise StoreError(f"store {str(self.path)!r} holds results for other samples ({len(stored)} stored, "
                             f"{len(ids)} now); use --overwrite or another store path")

    def class_names(self) -> list[str] | None:
        """Names of the classes the labels index, where known."""
        classes = self.file[schema.SAMPLE_LABELS].attrs.get(schema.CLASSES_ATTR)
        return read_attr(classes) if classes is not None else None

    def labels(self) -> np.ndarray:
        """Class of every sample, -1 where unknown."""
        return self.file[schema.SAMPLE_LABELS][()]

    @writes
    def update_labels(self, labels: np.ndarray) -> None:
        """Replace the class of every sample (labels collected from the items as the top-K pass reads them)."""
        self.file[schema.SAMPLE_LABELS][:] = np.asarray(labels, np.int64)

    def factors(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        """Generative factors: name -> (code per sample, value names)."""
        out = {}
        if schema.FACTORS in self.file:
            for name, ds in self.file[schema.FACTORS].items():
                out[name] = (ds[()], [decode(v) for v in ds.attrs.get(schema.FACTOR_VALUES_ATTR, [])])
        return out

    # -- top-k -------------------------------------------------------------------------------------

    def topk_progress(self, layer: str) -> tuple[np.ndarray, np.ndarray, int, bool] | None:
        """``(values, indices, samples_done, complete)`` of a layer's top-K, or None if not started."""
        key = schema.topk_path(layer)
        if key not in self.file:
            return None
        group = self.file[key]
        return (group[schema.VALUES][()], group[schema.INDICES][()], int(group.attrs[schema.SAMPLES_DONE_ATTR]),
                bool(group.attrs[schema.COMPLETE_ATTR]))

    @writes
    def write_topk(self, layer: str, values: np.ndarray, indices: np.ndarray, statistic: str,
                   samples_done: int, complete: bool, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write (or checkpoint) a layer's top-K."""
        group = self._group(schema.topk_path(layer))
        self._replace(group, schema.INDICES, np.asarray(indices, np.int64))
        self._replace(group, schema.VALUES, np.asarray(values, np.float32))
        for name, data in (extra or {}).items():
            self._replace(group, name, data)
        group.attrs[schema.STATISTIC_ATTR] = statistic
        group.attrs[schema.SAMPLES_DONE_ATTR] = int(samples_done)
        group.attrs[schema.COMPLETE_ATTR] = bool(complete)

    def topk_statistic(self, name: str) -> str:
        """The statistic (``max`` or ``mean``) a stored top-K ranks by."""
        return read_attr(self.file[schema.topk_path(name)].attrs[schema.STATISTIC_ATTR])

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

    @writes
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
            What computes the target: the variant's rule (:data:`~polypure.store.schema.RULE_KEYS`:
            composite, canonizers, ...) and the target's own settings (n_refs, layers, ...). A target made
            with other settings, or a variant made with another rule, is stale.
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
        path = schema.relevance_path(target)
        neurons = np.asarray(neurons, np.int64)
        rule, settings = growth.split_rule(attrs)
        if path in self.file:
            group = self.file[path]
            stale = growth.rule_differences(group, settings, layer_channels)
            if stale and not overwrite:
                raise StaleResultError(f"store {str(self.path)!r}: relevance of target {target!r} was made with a "
                                       f"different config ({'; '.join(stale)}); rerun with --overwrite to "
                                       "recompute it, or set another store path")
            if stale:
                self.drop(path)
                self.drop_derived(target)
            else:
                keep, new = growth.fit_rows(group[schema.NEURONS][()], neurons, overwrite)
                if len(new) or keep is not None:
                    growth.resize_rows(group, keep, new)
                    self.drop_derived(target)
        if path not in self.file:
            growth.create_target(self._group(path), neurons, settings)
        group = self.file[path]
        self._prepare_variant(target, variant, rule, layer_channels, target_channels, n_refs, overwrite)
        return group

    def _prepare_variant(self, target: str, variant: str, rule: dict[str, Any], layer_channels: dict[str, int],
                         target_channels: int, n_refs: int, overwrite: bool) -> None:
        group = self.file[schema.relevance_path(target)]
        vgroup = self._group(schema.variant_path(target, variant))
        if schema.COMPLETE in vgroup:
            stale = growth.rule_differences(vgroup, rule, layer_channels)
            if stale and not overwrite:
                which = f"target {target!r}" + (f", variant {variant!r}," if variant != DEFAULT_VARIANT else "")
                raise StaleResultError(f"store {str(self.path)!r}: relevance of {which} was made with a different "
                                       f"config ({'; '.join(stale)}); rerun with --overwrite to recompute it, or "
                                       "set another store path" + (" or variant id" if variant != DEFAULT_VARIANT
                                                                   else ""))
            if stale:
                self.drop_variant(target, variant, forget=False)
                vgroup = self._group(schema.variant_path(target, variant))
        if schema.COMPLETE not in vgroup:
            growth.create_variant(vgroup, len(group[schema.NEURONS]), n_refs,
                                  {**layer_channels, ACTIVATION: target_channels}, rule)
        known = self.variants(target)
        if variant not in known:
            group.attrs[schema.VARIANTS_ATTR] = attr_value([*known, variant])
            if variant != DEFAULT_VARIANT:
                # a version 1 reader would not see this variant: the store now has the layout of version 2
                self.file.attrs[schema.VERSION_ATTR] = schema.FORMAT_VERSION
            self.drop(schema.SUMMARY)

    @writes
    def drop_variant(self, target: str, variant: str, forget: bool = True) -> None:
        """Delete one variant's relevance and what was derived from its spaces.

        With ``forget`` False the variant keeps its place in the target's list (it is about to be recomputed).
        """
        group = self.file[schema.relevance_path(target)]
        spaces = self.variant_spaces(target, variant)
        if self.variants(target)[:1] == [variant]:
            # the first variant's activations are the target's 'activation' space
            spaces.append(ACTIVATION)
        if variant == DEFAULT_VARIANT:
            for name in [*self.attribution_layers(target), ACTIVATION, schema.COMPLETE]:
                if name in group:
                    del group[name]
            for key in schema.RULE_KEYS:
                if key in group.attrs:
                    del group.attrs[key]
        else:
            self.drop(schema.variant_path(target, variant))
        if forget:
            group.attrs[schema.VARIANTS_ATTR] = attr_value([v for v in self.variants(target) if v != variant])
        for space in spaces:
            self.drop(schema.clusters_path(target, space))
        clusters = schema.clusters_path(target)
        if clusters in self.file and not len(self.file[clusters]):
            self.drop(clusters)
        self.drop(schema.metrics_path(target))
        self.drop(schema.comparisons_path(target))
        self.drop(schema.SUMMARY)

    @writes
    def write_relevance_rows(self, target: str, rows: np.ndarray, arrays: dict[str, np.ndarray],
                             variant: str = DEFAULT_VARIANT) -> None:
        """Write whole neurons (rows of the target) of one variant and mark them complete, in one flush."""
        group = self.file[schema.variant_path(target, variant)]
        rows = np.asarray(rows)
        order = np.argsort(rows)
        for start, stop in growth.runs(rows[order]):
            sel = order[start:stop]
            lo, hi = int(rows[sel[0]]), int(rows[sel[-1]]) + 1
            for name, data in arrays.items():
                group[name][lo:hi] = data[sel]
            kill_inside_write_for_test()
            group[schema.COMPLETE][lo:hi] = True
        self.flush()

    def relevance_targets(self) -> list[str]:
        """Names of the relevance targets in the store."""
        return self._children(schema.RELEVANCE_GROUP)

    # -- invalidation ------------------------------------------------------------------------------

    @writes
    def drop(self, path: str) -> None:
        """Delete a group or dataset if present."""
        if path in self.file:
            del self.file[path]

    @writes
    def drop_derived(self, target: str) -> None:
        """Delete what was computed from a target's relevance rows: clusters, embeddings, crops, metrics."""
        for path in schema.derived_paths(target):
            self.drop(path)
        for evaluator in self._children(schema.EMBEDDINGS_GROUP):
            self.drop(schema.embeddings_path(evaluator, target))
        self.drop(schema.SUMMARY)

    @writes
    def drop_planted(self, layer: str) -> None:
        """Delete a layer's planted pairs and what was computed from them (the real layer's top-K stays)."""
        target = schema.planted_target(layer)
        for path in (schema.planted_path(layer), schema.topk_path(target), schema.relevance_path(target)):
            self.drop(path)
        self.drop_derived(target)
        self._drop_dictionary_spaces(target)

    @writes
    def drop_topk(self, layer: str) -> None:
        """Delete a layer's top-K and everything chosen from it.

        That is the layer's planted pairs and their top-K, and every relevance target on the layer (real
        or planted) with its derived results: their references came from this top-K.
        """
        planted = schema.planted_target(layer)
        for path in (schema.topk_path(layer), schema.topk_path(planted), schema.planted_path(layer)):
            self.drop(path)
        for target in self.relevance_targets():
            if target in (layer, planted):
                self.drop(schema.relevance_path(target))
                self.drop_derived(target)
        for target in (layer, planted):
            self._drop_dictionary_spaces(target)

    # -- targets and their spaces ------------------------------------------------------------------

    def attributes(self) -> dict[str, Any]:
        """The store's own attributes (format, version, creation time, ...) without its config."""
        return {k: read_attr(v) for k, v in self.file.attrs.items() if k != schema.CONFIG_ATTR}

    def config(self) -> dict:
        """The resolved config the store was last written with, as a mapping (empty if none)."""
        return yaml.safe_load(self.config_yaml) or {}

    def target_attrs(self, target: str) -> dict[str, Any]:
        """The attributes of a relevance target (its layer and attribution layers; the ``default`` variant's rule)."""
        return {key: read_attr(value) for key, value in self.file[schema.relevance_path(target)].attrs.items()}

    def variant_attrs(self, target: str, variant: str) -> dict[str, Any]:
        """The rule of one variant of a target (:data:`~polypure.store.schema.RULE_KEYS`)."""
        attrs = self.file[schema.variant_path(target, variant)].attrs
        return {key: read_attr(attrs[key]) for key in schema.RULE_KEYS if key in attrs}

    def attribution_layers(self, target: str) -> list[str]:
        """A target's attribution layers, from the lowest as configured."""
        attrs = self.file[schema.relevance_path(target)].attrs
        return list(read_attr(attrs.get(schema.ATTRIBUTION_LAYERS_ATTR, [])))

    def variants(self, target: str) -> list[str]:
        """Ids of the rule variants a target has, in the order they were added (``default`` alone in version 1)."""
        group = self.file[schema.relevance_path(target)]
        if schema.VARIANTS_ATTR in group.attrs:
            return list(read_attr(group.attrs[schema.VARIANTS_ATTR]))
        return [DEFAULT_VARIANT] if schema.COMPLETE in group else []

    def variant_spaces(self, target: str, variant: str) -> list[str]:
        """The relevance spaces of one variant: ``<variant>:<layer>`` per attribution layer (plain for ``default``)."""
        return [space_name(variant, layer) for layer in self.attribution_layers(target)]

    def relevance_spaces(self, target: str) -> list[str]:
        """Every relevance space of a target: each variant's attribution layers, variant by variant."""
        return [space for variant in self.variants(target) for space in self.variant_spaces(target, variant)]

    def spaces(self, target: str) -> list[str]:
        """A target's own feature spaces: relevance spaces, ``activation``, then dictionary spaces.

        The relevance spaces are :meth:`relevance_spaces`, the dictionary spaces :meth:`dictionary_spaces`.

        Evaluators' embeddings of the target are spaces too (:meth:`features` reads them): they are listed
        apart, by :meth:`embedding_spaces`.
        """
        return [*self.relevance_spaces(target), ACTIVATION, *self.dictionary_spaces(target)]

    def embedding_spaces(self, target: str) -> list[str]:
        """The evaluators with embeddings of a target: spaces of :meth:`features` beside :meth:`spaces`."""
        return [evaluator for evaluator in self.embedding_names() if self.has_embeddings(evaluator, target)]

    def baseline_space(self, target: str) -> str:
        """The space comparisons are made against by default: the last attribution layer of the first variant.

        That is the layer right below the target, where PURE computes relevance; ``activation`` for a
        target without attribution layers.
        """
        spaces = self.relevance_spaces(target)
        return self.variant_spaces(target, self.variants(target)[0])[-1] if spaces else ACTIVATION

    def neurons(self, target: str) -> np.ndarray:
        """Neuron (or virtual-neuron) id of every row of a target."""
        return self.file[schema.join(schema.relevance_path(target), schema.NEURONS)][()]

    def complete(self, target: str, variant: str | None = None) -> np.ndarray:
        """Which rows of a target are finished: for one variant, or (None) for every variant it has."""
        variants = self.variants(target) if variant is None else [variant]
        done = np.ones(len(self.neurons(target)), bool)
        for name in variants:
            done &= self.file[schema.join(schema.variant_path(target, name), schema.COMPLETE)][()]
        return done

    def n_refs(self, target: str) -> int:
        """References per neuron of a target."""
        return int(self.file[self._space_path(target, ACTIVATION)].shape[1])

    def reference_indices(self, target: str) -> np.ndarray:
        """Sample index of every reference of every stored neuron of a target: (M, n_refs)."""
        return self._topk_indices(target)[self.neurons(target), :self.n_refs(target)]

    def relevance(self, target: str, space: str) -> np.ndarray:
        """A target's relevance in one space (``lrp:block_2``), or its ``activation`` baseline: (M, n_refs, C)."""
        return self.read(self._space_path(target, space))

    def space_shape(self, target: str, space: str) -> tuple[int, ...]:
        """The shape (M, n_refs, D) of a space's features, without reading them."""
        if space in self.dictionary_spaces(target):
            rows = self._dictionary_rows(space, target)
            return (len(rows), *self.file[schema.dictionary_space_path(space, target, schema.CONTRIBUTIONS)].shape[1:])
        for path in self._space_paths(target, space):
            if path in self.file and isinstance(self.file[path], h5py.Dataset):
                return tuple(self.file[path].shape)
        raise StoreError(f"store {str(self.path)!r} has no space {space!r} for target {target!r}")

    def has_space(self, target: str, space: str) -> bool:
        """Whether the store has features of ``space`` for ``target`` (a layer, activation or an embedding)."""
        if space in schema.ROW_BOOKKEEPING:
            return False
        if space in self.dictionary_spaces(target):
            return True
        return any(path in self.file and isinstance(self.file[path], h5py.Dataset)
                   for path in self._space_paths(target, space))

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
        if space in self.dictionary_spaces(target):
            return self._dictionary_features(space, target, row)
        for path in self._space_paths(target, space):
            if path in self.file and space not in schema.ROW_BOOKKEEPING and isinstance(self.file[path], h5py.Dataset):
                return self.file[path][()] if row is None else self.file[path][row]
        raise StoreError(f"store {str(self.path)!r} has no space {space!r} for target {target!r} (attribution "
                         "layers, 'activation', or evaluator embeddings)")

    def _space_path(self, target: str, space: str) -> str:
        """Where a relevance space lives; ``activation`` is the first variant's (the variants agree on it)."""
        variants = self.variants(target) if space == ACTIVATION and schema.relevance_path(target) in self.file else []
        return schema.space_path(target, space, variants[0] if variants else DEFAULT_VARIANT)

    def _space_paths(self, target: str, space: str) -> tuple[str, str]:
        """Where a space's features may live: a relevance space (or activation), or an evaluator's embedding."""
        return self._space_path(target, space), schema.embeddings_path(space, target)

    def _topk_indices(self, name: str) -> np.ndarray:
        return self.read(schema.join(schema.topk_path(name), schema.INDICES))

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
                                  "'activation', a dictionary nor an evaluator embedding in the store (run the "
                                  "dictionary or embed stage first)")
        return out

    def planted_targets(self) -> list[str]:
        """The relevance targets made of planted virtual neurons."""
        return [t for t in self.relevance_targets() if schema.planted_layer(t) is not None]

    # -- dictionaries (sparse autoencoders, NMF) and their spaces --------------------------------------

    def dictionary_ids(self) -> list[str]:
        """The dictionaries in the store, finished or training."""
        return self._children(schema.DICTIONARIES_GROUP)

    def dictionary_attrs(self, dictionary_id: str) -> dict[str, Any]:
        """A dictionary's attributes: kind, layer, signature, epochs done, complete, quality; empty if absent."""
        path = schema.dictionary_path(dictionary_id)
        return {key: read_attr(value) for key, value in self.file[path].attrs.items()} if path in self.file else {}

    def dictionary_checkpoint(self, dictionary_id: str) -> dict[str, np.ndarray]:
        """The training state a dictionary was last checkpointed with (empty where none is stored)."""
        return self._arrays(schema.dictionary_path(dictionary_id, schema.CHECKPOINT))

    def dictionary_arrays(self, dictionary_id: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(dictionary, bias, state)`` of a finished dictionary: what its kind encodes and decodes with.

        Raises
        ------
        StoreError
            If the dictionary is absent or still training.
        """
        if not self.dictionary_attrs(dictionary_id).get(schema.COMPLETE_ATTR):
            raise StoreError(f"store {str(self.path)!r} has no finished dictionary {dictionary_id!r}; run the "
                             "dictionary stage first")
        return (self.read(schema.dictionary_path(dictionary_id, schema.DICTIONARY)),
                self.read(schema.dictionary_path(dictionary_id, schema.BIAS)),
                self._arrays(schema.dictionary_path(dictionary_id, schema.STATE)))

    def _arrays(self, path: str) -> dict[str, np.ndarray]:
        return {name: ds[()] for name, ds in self.file[path].items()} if path in self.file else {}

    def _put(self, group: h5py.Group, name: str, data) -> None:
        """Write a dataset in place where it has the shape and dtype already (checkpoints leave no dead space)."""
        data = np.asarray(data)
        if name in group and group[name].shape == data.shape and group[name].dtype == data.dtype:
            group[name][()] = data
        else:
            self._replace(group, name, data)

    @writes
    def write_dictionary_checkpoint(self, dictionary_id: str, attrs: dict[str, Any], state: dict[str, np.ndarray],
                                    epochs_done: int) -> None:
        """Checkpoint a training dictionary: its settings (kind, layer, signature), state and epochs done."""
        group = self._group(schema.dictionary_path(dictionary_id))
        for key, value in attrs.items():
            group.attrs[key] = attr_value(value)
        checkpoint = self._group(schema.dictionary_path(dictionary_id, schema.CHECKPOINT))
        for name, data in state.items():
            self._put(checkpoint, name, data)
        group.attrs[schema.EPOCHS_DONE_ATTR] = int(epochs_done)
        group.attrs[schema.COMPLETE_ATTR] = False

    @writes
    def write_dictionary(self, dictionary_id: str, dictionary: np.ndarray, bias: np.ndarray,
                         state: dict[str, np.ndarray], quality: dict[str, float]) -> None:
        """Finish a dictionary: its concepts, bias, encoder state and quality; its training checkpoint goes."""
        path = schema.dictionary_path(dictionary_id)
        group = self._group(path)
        self._replace(group, schema.DICTIONARY, np.asarray(dictionary, np.float32))
        self._replace(group, schema.BIAS, np.asarray(bias, np.float32))
        self.drop(schema.dictionary_path(dictionary_id, schema.STATE))
        encoder = self._group(schema.dictionary_path(dictionary_id, schema.STATE))
        for name, data in state.items():
            self._replace(encoder, name, np.asarray(data))
        self.drop(schema.dictionary_path(dictionary_id, schema.CHECKPOINT))
        for key in schema.QUALITY_ATTRS:
            group.attrs[key] = quality[key]
        group.attrs[schema.COMPLETE_ATTR] = True

    @writes
    def drop_dictionary(self, dictionary_id: str) -> None:
        """Delete a dictionary, its spaces and what was derived from them (clusters, metrics, comparisons)."""
        for target in self._children(schema.dictionary_path(dictionary_id, schema.SPACES)):
            self._drop_space_results(dictionary_id, target)
        self.drop(schema.dictionary_path(dictionary_id))

    def dictionary_spaces(self, target: str) -> list[str]:
        """The dictionaries with a space of a target, in store order (each space is named by its dictionary)."""
        return [d for d in self.dictionary_ids() if schema.dictionary_space_path(d, target) in self.file]

    def dictionary_space_attrs(self, dictionary_id: str, target: str) -> dict[str, Any]:
        """The attributes of a dictionary's space of a target (its signature), empty where there is none."""
        path = schema.dictionary_space_path(dictionary_id, target)
        return {key: read_attr(value) for key, value in self.file[path].attrs.items()} if path in self.file else {}

    def dictionary_space(self, dictionary_id: str, target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(neurons, concepts, contributions)`` of a dictionary space as stored, rows in the order computed.

        ``concepts`` (M, T) are each row's kept concepts, by decreasing mean contribution over its references;
        ``contributions`` (M, n_refs, T) are theirs to each reference. :meth:`features` gives the
        contributions in the target's row order.
        """
        path = schema.dictionary_space_path(dictionary_id, target)
        return tuple(self.read(schema.join(path, name)) for name in (schema.NEURONS, schema.CONCEPTS,
                                                                     schema.CONTRIBUTIONS))

    def dictionary_concepts(self, dictionary_id: str, target: str) -> np.ndarray:
        """Each row's kept concepts (M, T) in a dictionary space, in the target's row order (as :meth:`features`).

        Column ``t`` of a row is the concept whose contributions are the row's feature ``t``.
        """
        rows = self._dictionary_rows(dictionary_id, target)
        return self.read(schema.dictionary_space_path(dictionary_id, target, schema.CONCEPTS))[rows]

    @writes
    def write_dictionary_space(self, dictionary_id: str, target: str, neurons: np.ndarray, concepts: np.ndarray,
                               contributions: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store a dictionary's space of a target; what was derived from an earlier one of it is deleted."""
        self._drop_space_results(dictionary_id, target)
        group = self._group(schema.dictionary_space_path(dictionary_id, target))
        self._replace(group, schema.NEURONS, np.asarray(neurons, np.int64))
        self._replace(group, schema.CONCEPTS, np.asarray(concepts, np.int64))
        self._replace(group, schema.CONTRIBUTIONS, np.asarray(contributions, np.float32))
        for key, value in attrs.items():
            group.attrs[key] = attr_value(value)

    @writes
    def _drop_space_results(self, dictionary_id: str, target: str) -> None:
        """Delete a dictionary space of a target and the clusterings, metrics and comparisons made from it."""
        if schema.dictionary_space_path(dictionary_id, target) not in self.file:
            return
        self.drop(schema.dictionary_space_path(dictionary_id, target))
        self.drop(schema.clusters_path(target, dictionary_id))
        self.drop(schema.metrics_path(target))
        self.drop(schema.comparisons_path(target))
        self.drop(schema.SUMMARY)

    @writes
    def _drop_dictionary_spaces(self, target: str) -> None:
        """Delete every dictionary space of a target (its references changed) and what was derived from them."""
        for dictionary_id in self.dictionary_ids():
            self._drop_space_results(dictionary_id, target)

    def _dictionary_rows(self, dictionary_id: str, target: str) -> np.ndarray:
        """The row of a dictionary space holding each row of the target (each stored row before ``relevance``).

        Raises
        ------
        StoreError
            If the space lacks a neuron of the target.
        """
        stored = self.file[schema.dictionary_space_path(dictionary_id, target, schema.NEURONS)][()]
        if target not in self.relevance_targets():
            return np.arange(len(stored))
        where = {int(n): i for i, n in enumerate(stored)}
        neurons = self.neurons(target)
        missing = [int(n) for n in neurons if int(n) not in where]
        if missing:
            raise StoreError(f"store {str(self.path)!r}: dictionary space {dictionary_id!r} of target {target!r} lacks "
                             f"neuron(s) {missing[:5]}; run the dictionary stage")
        return np.array([where[int(n)] for n in neurons], np.int64)

    def _dictionary_features(self, dictionary_id: str, target: str, row: int | None) -> np.ndarray:
        """A dictionary space's contributions in the target's row order, cut to its references."""
        rows = self._dictionary_rows(dictionary_id, target)
        data = self.file[schema.dictionary_space_path(dictionary_id, target, schema.CONTRIBUTIONS)]
        n_refs = self.n_refs(target) if target in self.relevance_targets() else data.shape[1]
        if data.shape[1] < n_refs:
            raise StoreError(f"store {str(self.path)!r}: dictionary space {dictionary_id!r} of target {target!r} has "
                             f"{data.shape[1]} references per neuron, the target {n_refs}; run the dictionary stage")
        if row is not None:
            return data[int(rows[row]), :n_refs]
        return data[()][rows, :n_refs]

    # -- planted -----------------------------------------------------------------------------------

    def has_planted_pairs(self, layer: str) -> bool:
        """Whether pairs were chosen for a layer's planted neurons."""
        return self._planted(layer, schema.PAIRS) in self.file

    @writes
    def write_planted_pairs(self, layer: str, pairs: np.ndarray, scales: np.ndarray, settings: dict[str, Any]) -> None:
        """Keep a layer's planted channel pairs, their scales and the settings they were chosen with."""
        self.write_array(self._planted(layer, schema.PAIRS), pairs)
        self.write_array(self._planted(layer, schema.SCALES), scales)
        for key, value in settings.items():
            self.file[schema.planted_path(layer)].attrs[key] = value

    def planted_pairs(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(pairs, scales)`` of a layer's planted neurons."""
        return self.read(self._planted(layer, schema.PAIRS)), self.read(self._planted(layer, schema.SCALES))

    def planted_settings(self, layer: str) -> dict[str, Any]:
        """The settings a layer's pairs were chosen with (empty for stores written before they were kept)."""
        group = schema.planted_path(layer)
        return {k: read_attr(v) for k, v in self.file[group].attrs.items()} if group in self.file else {}

    @writes
    def write_planted_truth(self, layer: str, truth: np.ndarray, modes: list[str]) -> None:
        """The true split of each planted neuron's references and the mode of each virtual neuron."""
        self.write_array(self._planted(layer, schema.TRUTH), np.asarray(truth, np.int64))
        self.write_array(self._planted(layer, schema.MODES), list(modes))

    def planted_modes(self, layer: str) -> list[str] | None:
        """The mode of each virtual neuron of a layer, or None before they were stored."""
        path = self._planted(layer, schema.MODES)
        return list(read_attr(self.read(path))) if path in self.file else None

    def topk_payload(self, name: str, payload: str) -> np.ndarray:
        """A per-entry payload kept with a top-K (``truth`` of planted neurons)."""
        return self.read(schema.join(schema.topk_path(name), payload))

    def _planted(self, layer: str, dataset: str) -> str:
        return schema.join(schema.planted_path(layer), dataset)

    # -- labels of references ----------------------------------------------------------------------

    def label_sets(self) -> list[str]:
        """Names of the label sets known for the samples: ``planted``, the factors, then ``class``."""
        labelled = self.has_samples() and (self.labels() >= 0).any()
        return [schema.PLANTED, *self.factors()] + ([schema.CLASS] if labelled else [])

    def known_labels(self, target: str, full_topk: bool = False) -> dict[str, np.ndarray]:
        """Every label set known for a target's references, each (M, n_refs), or (M, K) with ``full_topk``."""
        neurons = self.neurons(target)
        indices = self._topk_indices(target)[neurons]
        refs = indices if full_topk else indices[:, :self.n_refs(target)]
        out = {}
        if schema.planted_layer(target) is not None:
            # the truth of every top-K entry, in the target's row order: /planted/<layer>/truth has the n_refs of
            # the run that chose the pairs and one row per virtual neuron, which a later run may not share
            out[schema.PLANTED] = self.topk_payload(target, schema.TRUTH)[neurons][:, :refs.shape[1]]
        for name, (codes, _) in self.factors().items():
            out[name] = codes[refs]
        labels = self.labels()
        if (labels >= 0).any():
            out[schema.CLASS] = labels[refs]
        return out

    # -- embeddings and crops ----------------------------------------------------------------------

    def embedding_names(self) -> list[str]:
        """Evaluators with stored embeddings."""
        return self._children(schema.EMBEDDINGS_GROUP)

    def has_embeddings(self, evaluator: str, target: str, signature: str | None = None) -> bool:
        """Whether embeddings of a target by an evaluator are stored (with this signature, if given)."""
        return self._current(schema.embeddings_path(evaluator, target), signature)

    def embedding_attrs(self, evaluator: str, target: str) -> dict[str, Any]:
        """The attributes of an evaluator's embeddings of a target (its signature, view); empty if none."""
        path = schema.embeddings_path(evaluator, target)
        return {key: read_attr(value) for key, value in self.file[path].attrs.items()} if path in self.file else {}

    def embeddings(self, evaluator: str, target: str) -> np.ndarray:
        """An evaluator's embedding of every reference of a target: (M, n_refs, D)."""
        return self.read(schema.embeddings_path(evaluator, target))

    @writes
    def write_embeddings(self, evaluator: str, target: str, data: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store an evaluator's embeddings of a target's references (rows aligned with its relevance)."""
        self.write_array(schema.embeddings_path(evaluator, target), np.asarray(data, np.float32), attrs=attrs)

    @writes
    def write_crops(self, target: str, boxes: np.ndarray, composite: str) -> None:
        """Crop boxes of a target's references (row start, row stop, column start, column stop; -1: whole image)."""
        self.write_array(schema.crops_path(target), np.asarray(boxes, np.int64), attrs=schema.crop_attrs(composite))

    def crop_boxes(self, target: str) -> np.ndarray | None:
        """The crop boxes of a target, or None where the crop view was not used."""
        path = schema.crops_path(target)
        return self.read(path) if path in self.file else None

    # -- clusters ----------------------------------------------------------------------------------

    def has_clusters(self, target: str, space: str, method: str, signature: str | None = None) -> bool:
        """Whether a clustering is stored (made with this signature, if given)."""
        return self._current(schema.clusters_path(target, space, method), signature)

    @writes
    def write_clusters(self, target: str, space: str, method: str, labels: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store cluster labels (M, n_refs) of a target in a space by a method id."""
        self.write_array(schema.clusters_path(target, space, method), np.asarray(labels, np.int64),
                         attrs={**attrs, schema.SPACE_ATTR: space})

    def cluster_labels(self, target: str, space: str, method: str, row: int | None = None) -> np.ndarray | None:
        """Cluster labels of a target in a space by a method (one row, or all), None where not clustered."""
        path = schema.clusters_path(target, space, method)
        if path not in self.file:
            return None
        return self.file[path][()] if row is None else self.file[path][row]

    def clusterings(self, target: str) -> list[tuple[str, str]]:
        """``(space, method id)`` of every stored clustering of a target."""
        path = schema.clusters_path(target)
        if path not in self.file:
            return []
        return [(space, method) for space, methods in self.file[path].items() for method in methods]

    def cluster_methods(self, target: str) -> list[str]:
        """Method ids with a clustering of a target in any space, in first-seen order."""
        return list(dict.fromkeys(method for _, method in self.clusterings(target)))

    def cluster_attrs(self, target: str, space: str, method: str) -> dict[str, Any]:
        """The attributes of a stored clustering (``method``, ``params``, ``signature``), empty where it is absent."""
        path = schema.clusters_path(target, space, method)
        return {k: read_attr(v) for k, v in self.file[path].attrs.items()} if path in self.file else {}

    def _current(self, path: str, signature: str | None) -> bool:
        if path not in self.file:
            return False
        return signature is None or self.file[path].attrs.get(schema.SIGNATURE_ATTR) == signature

    # -- metrics -----------------------------------------------------------------------------------

    @writes
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
            scalar) (reference), or ``split_gain`` (reference, space, method); the selectivity stage's kinds
            go together through :meth:`write_selectivity`.
        key : iterable of str
        values : array-like, (M,) or (M, k)
        attrs : dict, optional
        """
        self.write_array(schema.metrics_path(target, kind, *key), values, attrs=attrs)

    def metric(self, target: str, kind: str, *key: str) -> np.ndarray | None:
        """A stored per-neuron metric (strings decoded), or None where it is not stored."""
        path = schema.metrics_path(target, kind, *key)
        if path not in self.file:
            return None
        ds = self.file[path]
        if h5py.check_string_dtype(ds.dtype) is not None:
            return np.asarray(ds.asstr()[()], dtype=str)
        return ds[()]

    def metric_attrs(self, target: str, kind: str, *key: str) -> dict[str, Any]:
        """The attributes of a stored per-neuron metric (its ``signature``, ``columns``), empty where it is absent."""
        path = schema.metrics_path(target, kind, *key)
        return {k: read_attr(v) for k, v in self.file[path].attrs.items()} if path in self.file else {}

    @writes
    def write_selectivity(self, target: str, space: str, method: str, arrays: dict[str, np.ndarray],
                          attrs: dict[str, Any]) -> None:
        """Store a clustering's causal selectivity, its null, per-cluster drops and circuits as one whole write.

        Parameters
        ----------
        target, space, method : str
            ``/metrics/<target>/<kind>/<space>/<method>`` for each kind of
            :data:`~polypure.store.schema.SELECTIVITY_KINDS`.
        arrays : dict of str to ndarray
            One array per kind: (M,), (M,), (M, K, 4) and (M, K, m).
        attrs : dict
            Given to every array (the ``signature`` the stage checks, the settings); the drops also get their
            ``columns`` (:data:`~polypure.store.schema.SELECTIVITY_DROP_COLUMNS`).
        """
        for kind in schema.SELECTIVITY_KINDS:
            extra = {"columns": list(schema.SELECTIVITY_DROP_COLUMNS)} if kind == schema.SELECTIVITY_DROPS else {}
            self.write_array(schema.metrics_path(target, kind, space, method), arrays[kind], attrs={**attrs, **extra})

    def metric_keys(self, target: str, kind: str, *key: str) -> list[str]:
        """The names directly under ``/metrics/<target>/<kind>/<key...>`` (references, label sets, spaces)."""
        return self._children(schema.metrics_path(target, kind, *key))

    def metric_entries(self, target: str) -> list[tuple[str, tuple[str, ...], np.ndarray]]:
        """``(kind, key, values)`` of every per-neuron metric stored for a target."""
        root = schema.metrics_path(target)
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

    @writes
    def write_summary(self, table: np.ndarray) -> None:
        """Store the summary table (a structured array) as ``/metrics/summary``."""
        self.write_array(schema.SUMMARY, table)

    def summary_table(self) -> np.ndarray | None:
        """The stored summary table, or None before the evaluate stage ran."""
        return self.read(schema.SUMMARY) if schema.SUMMARY in self.file else None

    # -- comparisons -------------------------------------------------------------------------------

    @writes
    def write_comparisons(self, target: str, table: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """Store a target's comparisons (a structured array, one row per comparison) as ``/comparisons/<target>``."""
        self.write_array(schema.comparisons_path(target), table, attrs=attrs)

    @writes
    def drop_comparisons(self) -> None:
        """Delete every stored comparison (the evaluate stage writes them anew, as one Holm family)."""
        self.drop(schema.COMPARISONS_GROUP)

    def comparison_targets(self) -> list[str]:
        """Targets with stored comparisons, in store order."""
        return self._children(schema.COMPARISONS_GROUP)

    def comparisons(self, target: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """A target's stored comparisons and their attributes, or None where none are stored."""
        path = schema.comparisons_path(target)
        if path not in self.file:
            return None
        ds = self.file[path]
        return ds[()], {key: read_attr(value) for key, value in ds.attrs.items()}

    # -- generic -----------------------------------------------------------------------------------

    @writes
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
