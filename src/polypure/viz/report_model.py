"""What the report shows of each relevance target, read once from the store, and which neurons get a page.

:func:`read_target` gathers a target's neurons, references, spaces, correlations, ARI, mixture counts,
purity scores, split gains and causal selectivity into a :class:`Target`; :func:`choose_pages` picks the most interesting
neurons for pages. The rest of the report (figures, tables, pages) is drawn from these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from polypure.evaluation import summary
from polypure.store.hdf5_store import Store
from polypure.viz import figure_data
from polypure.viz.figures import safe_name


@dataclass
class Target:
    """What the report shows of one relevance target, read once from the store."""

    name: str
    slug: str
    neurons: np.ndarray
    refs: np.ndarray
    layers: list[str]
    complete: np.ndarray
    methods: list[str]
    corr: dict[str, dict[str, np.ndarray]]
    ari: dict[str, dict[str, np.ndarray]]
    mixture: dict[str, np.ndarray]
    boxes: np.ndarray | None
    purity: dict[str, np.ndarray] = field(default_factory=dict)
    gain: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    selectivity: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    pages: list[int] = field(default_factory=list)

    @property
    def spaces(self) -> list[str]:
        """The target's attribution layers, then ``activation``."""
        return [*self.layers, "activation"]

    @property
    def method(self) -> str | None:
        """The first cluster method, the one the pages' UMAPs and the split gains use."""
        return self.methods[0] if self.methods else None

    @property
    def view(self) -> str:
        """``crop`` where the report shows the stored crops of the references, else ``full``."""
        return "crop" if self.boxes is not None else "full"

    def gaps(self, reference: str) -> dict[str, np.ndarray]:
        """corr(earlier layer) - corr(last attribution layer), per earlier layer."""
        corr = self.corr.get(reference, {})
        if len(self.layers) < 2 or not all(layer in corr for layer in self.layers):
            return {}
        last = corr[self.layers[-1]]
        return {layer: corr[layer] - last for layer in self.layers[:-1]}

    def page(self, row: int) -> str:
        """The path of a neuron's page, relative to the report folder."""
        return f"neurons/{self.slug}/{int(self.neurons[row])}.html"


def label_order(records: list[dict]) -> list[str]:
    """Label sets in the order the summary table shows them (``ARI planted`` -> ``planted``)."""
    return list(dict.fromkeys(r["metric"].split(" ", 1)[1] for r in records if r["metric"].startswith("ARI ")))


def read_target(store: Store, name: str, view: str, labels: list[str]) -> Target:
    """What the report shows of target ``name``: label sets in the order ``labels`` (then any others)."""
    layers = store.relevance_spaces(name)
    methods = store.cluster_methods(name)
    method = methods[0] if methods else None
    ari: dict[str, dict[str, np.ndarray]] = {}
    if method is not None:
        stored = store.metric_keys(name, "ari")
        for label in [n for n in labels if n in stored] + sorted(n for n in stored if n not in labels):
            found = {space: store.metric(name, "ari", label, space, method)
                     for space in store.metric_keys(name, "ari", label)}
            found = {space: values for space, values in found.items() if values is not None}
            order = [s for s in [*layers, "activation"] if s in found] + sorted(s for s in found if s not in layers
                                                                              and s != "activation")
            ari[label] = {space: found[space] for space in order}
    stored = store.metric_keys(name, "mixture")
    mixture = {label: store.metric(name, "mixture", label)
               for label in [n for n in labels if n in stored] + sorted(n for n in stored if n not in labels)}
    # purity scores per reference (one value per neuron); the split gain and the causal selectivity (circuit and
    # null) of the first method's clusters
    purity: dict[str, np.ndarray] = {}
    gain: dict[str, dict[str, np.ndarray]] = {}
    selectivity: dict[str, dict[str, np.ndarray]] = {}
    for kind, of, space, cluster_method, values, _ in summary.metric_entries(store, name):
        if kind in summary.PURITY.values():
            purity[f"{kind} {of}"] = values
        elif kind == "gain" and cluster_method == method:
            gain.setdefault(of, {})[space] = values
        elif kind == summary.SELECTIVITY and cluster_method == method:
            selectivity.setdefault(of, {})[space] = values
    return Target(name=name, slug=safe_name(name), neurons=store.neurons(name),
                  refs=store.reference_indices(name), layers=layers, complete=store.complete(name),
                  methods=methods, corr={ref: figure_data.correlations(store, name, ref)
                                         for ref in figure_data.references(store, name)},
                  ari=ari, mixture=mixture, boxes=figure_data.crop_boxes(store, name, view), purity=purity,
                  gain=gain, selectivity=selectivity)


def _ranked(values: np.ndarray, descending: bool = True) -> np.ndarray:
    """Rows by value, missing values last."""
    values = np.asarray(values, np.float64)
    key = np.where(np.isfinite(values), -values if descending else values, np.inf)
    return np.argsort(key, kind="stable")


def choose_pages(target: Target, limit: int) -> list[int]:
    """The rows that get a page (at most ``limit``, the most interesting ones), in row order.

    With reference metrics: the largest gaps by which an earlier layer beats the last attribution layer,
    alternating with the highest correlations at the last layer. Otherwise the most mixed neurons, the
    lowest and the highest ARI at the last attribution layer (planted truth where the target has it).
    """
    rows = np.flatnonzero(target.complete)
    if len(rows) <= limit:
        return rows.tolist()
    rankings = []
    reference = next(iter(target.corr), None)
    if reference is not None:
        gaps = target.gaps(reference)
        if gaps:
            # fmax ignores a layer's missing value without warning about neurons that miss all of them
            rankings.append(_ranked(np.fmax.reduce(np.stack(list(gaps.values())), axis=0)))
        best = target.corr[reference].get(target.layers[-1] if target.layers else "activation")
        if best is not None:
            rankings.append(_ranked(best))
    else:
        if target.mixture:
            rankings.append(_ranked(np.max(np.stack(list(target.mixture.values())), axis=0)))
        label = "planted" if "planted" in target.ari else next(iter(target.ari), None)
        if label is not None and target.ari[label]:
            space = target.layers[-1] if target.layers and target.layers[-1] in target.ari[label] \
                else next(iter(target.ari[label]))
            rankings += [_ranked(target.ari[label][space], descending=False), _ranked(target.ari[label][space])]
    allowed = set(rows.tolist())
    chosen: list[int] = []
    # one from each ranking in turn, so that every kind of interest gets pages
    for candidates in zip(*rankings):
        for row in candidates:
            if len(chosen) < limit and int(row) in allowed and int(row) not in chosen:
                chosen.append(int(row))
    chosen += [r for r in rows.tolist() if r not in chosen][:limit - len(chosen)]
    return sorted(chosen)
