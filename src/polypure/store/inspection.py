"""A readable summary of a store: what it holds, how complete it is, and the config that made it.

Example
-------
>>> from polypure.store.inspection import describe  # doctest: +SKIP
>>> print(describe("storage/demo.h5"))     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import h5py
import yaml

from polypure.config.settings import space_name
from polypure.store import schema
from polypure.store.hdf5_store import Store
from polypure.store.schema import ACTIVATION, read_attr

#: The data settings shown for a dataset passed from Python: its kind and the ones that apply to it
#: (``polypure.data.datasets.MEMORY_DATA_KEYS``, not imported from there so that inspecting a store needs no torch).
MEMORY_DATA_SHOWN = ("kind", "batch_size", "num_workers")


def _memory_data(config_yaml: str) -> dict | None:
    """The parsed config if its data is a dataset passed from Python (``data.kind: memory``), else None."""
    try:
        config = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        return None
    data = config.get("data") if isinstance(config, dict) else None
    return config if isinstance(data, dict) and data.get("kind") == "memory" else None


def _shape(ds: h5py.Dataset) -> str:
    return "x".join(str(s) for s in ds.shape) or "scalar"


def shown_config(config_yaml: str) -> str:
    """The stored config as shown: for a dataset passed from Python, only the data settings that applied.

    The store keeps the whole resolved config (with every default) to tell stale results apart; of its
    ``data`` section only the loader settings applied to an in-memory dataset, so the others (image size,
    normalisation, ...) are left out here rather than shown as if they had.
    """
    config = _memory_data(config_yaml)
    if config is None:
        return config_yaml
    config["data"] = {key: value for key, value in config["data"].items() if key in MEMORY_DATA_SHOWN}
    return yaml.safe_dump(config, sort_keys=False)


def _dictionaries(store: Store) -> list[str]:
    """The dictionaries: kind, size, training progress or quality, and their spaces."""
    lines = ["dictionaries:"] if store.dictionary_ids() else []
    for dictionary_id in store.dictionary_ids():
        a = store.dictionary_attrs(dictionary_id)
        settings = yaml.safe_load(a.get(schema.SIGNATURE_ATTR) or "{}") or {}
        head = f"  {dictionary_id}: {a.get(schema.KIND_ATTR)}, {settings.get('n_concepts', '?')} concepts on " \
               f"{a.get(schema.LAYER_ATTR)}"
        if a.get(schema.COMPLETE_ATTR):
            lines.append(f"{head}, R² {a['r2']:.3f}, {a['dead_share']:.1%} dead, {a['mean_active']:.1f} active per "
                         f"position ({a['n_train']} training, {a['n_heldout']} held-out positions)")
        else:
            lines.append(f"{head}, training: {a.get(schema.EPOCHS_DONE_ATTR, 0)} of {settings.get('epochs', '?')} "
                         "epochs done")
        # the targets are top-K names: a space exists before the relevance stage has run
        for target in (list(store.file[schema.TOPK_GROUP]) if schema.TOPK_GROUP in store.file else []):
            if dictionary_id in store.dictionary_spaces(target):
                shape = store.dictionary_space(dictionary_id, target)[2].shape
                lines.append(f"    space of {target:<20} {'x'.join(map(str, shape))}")
    return lines


def describe(path: str | Path, show_config: bool = True) -> str:
    """Describe the store at ``path``.

    Parameters
    ----------
    path : str or Path
    show_config : bool
        Append the resolved config the store was made with.

    Returns
    -------
    str
    """
    lines = []
    with Store(path, "r") as store:
        f = store.file
        attrs = store.attributes()
        lines.append(f"store {path}  (format {attrs.get(schema.FORMAT_ATTR)} v{attrs.get(schema.VERSION_ATTR)}, "
                     f"polypure {attrs.get(schema.POLYPURE_VERSION_ATTR)}, created {attrs.get(schema.CREATED_ATTR)})")
        if store.has_samples():
            labels = store.labels()
            factors = list(store.factors())
            lines.append(f"samples: {len(labels)}, labelled {int((labels >= 0).sum())}"
                         + (f", factors: {', '.join(factors)}" if factors else "")
                         + (", from a dataset passed from Python (given to the model as it yields them)"
                            if _memory_data(store.config_yaml) is not None else ""))
        if schema.TOPK_GROUP in f:
            lines.append("top-K:")
            for name, group in f[schema.TOPK_GROUP].items():
                done = int(group.attrs.get(schema.SAMPLES_DONE_ATTR, 0))
                state = "complete" if group.attrs.get(schema.COMPLETE_ATTR) else f"partial ({done} samples seen)"
                lines.append(f"  {name:<24} {_shape(group[schema.INDICES]):>10}  "
                             f"{read_attr(group.attrs[schema.STATISTIC_ATTR])}  {state}")
        if schema.RELEVANCE_GROUP in f:
            lines.append("relevance:")
            for name in store.relevance_targets():
                a = store.target_attrs(name)
                lines.append(f"  {name}: {len(store.neurons(name))} neurons, n_refs {a.get('n_refs')}, "
                             f"attribution layers {', '.join(store.attribution_layers(name)) or '-'}")
                for variant in store.variants(name):
                    rule = store.variant_attrs(name, variant)
                    complete = store.complete(name, variant)
                    lines.append(f"    variant {variant}: {int(complete.sum())}/{len(complete)} neurons complete, "
                                 f"composite {rule.get('composite')}, canonizers {rule.get('canonizers') or '[]'}")
                    for space in [*store.variant_spaces(name, variant), space_name(variant, ACTIVATION)]:
                        if store.has_space(name, space):
                            lines.append(f"      {space:<22} {'x'.join(map(str, store.space_shape(name, space)))}")
        lines += _dictionaries(store)
        for section in (schema.PLANTED_GROUP, schema.CLUSTERS_GROUP, schema.EMBEDDINGS_GROUP, schema.METRICS_GROUP):
            if section in f:
                lines.append(f"{section}:")
                f[section].visititems(lambda name, obj, s=section: lines.append(
                    f"  {name:<40} {_shape(obj)} {obj.dtype}") if isinstance(obj, h5py.Dataset) else None)
        if show_config:
            lines.append("config:")
            lines += ["  " + line for line in shown_config(store.config_yaml).rstrip().splitlines()]
    return "\n".join(lines)

