"""The HTML report of a store, a folder that opens from disk in any browser.

It holds the summary table, the global figures, a sortable table of every neuron, and a page per
interesting neuron with its figures and cluster image grids.

Example
-------
>>> from polypure.report import write_report        # doctest: +SKIP
>>> write_report("storage/demo.h5")                 # doctest: +SKIP
PosixPath('storage/demo_report/index.html')

Plain HTML with inline CSS and JavaScript, images as files next to the pages, nothing fetched from
elsewhere, so it opens from ``file://``. It reads only the store (and, for thumbnails, the data its
config describes), so it can be written again at any time.

Layout of the folder::

    index.html                      summary table, global figures, neuron tables (sortable)
    figures/                        scatter, bars and ground-truth figures (PNG and SVG)
    thumbs/                         reference thumbnails, one file per image (or per crop)
    neurons/<target>/<id>.html      a page per chosen neuron
    neurons/<target>/fig/           its distance-matrix and UMAP figures (PNG)
    manifest.json                   what was drawn from what (see below)

Writing again is incremental. Every drawn file (figure or thumbnail) is keyed in ``manifest.json`` by a
hash of everything it is drawn from: the store data its figure function reads (:func:`polypure.figures.inputs`),
the settings, the data's identity (its config and sample ids) and the drawing code itself. A file whose
key is unchanged is kept, so a report of an unchanged store draws nothing, and a change redraws only the
figures it affects; pages are rewritten only where their text changes. ``write_report`` owns
``index.html``, ``manifest.json`` and the folders ``figures/``, ``thumbs/`` and ``neurons/``: whatever it
did not write this time is removed from them (the pages of neurons and targets no longer in the store, or
no longer chosen), and anything else in the report folder is left alone.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from . import __version__, figures, summary
from .errors import PolypureError
from .evaluate import reference_indices
from .store import Store, read_attr

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
    layers = figures.attribution_layers(store, name)
    methods = figures.cluster_methods(store, name)
    method = methods[0] if methods else None
    ari: dict[str, dict[str, np.ndarray]] = {}
    root = f"metrics/{name}/ari"
    if method is not None and root in store:
        stored = store.file[root]
        for label in [n for n in labels if n in stored] + sorted(n for n in stored if n not in labels):
            spaces = stored[label]
            found = {space: group[method][()] for space, group in spaces.items() if method in group}
            order = [s for s in [*layers, "activation"] if s in found] + sorted(s for s in found if s not in layers
                                                                              and s != "activation")
            ari[label] = {space: found[space] for space in order}
    mixture = {}
    if f"metrics/{name}/mixture" in store:
        stored = store.file[f"metrics/{name}/mixture"]
        mixture = {label: stored[label][()] for label in [n for n in labels if n in stored]
                   + sorted(n for n in stored if n not in labels)}
    group = store.file[f"relevance/{name}"]
    return _Target(name=name, slug=figures.safe_name(name), neurons=group["neurons"][()],
                   refs=reference_indices(store, name), layers=layers,
                   complete=group["complete"][()] if "complete" in group else np.ones(len(group["neurons"]), bool),
                   methods=methods, corr={ref: figures.correlations(store, name, ref)
                                          for ref in figures.references(store, name)},
                   ari=ari, mixture=mixture, boxes=figures.crop_boxes(store, name, view))


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
    from .config import config_from_dict
    from .data import build_dataset

    try:
        cfg = config_from_dict(yaml.safe_load(store.config_yaml) or {})
    except Exception as exc:  # any unreadable config only costs the thumbnails
        return None, f"the store's config cannot be read ({exc})"
    if cfg.data is None:
        return None, "the store's config has no data section"
    if cfg.data.kind == "memory":
        return None, ("the store was made from a dataset passed from Python (data.kind: memory); pass it as "
                      "write_report(..., dataset=...) to see images")
    try:
        dataset = build_dataset(cfg.data)
    except Exception as exc:  # a missing folder or file only costs the thumbnails
        return None, f"the data of the store's config cannot be loaded ({exc})"
    return dataset, None


def _check_dataset(store: Store, dataset):
    """The dataset if it holds the store's samples, else None and why."""
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
    """The drawing code and version: a new polypure, or an edited figure module, redraws every figure."""
    return _digest(__version__, Path(figures.__file__).read_bytes(), THUMB_SIZE)


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
            section = (yaml.safe_load(store.config_yaml) or {}).get("data") or {}
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
        classes = store.file["samples/labels"].attrs.get("classes") if store.has_samples() else None
        self.classes = read_attr(classes) if classes is not None else None
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
            pixels = figures.thumbnail(dataset, sample, box, size=THUMB_SIZE)
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
# HTML


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
main{max-width:1500px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:30px 0 8px;border-bottom:1px solid #d8dde6}
h3{font-size:15px;margin:18px 0 6px}
a{color:#1b6ca8}.meta{color:#5b6475;font-size:13px}
.note{background:#fff4d6;border:1px solid #f0c96a;padding:8px 12px;border-radius:4px;margin:10px 0}
.err{background:#fde2e2;border-color:#e59a9a}
table{border-collapse:collapse;font-size:12.5px;background:#fff;margin:6px 0 14px}
th,td{border:1px solid #dde2ea;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#eef1f6;font-weight:600;position:sticky;top:0;z-index:1}
td:first-child,th:first-child{text-align:left}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
.scroll{overflow:auto;max-height:80vh;border:1px solid #dde2ea;display:inline-block;max-width:100%}
.scroll table{margin:0}
.tables{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.tables table{margin:0 0 6px}
.nolink{color:#5b6475}.poly{color:#b3261e;font-weight:600}
figure{margin:10px 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #dde2ea;background:#fff}
figcaption{font-size:12px;color:#5b6475}
.grid{display:flex;flex-wrap:wrap;gap:14px;margin:6px 0 12px}
.cluster{border:3px solid #999;border-radius:4px;padding:6px;background:#fff}
.cluster h4{margin:0 0 4px;font-size:13px}
.imgs{display:grid;grid-template-columns:repeat(4,76px);gap:3px}
.imgs img{width:76px;height:76px;image-rendering:auto;display:block}
.ids{font-size:12px;color:#5b6475;max-width:330px}
nav.top{background:#1d2330;color:#fff;padding:8px 28px;font-size:13px}
nav.top a{color:#cfe3ff;margin-right:14px}
"""

_SORT_JS = """
(function(){
  function key(row, col){
    var cell = row.cells[col]; if (!cell) return null;
    var v = cell.getAttribute('data-v'); if (v === null) v = cell.textContent.trim();
    if (v === '') return null;
    var n = Number(v); return isNaN(n) ? v.toLowerCase() : n;
  }
  function compare(a, b, asc){
    if (a === null || b === null) return (a === null) - (b === null);
    var byType = (typeof a === 'string') - (typeof b === 'string');
    if (byType) return byType;
    var c = a < b ? -1 : a > b ? 1 : 0;
    return asc ? c : -c;
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function(th, col){
      th.title = 'click to sort';
      th.addEventListener('click', function(){
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        Array.prototype.forEach.call(heads, function(h){ h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(a, b){ return compare(key(a, col), key(b, col), asc); });
        rows.forEach(function(r){ body.appendChild(r); });
      });
    });
  });
})();
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, body: str, root: str = "", script: bool = False) -> str:
    nav = f'<nav class="top"><a href="{root}index.html">polypure report</a>{_e(title)}</nav>'
    js = f"<script>{_SORT_JS}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>{nav}<main>\n{body}\n</main>{js}"
            f"</body></html>\n")


def _number(value, digits: int = 3) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _shade(value, kind: str) -> str:
    """A background tint so that large values stand out in long tables."""
    if value is None or not np.isfinite(value):
        return ""
    if kind == "gap":
        alpha = min(abs(float(value)) * 2.0, 1.0) * 0.55
        rgb = "46,160,67" if value > 0 else "207,34,46"
    else:
        alpha = min(max(float(value), 0.0), 1.0) * 0.5
        rgb = "27,108,168"
    return f' style="background:rgba({rgb},{alpha:.2f})"'


def _cell(value, kind: str = "value") -> str:
    ok = value is not None and np.isfinite(value)
    return f'<td data-v="{float(value) if ok else ""}"{_shade(value, kind)}>{_number(value)}</td>'


def _figure_html(paths: list[Path], page_dir: Path, caption: str) -> str:
    """A figure's PNG with links to every written format, addressed relative to the page's folder."""
    png = next((p for p in paths if p.suffix == ".png"), None)
    if png is None:
        return ""

    def link(path: Path) -> str:
        return Path(os.path.relpath(path, page_dir)).as_posix()

    links = " ".join(f'<a href="{_e(link(p))}">{p.suffix[1:].upper()}</a>' for p in paths)
    rel = link(png)
    return (f'<figure><a href="{_e(rel)}"><img src="{_e(rel)}" alt="{_e(caption)}"></a>'
            f"<figcaption>{_e(caption)} · {links}</figcaption></figure>")


def _summary_html(records: list[dict], methods: list[str]) -> str:
    """The summary table as HTML: the tables of :func:`polypure.summary.pivot`, side by side per group and
    cluster method, with the reasons neurons were left out below them."""
    if not records:
        return '<p class="meta">The store has no summary table (run the evaluate stage).</p>'
    out = []
    tables = summary.pivot(records, methods)
    for title in dict.fromkeys(t.title for t in tables):
        shown, notes = [], []
        for table in (t for t in tables if t.title == title):
            head = "".join(f"<th>{_e(m)}</th>" for m in table.metrics)
            body = "".join(f"<tr><td>{_e(space)}</td>"
                           + "".join(f"<td>{_e(table.text(space, m))}</td>" for m in table.metrics) + "</tr>"
                           for space in table.spaces)
            shown.append(f"<table><thead><tr><th>space</th>{head}</tr></thead><tbody>{body}</tbody></table>")
            notes += table.notes()
        note = (f'<p class="meta">Not scored (non-results, left out of the means): {_e("; ".join(notes))}</p>'
                if notes else "")
        out.append(f'<h3>{_e(title)}</h3><div class="tables">{"".join(shown)}</div>{note}')
    return "\n".join(out)


def _columns(target: _Target) -> list[tuple[str, str, np.ndarray]]:
    """(header, kind, per-row values) of the neuron table."""
    cols = []
    for reference, corr in target.corr.items():
        cols += [(f"corr {reference}: {space}", "value", values) for space, values in corr.items()]
        last = target.layers[-1] if target.layers else None
        cols += [(f"{layer} − {last} ({reference})", "gap", gap) for layer, gap in target.gaps(reference).items()]
    for label, spaces in target.ari.items():
        cols += [(f"ARI {label}: {space}", "value", values) for space, values in spaces.items()]
    return cols


def _neuron_table(target: _Target) -> str:
    cols = _columns(target)
    mixtures = list(target.mixture.items())
    head = ["<th>neuron</th>", *(f"<th>{_e(h)}</th>" for h, _, _ in cols),
            *(f"<th>{_e(label)} values</th>" for label, _ in mixtures), "<th>polysemantic by</th>"]
    pages = set(target.pages)
    rows = []
    for row, neuron in enumerate(target.neurons):
        neuron = int(neuron)
        name = (f'<a href="{_e(target.page(row))}">{neuron}</a>' if row in pages
                else f'<span class="nolink">{neuron}</span>')
        cells = [f'<td data-v="{neuron}">{name}</td>', *(_cell(values[row], kind) for _, kind, values in cols)]
        flags = []
        for label, values in mixtures:
            count = int(values[row])
            flag = ' class="poly"' if count >= 2 else ""
            cells.append(f'<td data-v="{count}"{flag}>{count}</td>')
            if count >= 2:
                flags.append(label)
        cells.append(f'<td class="poly">{_e(", ".join(flags))}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table class="sortable" id="neurons-{_e(target.slug)}"><thead><tr>{"".join(head)}'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _grids_html(store: Store, target: _Target, row: int, thumbs: _Thumbs, root: str) -> str:
    """The first references of each cluster, per space and method, as thumbnails (or sample ids)."""
    out = []
    refs = target.refs[row]

    def block(title: str, colour: str, positions) -> str:
        names = [thumbs.file(target, row, int(p)) for p in positions]
        tips = [thumbs.describe(int(refs[p])) for p in positions]
        if all(n is None for n in names):
            inner = f'<div class="ids">{_e(", ".join(str(int(refs[p])) for p in positions))}</div>'
        else:
            inner = '<div class="imgs">' + "".join(
                f'<img src="{root}{_e(n)}" alt="{_e(t)}" title="{_e(t)}">' for n, t in zip(names, tips)) + "</div>"
        return f'<div class="cluster" style="border-color:{colour}"><h4>{_e(title)}</h4>{inner}</div>'

    out.append("<h3>Most activating references</h3><div class='grid'>"
               + block(f"top {figures.TOP_PER_CLUSTER} of {len(refs)}", "#1d2330",
                       range(min(figures.TOP_PER_CLUSTER, len(refs)))) + "</div>")
    for method in target.methods:
        for space in [*target.spaces, *(s for s in store.file[f"clusters/{target.name}"] if s not in target.spaces)]:
            labels = figures.cluster_labels(store, target.name, space, method, row)
            if labels is None:
                continue
            blocks = []
            for cluster, positions in figures.top_per_cluster(labels).items():
                count = int((labels == cluster).sum())
                name = "noise" if cluster < 0 else f"cluster {cluster}"
                blocks.append(block(f"{name}: {count} refs", figures.cluster_colour(cluster), positions))
            out.append(f"<h3>{_e(space)} · {_e(method)}</h3><div class='grid'>{''.join(blocks)}</div>")
    return "\n".join(out)


def _neuron_metrics(target: _Target, row: int) -> str:
    """This neuron's numbers: a row per space, a column per reference correlation and ARI."""
    columns = [(f"corr {ref}", values) for ref, values in target.corr.items()]
    columns += [(f"ARI {label}", values) for label, values in target.ari.items()]
    if not columns:
        return ""
    spaces = list(dict.fromkeys(s for _, values in columns for s in values))
    head = "".join(f"<th>{_e(name)}</th>" for name, _ in columns)
    body = []
    for space in spaces:
        tds = "".join(_cell(values[space][row]) if space in values else "<td></td>" for _, values in columns)
        body.append(f"<tr><td>{_e(space)}</td>{tds}</tr>")
    return f"<table><thead><tr><th>space</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _neuron_parts(store: Store, target: _Target, row: int, out: Path, thumbs: _Thumbs, draw: "_Drawer") -> dict:
    """A neuron page's figures and cluster grids (drawn or found up to date), for :func:`_neuron_page`."""
    neuron = int(target.neurons[row])
    page_dir = out / "neurons" / target.slug
    fig_dir = page_dir / "fig"
    figs = []
    for reference in target.corr:
        files = _files(fig_dir, f"{neuron}_distances_{figures.safe_name(reference)}", ("png",))
        figs.append(draw(page_dir, f"distance matrices, reference {reference} (seed Figure 2)", files,
                         draw.key(figures.distance_matrices, target.name, row, reference, settings=files[0].name),
                         lambda: figures.distance_matrices(store, target.name, row, reference, fig_dir,
                                                           formats=("png",), stem=files[0].stem)))
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
    return {"figures": figs, "grids": _grids_html(store, target, row, thumbs, "../../")}


def _neuron_page(target: _Target, row: int, parts: dict, notes: list[str]) -> str:
    neuron = int(target.neurons[row])
    root = "../../"
    position = target.pages.index(row)
    links = [f'<a href="{root}index.html#t-{_e(target.slug)}">all neurons of {_e(target.name)}</a>']
    if position > 0:
        links.append(f'<a href="{int(target.neurons[target.pages[position - 1]])}.html">previous</a>')
    if position + 1 < len(target.pages):
        links.append(f'<a href="{int(target.neurons[target.pages[position + 1]])}.html">next</a>')
    flags = [f"{label} ({int(v[row])} values)" for label, v in target.mixture.items() if v[row] >= 2]
    body = [f"<h1>{_e(target.name)} neuron {neuron}</h1>",
            f'<p class="meta">{" · ".join(links)}<br>{len(target.refs[row])} references'
            + (f' · <span class="poly">polysemantic by {_e(", ".join(flags))}</span>' if flags else "") + "</p>"]
    body += [f'<p class="note">{_e(n)}</p>' for n in notes]
    body.append(_neuron_metrics(target, row))
    body.append("<h2>Figures</h2>" + "<br>".join(parts["figures"]))
    body.append("<h2>Clusters</h2>" + parts["grids"])
    return _page(f"{target.name} neuron {neuron}", "\n".join(body), root=root)


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
        """A figure's key: the drawing code, the store data the figure reads for these arguments
        (:func:`polypure.figures.inputs`), and any further ``settings`` it depends on."""
        return _digest(self.code, figure.__name__, figures.inputs(figure, self.store, *args, **kwargs), kwargs,
                       settings)

    def __call__(self, page_dir: Path, caption: str, files: list[Path], key: str,
                 make: Callable[[], object]) -> str:
        """The figure as HTML, or the reason it failed (the rest of the report still gets written).

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
            return f'<p class="note err">{_e(caption)}: not drawn ({_e(error)})</p>'
        return _figure_html(files, page_dir, caption)


def write_report(store_path, out=None, dataset=None, max_neurons=None, view="auto", progress=True) -> Path:
    """Write the HTML report of a store, drawing only what is not up to date.

    Parameters
    ----------
    store_path : str or Path
        The polypure HDF5 store.
    out : str or Path, optional
        The report folder (default ``<store without .h5>_report`` next to the store).
    dataset : polypure.data.PolypureDataset or callable, optional
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
        total = len(global_jobs) + has_truth + sum(len(t.pages) for t in targets)
        with tqdm(total=total, desc="report", unit="step", disable=not progress, leave=False) as bar:
            fig_dir = out / "figures"
            truth_html = ""
            if has_truth:
                files = _files(fig_dir, "ground_truth", figures.FORMATS)
                truth_html = draw(out, "ground truth: ARI of the clusters with known labels, per group and space",
                                  files, draw.key(figures.ground_truth_table),
                                  lambda: figures.ground_truth_table(store, fig_dir, stem="ground_truth"))
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
                                      lambda: figures.correlation_scatter(store, target.name, reference, fig_dir,
                                                                          stem=f"scatter_{names}")))
                files = _files(fig_dir, f"bars_{names}", figures.FORMATS)
                shown.append(draw(out, f"{target.name}: correlation with {reference} per space (seed Figure 3b)",
                                  files, draw.key(figures.space_bars, target.name, reference, settings=files[0].stem),
                                  lambda: figures.space_bars(store, target.name, reference, fig_dir,
                                                             stem=f"bars_{names}")))
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
        index = _index_html(store, store_path, targets, records, truth_html, target_figs, notes)
    path = out / "index.html"
    outputs.write_text(path, index)
    removed = outputs.finish(images.state())
    log.info("report: %d figure(s) and thumbnail(s) drawn, %d up to date; %d page(s) written; %d stale file(s) "
             "removed", outputs.drawn, outputs.kept, outputs.pages, removed)
    return path


def _index_html(store: Store, store_path: Path, targets: list[_Target], records: list[dict], truth_html: str,
                target_figs: dict[str, list[str]], notes: list[str]) -> str:
    attrs = {k: read_attr(v) for k, v in store.file.attrs.items() if k != "config"}
    try:
        config = yaml.safe_load(store.config_yaml) or {}
    except yaml.YAMLError:
        config = {}
    model = (config.get("model") or {}).get("name", "?")
    data = (config.get("data") or {}).get("kind", "?")
    methods = list(dict.fromkeys(m for t in targets for m in t.methods))
    samples = len(store.sample_ids()) if store.has_samples() else 0
    parts = [f"<h1>polypure report: {_e(store_path.name)}</h1>",
             (f'<p class="meta">store {_e(store_path.resolve())} · created {_e(attrs.get("created", "?"))} · '
              f'polypure {_e(attrs.get("polypure_version", "?"))} (report by {_e(__version__)}) · model '
              f"{_e(model)} · data {_e(data)} · {samples} samples</p>")]
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    toc = ['<a href="#summary">summary</a>', '<a href="#figures">figures</a>']
    toc += [f'<a href="#t-{_e(t.slug)}">neurons of {_e(t.name)}</a>' for t in targets]
    parts.append(f'<p>{" · ".join(toc)}</p>')
    parts.append(f'<h2 id="summary">Summary</h2>{_summary_html(records, methods)}')
    figs = [truth_html] if truth_html else []
    for target in targets:
        if target_figs.get(target.name):
            figs.append(f"<h3>{_e(target.name)}</h3>" + "".join(target_figs[target.name]))
    parts.append('<h2 id="figures">Figures</h2>'
                 + ("\n".join(figs) if figs else '<p class="meta">No reference or ground-truth metrics in the '
                                                 "store, so no global figures.</p>"))
    for target in targets:
        linked = len(target.pages)
        parts.append(f'<h2 id="t-{_e(target.slug)}">Neurons of {_e(target.name)}</h2>'
                     f'<p class="meta">{len(target.neurons)} neurons, {linked} with a page (linked). Click a column '
                     f"header to sort. "
                     + ("Gap columns: how much an earlier layer's correlation beats the last attribution layer's. "
                        if any(target.gaps(r) for r in target.corr) else "")
                     + (f"ARI columns: clusters of {_e(target.method)}. " if target.ari else "")
                     + ("“values”: how many label values each make up a large share of the top-K "
                        "(2 or more: polysemantic)." if target.mixture else "") + "</p>"
                     + _neuron_table(target))
    return _page(f"polypure report: {store_path.name}", "\n".join(parts), script=True)
