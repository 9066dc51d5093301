"""Checks of every name and number a config uses, run before the first stage.

A typo in an attribution layer, a neuron id out of range or a clusterer parameter the estimator does not
take would otherwise stop a run after its top-K pass (or after hours of relevance). Everything here is
cheap: registry look-ups, building the clusterers, and one forward pass of one sample that gives every
layer's width and the order in which the layers run.

Example
-------
>>> from polypure import Experiment                          # doctest: +SKIP
>>> Experiment("demo", overrides=["relevance.neurons=[999]"]).validate()  # doctest: +SKIP
Traceback (most recent call last):
ConfigError: relevance.neurons: neuron 999 out of range for a layer with 128 channels
"""

from __future__ import annotations

from collections.abc import Iterator

from polypure.errors import ConfigError


def _layer_keys(config) -> Iterator[tuple[str, str, str | None]]:
    """``(key, layer, target layer or None)`` for every layer the config names, the key as a user would write it."""
    for i, layer in enumerate(config.topk.layers):
        yield f"topk.layers[{i}]", layer, None
    rel = config.relevance
    short = rel.targets is None
    for i, target in enumerate(rel.target_list):
        prefix = "relevance" if short else f"relevance.targets[{i}]"
        yield f"{prefix}.{'target_layer' if short else 'layer'}", target.layer, None
        for j, layer in enumerate(target.attribution_layers):
            yield f"{prefix}.attribution_layers[{j}]", layer, target.layer
    for i, planted in enumerate(rel.planted_list):
        prefix = "relevance.planted" if not isinstance(rel.planted, list) else f"relevance.planted[{i}]"
        yield f"{prefix}.layer", planted.layer, None
        for j, layer in enumerate(planted.attribution_layers or []):
            yield f"{prefix}.attribution_layers[{j}]", layer, planted.layer
    for i, entry in enumerate(config.dictionaries):
        yield f"dictionaries[{i}].layer", entry.layer, None


def check_rules(config) -> None:
    """Each variant's composite and canonizers must be registered, and its composite must take its parameters.

    A variant's id must not be the name of an attribution layer either (the ``default`` variant's datasets).
    """
    from polypure.attribution.composites import CANONIZERS, check_composite

    rel = config.relevance
    named = rel.variants is not None
    layers = _attribution_layers(config)
    for i, variant in enumerate(rel.variant_list):
        prefix = f"relevance.variants[{i}] ({variant.id})." if named else "relevance."
        check_composite(variant.composite_name, variant.composite_params, key=f"{prefix}composite")
        for name in variant.canonizers:
            try:
                CANONIZERS.get(name)
            except ConfigError as exc:
                raise ConfigError(f"{prefix}canonizers: {exc}") from None
        if named and variant.id in layers:
            raise ConfigError(f"relevance.variants[{i}]: id {variant.id!r} is the name of an attribution layer; "
                              "give the variant another id")


def check_clusterers(config) -> None:
    """Every clusterer must exist and accept its parameters (it is built, not fitted), and have spaces to cluster.

    A method's ``spaces`` must be spaces of the run (among ``cluster.spaces`` where given); a clusterer of
    dictionary spaces only (``dominant``) must be named dictionary spaces only, find one among the run's,
    and ask for no more clusters than each neuron keeps concepts there.
    """
    from polypure.evaluation.clustering import dictionary_only, make_clusterer

    dictionaries = {entry.id: entry for entry in config.dictionaries}
    spaces = list(config.cluster.spaces) if config.cluster.spaces is not None else sorted(_relevance_spaces(config))
    for i, method in enumerate(config.cluster.methods):
        key = f"cluster.methods[{i}] ({method.method_id})"
        try:
            estimator = make_clusterer(method.name, method.params, config.seed)
        except ConfigError as exc:
            message = str(exc).removeprefix("cluster.methods: ")
            raise ConfigError(f"{key}: {message}") from None
        for space in method.spaces or []:
            if space not in spaces:
                where = "cluster.spaces" if config.cluster.spaces is not None else "the run's spaces"
                raise ConfigError(f"{key}.spaces: {space!r} is not among {where} ({', '.join(spaces)})")
        if not dictionary_only(estimator):
            continue
        other = [space for space in method.spaces or [] if space not in dictionaries]
        if other:
            raise ConfigError(f"{key}.spaces: {other[0]!r} is no dictionary space; {method.name} clusters dictionary "
                              f"spaces only (dictionaries: {', '.join(dictionaries) or 'none'})")
        chosen = [s for s in (method.spaces or spaces) if s in dictionaries]
        if not chosen:
            raise ConfigError(f"{key}: {method.name} clusters dictionary spaces only, and the run has none to cluster "
                              f"(dictionaries: {', '.join(dictionaries) or 'none'})")
        wanted = getattr(estimator, "n_clusters", None)
        fewest = min(dictionaries[s].concepts_kept for s in chosen)
        if isinstance(wanted, int) and wanted > fewest:
            raise ConfigError(f"{key}: n_clusters ({wanted}) is more than the concepts kept per neuron "
                              f"(dictionaries[].store_top, n_concepts: {fewest})")


def check_dictionaries(config) -> None:
    """Every dictionary's kind must be registered and able to work (the built-in kinds need ``overcomplete``).

    Checked before the model and the data are built, so that a missing package is one line at once.
    """
    from polypure.dictionaries.kinds import DICTIONARY_KINDS

    for i, entry in enumerate(config.dictionaries):
        key = f"dictionaries[{i}] ({entry.id})"
        try:
            kind = DICTIONARY_KINDS.get(entry.kind)
        except ConfigError as exc:
            raise ConfigError(f"{key}.kind: {exc}") from None
        kind.check(entry, key)


def check_cluster_counts(methods, n_refs: int) -> None:
    """No clusterer may ask for more clusters than each neuron has references (k-means would fail on the data).

    Checked when the cluster stage starts, not before the first stage: a run that stops before clustering
    (a top-K with ``relevance.n_refs: 1``) must not be refused for the default k-means.

    Parameters
    ----------
    methods : list of (str, estimator)
        Method id and estimator; an estimator's ``n_clusters`` attribute, where it is an int, is checked.
    n_refs : int
        References per neuron.

    Raises
    ------
    ConfigError
        Naming the method id, its ``n_clusters`` and ``relevance.n_refs``.
    """
    for method_id, estimator in methods:
        wanted = getattr(estimator, "n_clusters", None)
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > n_refs:
            raise ConfigError(f"cluster.methods ({method_id}): n_clusters ({wanted}) is more than the references of "
                              f"each neuron (relevance.n_refs = {n_refs})")


def _attribution_layers(config) -> set[str]:
    rel = config.relevance
    layers = {layer for t in rel.target_list for layer in t.attribution_layers}
    return layers | {layer for p in rel.planted_list for layer in (p.attribution_layers or [])}


def _relevance_spaces(config) -> set[str]:
    """Every space a relevance target gives: each variant's attribution layers, ``activation``, the dictionaries."""
    from polypure.config.settings import space_name

    layers = _attribution_layers(config)
    return ({space_name(v.id, layer) for v in config.relevance.variant_list for layer in layers} | {"activation"}
            | {entry.id for entry in config.dictionaries})


def check_evaluators(config, dataset=None) -> None:
    """Evaluator names and settings must be valid, and an image evaluator needs a dataset that gives pixels.

    Parameters
    ----------
    config : Config
    dataset : PolypureDataset, optional
        A dataset passed from Python; one without a way to pixels cannot feed an image evaluator.
    """
    from polypure.data.datasets import no_pixels_message
    from polypure.evaluation.evaluators import EVALUATORS, evaluator_names, make_evaluator

    references = set(config.evaluate.references)
    for name in evaluator_names(config, relevance_spaces=_relevance_spaces(config)):
        settings = config.evaluate.settings(name)
        if name not in references and not settings and name not in EVALUATORS:
            raise ConfigError(f"cluster.spaces: {name!r} is neither an attribution layer, 'activation', nor an "
                              "evaluator")
        try:
            evaluator = make_evaluator(name, settings)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith("evaluate.") else f"evaluate: {message}") from None
        if evaluator.image_based and dataset is not None and not dataset.has_pixels:
            raise ConfigError(f"evaluate.{name}: " + no_pixels_message(f"evaluator {name!r}"))


def check_layers(config, model, probe) -> dict[str, tuple]:
    """Every named layer must exist, run once, and each attribution layer must run before its target.

    Parameters
    ----------
    config : Config
    model : ExplainedModel
    probe : callable
        ``probe(modules) -> (shapes, order)``: one forward pass recording the given modules.

    Returns
    -------
    dict of str to tuple
        Output shape (without batch) of every named layer.
    """
    keys = list(_layer_keys(config))
    modules = {}
    for key, layer, _ in keys:
        try:
            modules[layer] = model.submodule(layer)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    shapes, order = probe(modules)
    position = {name: i for i, name in enumerate(order)}
    seen: dict[tuple[str, str], str] = {}
    for key, layer, target in keys:
        if target is None:
            continue
        if layer == target or model.module_path(layer) == model.module_path(target):
            raise ConfigError(f"{key}: {layer!r} is the target layer itself; attribution layers lie below it")
        if (target, layer) in seen:
            raise ConfigError(f"{key}: {layer!r} is listed twice (also as {seen[(target, layer)]})")
        seen[(target, layer)] = key
        if position[layer] > position[target]:
            raise ConfigError(f"{key}: {layer!r} runs after the target layer {target!r}; attribution layers must lie "
                              "below the target")
    if config.topk.statistic == "cls":
        for i, layer in enumerate(config.topk.layers):
            if len(shapes[layer]) > 2:
                raise ConfigError(f"topk.layers[{i}]: statistic 'cls' takes the class token of a token layer "
                                  f"(B, T, D); {layer!r} outputs {shapes[layer]} per sample (channels first)")
    return shapes


def check_neurons(config, shapes: dict[str, tuple]) -> dict[str, int]:
    """Selected neuron ids must exist in their target layers, and planted pairs in their layers' channels.

    The rule of every selection and count is :mod:`polypure.config.selection`'s: never empty, never past
    the layer's channels (a range's stop is not clipped).

    Returns
    -------
    dict of str to int
        How many neurons each target the config names will have (planted ones by their store name).
    """
    from polypure.config.selection import check_count, select_neurons
    from polypure.store.schema import planted_target

    rel = config.relevance
    counts = {}
    for i, target in enumerate(rel.target_list):
        key = "relevance.neurons" if rel.targets is None else f"relevance.targets[{i}].neurons"
        counts[target.layer] = len(select_neurons(target.neurons, shapes[target.layer][0], key=key))
    for i, planted in enumerate(rel.planted_list):
        prefix = "relevance.planted" if not isinstance(rel.planted, list) else f"relevance.planted[{i}]"
        # each pair takes two channels no other pair of the layer takes
        check_count(planted.pairs, shapes[planted.layer][0] // 2, f"{prefix}.pairs",
                    f"disjoint pairs of the {shapes[planted.layer][0]} channels of {planted.layer!r}")
        counts[planted_target(planted.layer)] = planted.pairs * len(planted.modes)
    return counts


def check_report(config, counts: dict[str, int]) -> None:
    """Where the report stage writes must be a folder (or nothing yet), and ``report.neurons`` at least 1.

    Checked before the first stage, so that a run is not refused after its work, at the report.

    Parameters
    ----------
    config : Config
    counts : dict of str to int
        Neurons per target (:func:`check_neurons`).
    """
    from polypure.config.paths import require_output_folder

    report = config.report
    if not report.enabled:
        return
    require_output_folder(config.report_folder, "report.out" if report.out is not None else "report folder")
    # report.neurons (at least 1, as the schema says) is a cap on pages per target, not checked against the
    # targets: a config's value must survive runs narrowed to fewer neurons with --set


def check_samples(config, count: int) -> None:
    """Top-K must have at least k samples to choose from (``topk.k`` within 1..the samples)."""
    from polypure.config.selection import check_count

    check_count(config.topk.k, count, "topk.k", "samples of the data")


def available_label_sets(config, dataset) -> list[str]:
    """Label sets the evaluate stage can score against with this config and data."""
    from polypure.store.schema import CLASS, PLANTED

    # planted truth belongs to planted targets; a config without them simply has nothing to score with it
    names = [PLANTED]
    names += list(getattr(dataset, "factors", {}) or {})
    if class_labels_known(dataset):
        names.append(CLASS)
    return names


def class_labels_known(dataset) -> bool:
    """Whether the samples have class labels: from the dataset's labels, or those its first item carries."""
    import numpy as np

    labels = getattr(dataset, "labels", None)
    if labels is not None and (np.asarray(labels) >= 0).any():
        return True
    # labels that live in the items are collected by the top-K pass; the first item tells whether they exist
    return bool(getattr(dataset, "labels_from_items", False)) and dataset[0][1] >= 0


def check_ground_truth(config, dataset) -> None:
    """``evaluate.ground_truth`` may name only label sets the data has."""
    wanted = config.evaluate.ground_truth
    if wanted == "auto":
        return
    available = available_label_sets(config, dataset)
    for name in wanted:
        if name not in available:
            raise ConfigError(f"evaluate.ground_truth: {name!r} is not known for this data (known: "
                              f"{', '.join(available) or 'none'})")


def check_compare(config, dataset) -> None:
    """``compare.metrics`` may name only metric labels a run can give (``ARI shape``, ``corr clip``, ``gain clip``).

    A label is a kind of the summary and the reference space (``evaluate.references``) or label set (of the
    data) it is scored against. The spaces of ``compare`` are checked by the evaluate stage, against the
    store's.
    """
    from polypure.evaluation.summary import GROUND_TRUTH, KINDS, SELECTIVITY, SELECTIVITY_OF

    references = list(config.evaluate.references)
    label_sets = available_label_sets(config, dataset)
    for metric in config.compare.metrics or []:
        kind, _, of = metric.partition(" ")
        known = label_sets if kind in GROUND_TRUTH else list(SELECTIVITY_OF.values()) if kind == SELECTIVITY \
            else references
        if kind not in KINDS or of not in known:
            named = "label sets" if kind in GROUND_TRUTH else "its kinds" if kind == SELECTIVITY \
                else "evaluate.references"
            what = f"kinds: {', '.join(KINDS)}" if kind not in KINDS else f"{named}: {', '.join(known) or 'none'}"
            raise ConfigError(f"compare.metrics: {metric!r} is not a metric this run gives (<kind> <reference or "
                              f"label set>; {what})")
    methods = [m.method_id for m in config.cluster.methods]
    if config.compare.baseline_method is not None and config.compare.baseline_method not in methods:
        raise ConfigError(f"compare.baseline_method: {config.compare.baseline_method!r} is not a method id of "
                          f"cluster.methods ({', '.join(methods)})")


def check_selectivity(config) -> None:
    """``selectivity.spaces`` may name only spaces with something to ablate: attribution layers and dictionaries.

    The attribution layers of the config's targets in every rule variant, and the ids of its dictionaries.
    """
    from polypure.config.settings import space_name

    wanted = config.selectivity.spaces
    if wanted is None:
        return
    rel = config.relevance
    layers = [layer for target in rel.target_list for layer in target.attribution_layers]
    layers += [layer for planted in rel.planted_list for layer in planted.attribution_layers or []]
    known = list(dict.fromkeys(space_name(variant.id, layer) for variant in rel.variant_list for layer in layers))
    known += [entry.id for entry in config.dictionaries]
    for i, space in enumerate(wanted):
        if space not in known:
            raise ConfigError(f"selectivity.spaces[{i}]: {space!r} is not an attribution-layer space of any target "
                              f"nor a dictionary (spaces with channels or concepts to ablate: "
                              f"{', '.join(known) or 'none'})")


def check_experiment(exp, stages: list[str] | None = None) -> None:
    """Run every check on an :class:`~polypure.experiment.Experiment` (builds its model and dataset).

    Besides the config's names and numbers: that the store's path and folder can be written (before the
    model and data are built, and before any work), and, where the report stage is among ``stages`` (None:
    every stage), the report's folder and page count (:func:`check_report`).

    Raises
    ------
    ConfigError
        At the first problem, with one line naming the key.
    StoreError
        For a store path whose folder cannot be written.
    """
    from polypure.store.write_session import check_writable

    config = exp.config
    check_rules(config)
    check_dictionaries(config)
    check_clusterers(config)
    check_writable(config.store_path)
    dataset = exp.dataset
    check_samples(config, len(dataset))
    shapes = check_layers(config, exp.model, exp.probe_layers)
    counts = check_neurons(config, shapes)
    if stages is None or "report" in stages:
        check_report(config, counts)
    check_ground_truth(config, dataset)
    check_compare(config, dataset)
    check_selectivity(config)
