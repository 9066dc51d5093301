"""The HTML report of a store, a folder that opens from disk in any browser.

It holds the summary table, the global figures, the stored comparisons between spaces (a forest plot and
a paired scatter per metric, and their table), a sortable table of every neuron, and a page per
interesting neuron with its figures and cluster image grids.

Example
-------
>>> from polypure.viz.report import write_report        # doctest: +SKIP
>>> write_report("storage/demo.h5")                 # doctest: +SKIP
PosixPath('storage/demo_report/index.html')

Plain HTML rendered from the Jinja2 templates in ``polypure/templates`` (every value escaped), with the
styles and the table-sorting script of that folder inlined into each page, images as files next to the
pages, nothing fetched from elsewhere, so it opens from ``file://``. It reads only the store (and, for thumbnails, the data its
config describes), so it can be written again at any time. It never runs code a store's config names: data
made by a ``python:`` factory gets no thumbnails unless the dataset is passed.

Layout of the folder::

    index.html                      summary table, global figures, comparisons, neuron tables (sortable)
    figures/                        scatter, bars, ground-truth, forest and paired figures (PNG and SVG)
    thumbs/                         reference thumbnails, one file per image (or per crop)
    neurons/<target>/<id>.html      a page per chosen neuron
    neurons/<target>/fig/           its distance-matrix and UMAP figures (PNG)
    manifest.json                   what was drawn from what (see below)

Writing again is incremental. Every drawn file (figure or thumbnail) is keyed in ``manifest.json`` by a
hash of everything it is drawn from: the store data its figure function reads (:func:`polypure.viz.figure_data.inputs`),
the settings, the data's identity (its config and sample ids) and the drawing code itself. A file whose
key is unchanged is kept, so a report of an unchanged store draws nothing, and a change redraws only the
figures it affects; pages are rewritten only where their text changes. ``write_report`` owns
``index.html``, ``manifest.json`` and the folders ``figures/``, ``thumbs/`` and ``neurons/``: whatever it
did not write this time is removed from them (the pages of neurons and targets no longer in the store, or
no longer chosen), and anything else in the report folder is left alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from polypure import __version__
from polypure.errors import PolypureError
from polypure.evaluation import comparisons, summary
from polypure.store.hdf5_store import Store
from polypure.viz import figure_data, figures, imaging

log = logging.getLogger("polypure")

#: Neuron pages per target when ``max_neurons`` is not given (each page costs about a second).
NEURON_PAGES = 8
#: Side in pixels of the thumbnail files shown in the cluster grids.
THUMB_SIZE = 80
#: The report's record of what it drew from what.
MANIFEST = "manifest.json"
#: Folders of the report that belong to ``write_report`` alone (files it did not write there are removed).
OWNED = ("figures", "thumbs", "neurons")
_MANIFEST_FORMAT = 1


@dataclass
class _Target:
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
    pages: list[int] = field(default_factory=list)

    @property
    def spaces(self) -> list[str]:
        return [*self.layers, "activation"]

    @property
    def method(self) -> str | None:
        return self.methods[0] if self.methods else None

    def gaps(self, reference: str) -> dict[str, np.ndarray]:
        """corr(earlier layer) - corr(last attribution layer), per earlier layer."""
        corr = self.corr.get(reference, {})
        if len(self.layers) < 2 or not all(layer in corr for layer in self.layers):
            return {}
        last = corr[self.layers[-1]]
        return {layer: corr[layer] - last for layer in self.layers[:-1]}

    def page(self, row: int) -> str:
        return f"neurons/{self.slug}/{int(self.neurons[row])}.html"


def _label_order(records: list[dict]) -> list[str]:
    """Label sets in the order the summary table shows them (``ARI planted`` -> ``planted``)."""
    return list(dict.fromkeys(r["metric"].split(" ", 1)[1] for r in records if r["metric"].startswith("ARI ")))


def _read_target(store: Store, name: str, view: str, labels: list[str]) -> _Target:
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
    # purity scores per reference (one value per neuron), and the split gain of the first method's clusters
    purity: dict[str, np.ndarray] = {}
    gain: dict[str, dict[str, np.ndarray]] = {}
    for kind, of, space, cluster_method, values, _ in summary.metric_entries(store, name):
        if kind in summary.PURITY.values():
            purity[f"{kind} {of}"] = values
        elif kind == "gain" and cluster_method == method:
            gain.setdefault(of, {})[space] = values
    return _Target(name=name, slug=figures.safe_name(name), neurons=store.neurons(name),
                   refs=store.reference_indices(name), layers=layers, complete=store.complete(name),
                   methods=methods, corr={ref: figure_data.correlations(store, name, ref)
                                          for ref in figure_data.references(store, name)},
                   ari=ari, mixture=mixture, boxes=figure_data.crop_boxes(store, name, view), purity=purity, gain=gain)


def _ranked(values: np.ndarray, descending: bool = True) -> np.ndarray:
    """Rows by value, missing values last."""
    values = np.asarray(values, np.float64)
    key = np.where(np.isfinite(values), -values if descending else values, np.inf)
    return np.argsort(key, kind="stable")


def _choose_pages(target: _Target, limit: int) -> list[int]:
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


def _rebuild_dataset(store: Store):
    """The store's data rebuilt from its config, or None and the reason it cannot be."""
    from polypure.config.settings import config_from_dict
    from polypure.data.datasets import build_dataset

    try:
        cfg = config_from_dict(store.config())
    except Exception as exc:  # any unreadable config only costs the thumbnails
        return None, f"the store's config cannot be read ({exc})"
    if cfg.data is None:
        return None, "the store's config has no data section"
    if cfg.data.kind == "memory":
        return None, ("the store was made from a dataset passed from Python (data.kind: memory); pass it as "
                      "write_report(..., dataset=...) to see images")
    if cfg.data.kind.startswith("python:"):
        # a store is data: code it names is never run by reading it (a store from elsewhere could name any code)
        return None, (f"the store's data is made by code ({cfg.data.kind}), which a report does not run; pass the "
                      "dataset as write_report(..., dataset=...) to see images")
    try:
        dataset = build_dataset(cfg.data)
    except Exception as exc:  # a missing folder or file only costs the thumbnails
        return None, f"the data of the store's config cannot be loaded ({exc})"
    return dataset, None


def _check_dataset(store: Store, dataset):
    """The dataset if it holds the store's samples and can show them, else None and why."""
    if dataset is not None and not getattr(dataset, "has_pixels", True):
        from polypure.data.datasets import no_pixels_message
        return None, no_pixels_message("a thumbnail")
    if dataset is None or not store.has_samples():
        return dataset, None
    stored = store.sample_ids()
    ids = list(getattr(dataset, "ids", []))
    if len(dataset) != len(stored) or (ids and ids != stored):
        return None, (f"the dataset ({len(dataset)} samples) does not hold the store's {len(stored)} samples "
                      "in the same order")
    return dataset, None


def _digest(*parts) -> str:
    """A hash of numbers, strings, arrays and (nested) lists and dicts of them; order counts."""
    h = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            if array.dtype.kind in "OSU":
                feed([str(v) for v in array.ravel().tolist()] + [array.shape])
                return
            h.update(f"a{array.dtype.str}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        elif isinstance(value, dict):
            h.update(b"{")
            for key, item in value.items():
                feed(key)
                feed(item)
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for item in value:
                feed(item)
            h.update(b"]")
        else:
            h.update(f"{type(value).__name__}:{value!r};".encode())

    feed(parts)
    return h.hexdigest()[:32]


def _code_key() -> str:
    """The drawing code and version: a new polypure, or edited figure or image code, redraws every figure."""
    return _digest(__version__, Path(figures.__file__).read_bytes(), Path(figure_data.__file__).read_bytes(),
                   Path(imaging.__file__).read_bytes(), THUMB_SIZE)


class _Outputs:
    """The files one ``write_report`` produces, and which of them a previous one left up to date.

    Parameters
    ----------
    out : Path
        The report folder; its ``manifest.json``, when there is one of this format, tells what the
        previous write drew from what.
    """

    def __init__(self, out: Path):
        self.out = out
        previous = {}
        try:
            previous = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        if not isinstance(previous, dict) or previous.get("format") != _MANIFEST_FORMAT:
            previous = {}
        self.previous: dict[str, dict] = previous.get("drawings", {})
        self.previous_data: dict = previous.get("data", {})
        self.drawings: dict[str, dict] = {}
        self.written: set[str] = set()
        self.drawn = self.kept = self.pages = 0

    def rel(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.out)).as_posix()

    def cached(self, files: list[Path], key: str) -> dict | None:
        """The previous entry of a drawing of ``files`` if it was drawn from the same inputs (and recorded)."""
        name = self.rel(files[0])
        entry = self.previous.get(name)
        if entry is None or entry.get("key") != key:
            return None
        if entry.get("error") is None and not all(f.is_file() for f in files):
            return None
        self.drawings[name] = entry
        self.kept += 1
        return entry

    def record(self, files: list[Path], key: str, error: str | None = None) -> None:
        """A drawing just made (or failed: its error is kept, so the same inputs do not fail again)."""
        self.drawings[self.rel(files[0])] = {"key": key, "files": [] if error else [self.rel(f) for f in files],
                                             "error": error}
        self.drawn += 1

    def write_text(self, path: Path, text: str) -> None:
        """Write a page, unless it already holds exactly this text."""
        self.written.add(self.rel(path))
        self.pages += _write_if_changed(path, text)

    def finish(self, data: dict) -> int:
        """Remove what this write did not produce from the owned folders, save the manifest; files removed."""
        keep = set(self.written) | {f for entry in self.drawings.values() for f in entry.get("files", [])}
        removed = 0
        for folder in OWNED:
            root = self.out / folder
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if path.is_dir():
                    if not any(path.iterdir()):
                        path.rmdir()
                elif self.rel(path) not in keep:
                    path.unlink()
                    removed += 1
            if not any(root.iterdir()):
                root.rmdir()
        manifest = {"format": _MANIFEST_FORMAT, "polypure": __version__, "data": data,
                    "drawings": dict(sorted(self.drawings.items()))}
        _write_if_changed(self.out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return removed


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless the file holds exactly that already; whether it wrote."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


class _Images:
    """The store's samples for thumbnails, looked for only when an image has to be drawn.

    Building a dataset from the store's config can take seconds (the demo renders 3000 images), and a
    report whose images are all up to date needs none: a previous write that found the same data
    (config and sample ids) is trusted instead.
    """

    def __init__(self, store: Store, dataset, previous: dict):
        self.store = store
        self.given = dataset
        section = {}
        try:
            section = store.config().get("data") or {}
        except (yaml.YAMLError, AttributeError):
            pass
        self.key = _digest(section, store.sample_ids() if store.has_samples() else [])
        self.resolved = False
        self.dataset = None
        self.why: str | None = None
        self.assumed = previous.get("key") == self.key and previous.get("available") is True

    def get(self):
        """The dataset, or None (then :attr:`why` says why)."""
        if not self.resolved:
            self.resolved = True
            given = self.given() if callable(self.given) else self.given
            if given is None:
                self.dataset, self.why = _rebuild_dataset(self.store)
            else:
                self.dataset, self.why = _check_dataset(self.store, given)
        return self.dataset

    @property
    def available(self) -> bool:
        if not self.resolved and self.assumed:
            return True
        return self.get() is not None

    def state(self) -> dict:
        """What the manifest keeps of the data: its key and whether it was found."""
        return {"key": self.key, "available": self.dataset is not None if self.resolved else self.assumed}


class _Thumbs:
    """Writes each reference thumbnail (when not up to date) and knows its file; describes samples."""

    def __init__(self, out: Path, images: _Images, store: Store, outputs: _Outputs, code: str):
        self.out = out
        self.images = images
        self.outputs = outputs
        self.code = code
        self.done: dict[str, str | None] = {}
        self.ids = store.sample_ids() if store.has_samples() else []
        self.labels = store.labels() if store.has_samples() else np.zeros(0, np.int64)
        self.classes = store.class_names() if store.has_samples() else None
        self.factors = store.factors()

    def file(self, target: _Target, row: int, position: int) -> str | None:
        """Path (relative to the report) of a reference's thumbnail, drawn unless up to date."""
        sample = int(target.refs[row, position])
        box = target.boxes[row, position] if target.boxes is not None else None
        cropped = box is not None and min(int(v) for v in box) >= 0
        name = f"thumbs/{target.slug}/{row}_{position}.png" if cropped else f"thumbs/{sample}.png"
        if name not in self.done:
            self.done[name] = self._draw(name, sample, box if cropped else None)
        return self.done[name]

    def _draw(self, name: str, sample: int, box) -> str | None:
        path = self.out / name
        key = _digest("thumbnail", self.code, self.images.key, sample, box)
        entry = self.outputs.cached([path], key)
        if entry is not None:
            return None if entry.get("error") else name
        dataset = self.images.get()
        if dataset is None:
            return None
        from PIL import Image

        try:
            pixels = imaging.thumbnail(dataset, sample, box, size=THUMB_SIZE)
        except (PolypureError, OSError) as exc:
            # an unreadable image costs its thumbnail, not the report
            log.warning("report: no thumbnail of sample %d: %s", sample, exc)
            self.outputs.record([path], key, f"{type(exc).__name__}: {exc}")
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        self.outputs.record([path], key)
        return name

    def describe(self, sample: int) -> str:
        """``sample 12 (id) · class · factor=value`` for a tooltip."""
        parts = [f"sample {sample}"]
        if sample < len(self.ids):
            parts[0] += f" ({self.ids[sample]})"
        if sample < len(self.labels) and self.labels[sample] >= 0:
            label = int(self.labels[sample])
            parts.append(f"class {self.classes[label] if self.classes and label < len(self.classes) else label}")
        for name, (codes, values) in self.factors.items():
            code = int(codes[sample])
            parts.append(f"{name}={values[code] if code < len(values) else code}")
        return " · ".join(parts)


# ---------------------------------------------------------------------------------------------------
# HTML: the templates of polypure/templates render what the functions below gather


@functools.lru_cache(maxsize=1)
def _templates():
    """The report's Jinja2 templates, with every value escaped unless it is marked safe."""
    from jinja2 import Environment, PackageLoader, StrictUndefined
    from markupsafe import Markup

    env = Environment(loader=PackageLoader("polypure.viz", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(number=_number, data_value=_data_value, tint=_tint)
    # the styles and the sorting script are the package's own files, inlined so that a page stands alone
    env.globals.update(css=Markup(env.loader.get_source(env, "report.css")[0]),
                       sort_script=Markup(env.loader.get_source(env, "report.js")[0]))
    return env


def _render(template: str, **context) -> str:
    return _templates().get_template(template).render(version=__version__, **context)


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


def _number(value, digits: int = 3) -> str:
    """A table cell's text: the value to ``digits`` decimals, empty where missing."""
    return f"{value:.{digits}f}" if _finite(value) else ""


def _data_value(value) -> str:
    """The value a column sorts by (``data-v``), empty where missing (sorted last)."""
    return str(float(value)) if _finite(value) else ""


def _tint(value, kind: str = "value") -> str:
    """A background tint so that large values stand out in long tables (gaps: green above 0, red below)."""
    if not _finite(value) or kind == "none":
        return ""
    if kind == "gap":
        alpha = min(abs(float(value)) * 2.0, 1.0) * 0.55
        rgb = "46,160,67" if value > 0 else "207,34,46"
    else:
        alpha = min(max(float(value), 0.0), 1.0) * 0.5
        rgb = "27,108,168"
    return f"rgba({rgb},{alpha:.2f})"


def _summary_groups(records: list[dict], methods: list[str]) -> list[dict]:
    """The tables of :func:`polypure.evaluation.summary.pivot`, gathered per group and cluster method.

    They stand side by side in the index, with the reasons neurons were left out.
    """
    tables = summary.pivot(records, methods)
    return [{"title": title, "tables": [t for t in tables if t.title == title],
             "notes": [note for t in tables if t.title == title for note in t.notes()]}
            for title in dict.fromkeys(t.title for t in tables)]


def _columns(target: _Target) -> list[dict]:
    """The value columns of a target's neuron table: header, kind (``value`` or ``gap``) and per-row values."""
    cols = []
    for reference, corr in target.corr.items():
        cols += [{"header": f"corr {reference}: {space}", "kind": "value", "values": values}
                 for space, values in corr.items()]
        last = target.layers[-1] if target.layers else None
        cols += [{"header": f"{layer} − {last} ({reference})", "kind": "gap", "values": gap}
                 for layer, gap in target.gaps(reference).items()]
    for reference, spaces in target.gain.items():
        cols += [{"header": f"gain {reference}: {space}", "kind": "gap", "values": values}
                 for space, values in spaces.items()]
    cols += [{"header": label, "kind": "value", "values": values} for label, values in target.purity.items()]
    for label, spaces in target.ari.items():
        cols += [{"header": f"ARI {label}: {space}", "kind": "value", "values": values}
                 for space, values in spaces.items()]
    return cols


def _neuron_rows(target: _Target) -> list[dict]:
    """A row per neuron of a target: its id, its page (where it has one), mixture counts and flags."""
    pages = set(target.pages)
    rows = []
    for row, neuron in enumerate(target.neurons):
        counts = [int(values[row]) for values in target.mixture.values()]
        rows.append({"index": row, "neuron": int(neuron), "page": target.page(row) if row in pages else None,
                     "mixture": counts,
                     "flags": [label for label, count in zip(target.mixture, counts) if count >= 2]})
    return rows


def _grids(store: Store, target: _Target, row: int, thumbs: _Thumbs) -> list[dict]:
    """The first references of each cluster, per space and method: thumbnails, or sample ids without them."""
    refs = target.refs[row]

    def block(title: str, colour: str, positions) -> dict:
        images = [{"src": thumbs.file(target, row, int(p)), "tip": thumbs.describe(int(refs[p]))} for p in positions]
        return {"title": title, "colour": colour, "images": [i for i in images if i["src"] is not None],
                "ids": [int(refs[p]) for p in positions]}

    sections = [{"title": "Most activating references",
                 "blocks": [block(f"top {figures.TOP_PER_CLUSTER} of {len(refs)}", "#1d2330",
                                  range(min(figures.TOP_PER_CLUSTER, len(refs))))]}]
    for method in target.methods:
        clustered = dict.fromkeys(space for space, _ in store.clusterings(target.name))
        for space in [*target.spaces, *(s for s in clustered if s not in target.spaces)]:
            labels = store.cluster_labels(target.name, space, method, row)
            if labels is None:
                continue
            blocks = []
            for cluster, positions in figures.top_per_cluster(labels).items():
                count = int((labels == cluster).sum())
                name = "noise" if cluster < 0 else f"cluster {cluster}"
                blocks.append(block(f"{name}: {count} refs", figures.cluster_colour(cluster), positions))
            sections.append({"title": f"{space} · {method}", "blocks": blocks})
    return sections


def _neuron_metrics(target: _Target, row: int) -> dict:
    """A neuron's numbers: a row per space, a column per reference correlation and ARI."""
    columns = [(f"corr {ref}", values) for ref, values in target.corr.items()]
    columns += [(f"ARI {label}", values) for label, values in target.ari.items()]
    spaces = list(dict.fromkeys(s for _, values in columns for s in values))
    return {"columns": [name for name, _ in columns],
            "rows": [(space, [values[space][row] if space in values else None for _, values in columns])
                     for space in spaces]}


def _neuron_parts(store: Store, target: _Target, row: int, out: Path, thumbs: _Thumbs, draw: _Drawer) -> dict:
    """A neuron page's figures and cluster grids (drawn or found up to date), for :func:`_neuron_page`."""
    neuron = int(target.neurons[row])
    page_dir = out / "neurons" / target.slug
    fig_dir = page_dir / "fig"
    figs = []
    for reference in target.corr:
        files = _files(fig_dir, f"{neuron}_distances_{figures.safe_name(reference)}", ("png",))
        figs.append(draw(page_dir, f"distance matrices, reference {reference} (seed Figure 2)", files,
                         draw.key(figures.distance_matrices, target.name, row, reference, settings=files[0].name),
                         lambda reference=reference, files=files: figures.distance_matrices(
                             store, target.name, row, reference, fig_dir, formats=("png",), stem=files[0].stem)))
    method = target.method or "kmeans"
    view = _view(target)
    files = _files(fig_dir, f"{neuron}_umap", ("png",))
    # the images drawn depend on the data, which the store holds only by its sample ids
    key = draw.key(figures.neuron_umap, target.name, row, method=method, view=view,
                   settings=(files[0].name, draw.images.key, draw.images.available))
    figs.append(draw(page_dir, "UMAP of the references per space, coloured by cluster, and the top references of "
                               "each cluster (seed Figure 4)", files, key,
                     lambda: figures.neuron_umap(store, draw.images.get(), target.name, row, fig_dir, method=method,
                                                 view=view, formats=("png",), stem=files[0].stem)))
    return {"figures": figs, "grids": _grids(store, target, row, thumbs)}


def _neuron_page(target: _Target, row: int, parts: dict, notes: list[str]) -> str:
    neuron = int(target.neurons[row])
    position = target.pages.index(row)
    return _render("neuron.html", title=f"{target.name} neuron {neuron}", root="../../", sortable=False,
                   target=target, neuron=neuron, notes=notes, references=len(target.refs[row]),
                   previous=int(target.neurons[target.pages[position - 1]]) if position > 0 else None,
                   next=int(target.neurons[target.pages[position + 1]]) if position + 1 < len(target.pages) else None,
                   flags=[f"{label} ({int(v[row])} values)" for label, v in target.mixture.items() if v[row] >= 2],
                   metrics=_neuron_metrics(target, row), figures=parts["figures"], grids=parts["grids"])


def _comparison_rows(rows: list[dict]) -> list[dict]:
    """The stored comparisons as the index's table shows them."""
    def spaces(r: dict) -> str:
        # a leaderboard compares across cluster methods: name the baseline's where it is another
        other = r.get("method_a") and r["method_a"] != r["method"]
        return f"{r['space_b']} vs {r['space_a']}" + (f" ({r['method_a']})" if other else "")

    return [{**r, "spaces": spaces(r), "p_text": comparisons.format_p(r["p_value"]),
             "p_holm_text": comparisons.format_p(r["p_holm"])} for r in rows]


def _index_html(store: Store, store_path: Path, targets: list[_Target], records: list[dict], truth: dict | None,
                target_figs: dict[str, list[dict]], notes: list[str], compared: dict) -> str:
    attrs = store.attributes()
    try:
        config = store.config()
    except yaml.YAMLError:
        config = {}
    about = {"name": store_path.name, "path": store_path.resolve(), "created": attrs.get("created", "?"),
             "version": attrs.get("polypure_version", "?"), "model": (config.get("model") or {}).get("name", "?"),
             "data": (config.get("data") or {}).get("kind", "?"),
             "samples": len(store.sample_ids()) if store.has_samples() else 0}
    methods = list(dict.fromkeys(m for t in targets for m in t.methods))
    shown = [{"name": t.name, "slug": t.slug, "neurons": t.neurons, "pages": t.pages, "method": t.method,
              "ari": bool(t.ari), "mixture": list(t.mixture), "has_gaps": any(t.gaps(r) for r in t.corr),
              "purity": bool(t.purity), "gain": bool(t.gain),
              "columns": _columns(t), "rows": _neuron_rows(t)} for t in targets]
    return _render("index.html", title=f"polypure report: {store_path.name}", root="", sortable=True, store=about,
                   notes=notes, targets=shown, summary=_summary_groups(records, methods), truth=truth,
                   target_figures={name: figs for name, figs in target_figs.items() if figs}, compared=compared)


def _view(target: _Target) -> str:
    return "crop" if target.boxes is not None else "full"


def _files(out_dir: Path, stem: str, formats) -> list[Path]:
    return [out_dir / f"{stem}.{fmt}" for fmt in formats]


class _Drawer:
    """Draws a figure unless the previous report drew it from the same inputs; gives its HTML either way."""

    def __init__(self, store: Store, outputs: _Outputs, images: _Images, code: str):
        self.store = store
        self.outputs = outputs
        self.images = images
        self.code = code

    def key(self, figure, *args, settings=(), **kwargs) -> str:
        """A figure's key: its drawing code, the data it reads and its settings.

        The data is what :func:`polypure.viz.figure_data.inputs` says the figure reads for these arguments;
        ``settings`` are whatever else it depends on.
        """
        return _digest(self.code, figure.__name__, figure_data.inputs(figure, self.store, *args, **kwargs), kwargs,
                       settings)

    def __call__(self, page_dir: Path, caption: str, files: list[Path], key: str,
                 make: Callable[[], object]) -> dict:
        """The figure for a page in ``page_dir`` (for the template's ``figure``), or the reason it failed.

        The rest of the report still gets written when one figure fails.

        ``make`` draws ``files``; it is called only when they are not up to date for ``key``.
        """
        entry = self.outputs.cached(files, key)
        error = entry.get("error") if entry is not None else None
        if entry is None:
            try:
                make()
            except Exception as exc:  # one figure that fails must not cost the whole report
                log.warning("report: %s: %s", caption, exc)
                error = f"{type(exc).__name__}: {exc}"
            self.outputs.record(files, key, error)
        if error is not None:
            return {"caption": caption, "error": error}

        def link(path: Path) -> str:
            return Path(os.path.relpath(path, page_dir)).as_posix()

        # the PNG is shown, every written format linked; addresses relative to the page's folder
        png = next(p for p in files if p.suffix == ".png")
        return {"caption": caption, "error": None, "src": link(png),
                "links": [{"href": link(p), "label": p.suffix[1:].upper()} for p in files]}


def write_report(store_path, out=None, dataset=None, max_neurons=None, view="auto", progress=True) -> Path:
    """Write the HTML report of a store, drawing only what is not up to date.

    Parameters
    ----------
    store_path : str or Path
        The polypure HDF5 store.
    out : str or Path, optional
        The report folder (default ``<store without .h5>_report`` next to the store).
    dataset : polypure.data.datasets.PolypureDataset or callable, optional
        The store's samples, for thumbnails, or a function without arguments that returns them (called
        only if an image has to be drawn). Default: rebuilt from the store's config when needed; where that
        is not possible (``data.kind: memory``, a missing folder) the report has no images and says why.
    max_neurons : int, optional
        Neuron pages per target (default :data:`NEURON_PAGES`), chosen by interest; every neuron is listed
        in the index either way.
    view : {"auto", "full", "crop"}
        Thumbnails of the whole images or of the crops in ``/crops/<target>`` (``auto``: crops where stored).
    progress : bool
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        The report's ``index.html``.
    """
    store_path = Path(store_path)
    out = Path(out) if out is not None else store_path.with_name(f"{store_path.stem}_report")
    limit = NEURON_PAGES if max_neurons is None else int(max_neurons)
    if view not in ("auto", "full", "crop"):
        raise ValueError(f"view must be auto, full or crop, not {view!r}")
    out.mkdir(parents=True, exist_ok=True)
    outputs = _Outputs(out)
    code = _code_key()
    with Store(store_path, "r") as store:
        images = _Images(store, dataset, outputs.previous_data)
        draw = _Drawer(store, outputs, images, code)
        records = summary.read(store)
        targets = [_read_target(store, name, view, _label_order(records)) for name in store.relevance_targets()]
        for target in targets:
            target.pages = _choose_pages(target, limit)
        thumbs = _Thumbs(out, images, store, outputs, code)
        global_jobs = [(t, ref) for t in targets for ref in t.corr]
        has_truth = any(str(r["metric"]).startswith("ARI") for r in records)
        compared_rows, compared_attrs = comparisons.read(store)
        compared_metrics = list(dict.fromkeys(r["metric"] for r in compared_rows))
        total = len(global_jobs) + has_truth + len(compared_metrics) + sum(len(t.pages) for t in targets)
        with tqdm(total=total, desc="report", unit="step", disable=not progress, leave=False) as bar:
            fig_dir = out / "figures"
            truth = None
            if has_truth:
                files = _files(fig_dir, "ground_truth", figures.FORMATS)
                truth = draw(out, "ground truth: ARI of the clusters with known labels, per group and space",
                                  files, draw.key(figures.ground_truth_table),
                                  lambda: figures.ground_truth_table(store, fig_dir, stem="ground_truth"))
                bar.update()
            compared_figs = []
            for metric in compared_metrics:
                name = figures.safe_name(metric)
                files = _files(fig_dir, f"forest_{name}", figures.FORMATS)
                compared_figs.append(draw(out, f"{metric}: mean difference and interval of every comparison",
                                          files, draw.key(figures.comparison_forest, metric, settings=files[0].stem),
                                          lambda metric=metric, name=name: figures.comparison_forest(
                                              store, metric, fig_dir, stem=f"forest_{name}")))
                files = _files(fig_dir, f"paired_{name}", figures.FORMATS)
                compared_figs.append(draw(out, f"{metric} per neuron, baseline against each space (first group and "
                                               "method)", files,
                                          draw.key(figures.paired_scatter, metric, settings=files[0].stem),
                                          lambda metric=metric, name=name: figures.paired_scatter(
                                              store, metric, fig_dir, stem=f"paired_{name}")))
                bar.update()
            target_figs = {}
            for target, reference in global_jobs:
                shown = []
                names = f"{target.slug}_{figures.safe_name(reference)}"
                if len(target.layers) >= 2:
                    files = _files(fig_dir, f"scatter_{names}", figures.FORMATS)
                    shown.append(draw(out, f"{target.name}: earlier layers against {target.layers[-1]}, correlation "
                                           f"with {reference} (seed Figure 3a)", files,
                                      draw.key(figures.correlation_scatter, target.name, reference,
                                               settings=files[0].stem),
                                      lambda target=target, reference=reference, names=names:
                                      figures.correlation_scatter(store, target.name, reference, fig_dir,
                                                                  stem=f"scatter_{names}")))
                files = _files(fig_dir, f"bars_{names}", figures.FORMATS)
                shown.append(draw(out, f"{target.name}: correlation with {reference} per space (seed Figure 3b)",
                                  files, draw.key(figures.space_bars, target.name, reference, settings=files[0].stem),
                                  lambda target=target, reference=reference, names=names:
                                  figures.space_bars(store, target.name, reference, fig_dir, stem=f"bars_{names}")))
                target_figs.setdefault(target.name, []).extend(shown)
                bar.update()
            parts = {}
            for target in targets:
                for row in target.pages:
                    bar.set_postfix_str(f"{target.name} {int(target.neurons[row])}")
                    parts[target.name, row] = _neuron_parts(store, target, row, out, thumbs, draw)
                    bar.update()
        # pages last: whether the data could be found is only known once everything is drawn
        notes = [f"No thumbnails: {images.why}."] if images.why else []
        for target in targets:
            for row in target.pages:
                outputs.write_text(out / target.page(row), _neuron_page(target, row, parts[target.name, row], notes))
        compared = {"rows": _comparison_rows(compared_rows), "figures": compared_figs,
                    "confidence": compared_attrs.get("confidence", 0.95), "forest_lines": figure_data.FOREST_LINES}
        index = _index_html(store, store_path, targets, records, truth, target_figs, notes, compared)
    path = out / "index.html"
    outputs.write_text(path, index)
    removed = outputs.finish(images.state())
    log.info("report: %d figure(s) and thumbnail(s) drawn, %d up to date; %d page(s) written; %d stale file(s) "
             "removed", outputs.drawn, outputs.kept, outputs.pages, removed)
    return path


