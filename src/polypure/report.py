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
"""

from __future__ import annotations

import html
import logging
import os
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
    """The dataset if it holds the store's samples and can show them, else None and why."""
    if dataset is not None and not getattr(dataset, "has_pixels", True):
        from .data import no_pixels_message
        return None, no_pixels_message("a thumbnail")
    if dataset is None or not store.has_samples():
        return dataset, None
    stored = store.sample_ids()
    ids = list(getattr(dataset, "ids", []))
    if len(dataset) != len(stored) or (ids and ids != stored):
        return None, (f"the dataset ({len(dataset)} samples) does not hold the store's {len(stored)} samples "
                      "in the same order")
    return dataset, None


class _Thumbs:
    """Writes each reference thumbnail once and knows its file; describes samples for tooltips."""

    def __init__(self, out: Path, dataset, store: Store):
        self.out = out
        self.dataset = dataset
        self.done: set[str] = set()
        self.ids = store.sample_ids() if store.has_samples() else []
        self.labels = store.labels() if store.has_samples() else np.zeros(0, np.int64)
        classes = store.file["samples/labels"].attrs.get("classes") if store.has_samples() else None
        self.classes = read_attr(classes) if classes is not None else None
        self.factors = store.factors()

    def file(self, target: _Target, row: int, position: int) -> str | None:
        """Path (relative to the report) of a reference's thumbnail, written on first use."""
        if self.dataset is None:
            return None
        from PIL import Image

        sample = int(target.refs[row, position])
        box = target.boxes[row, position] if target.boxes is not None else None
        cropped = box is not None and min(int(v) for v in box) >= 0
        name = f"thumbs/{target.slug}/{row}_{position}.png" if cropped else f"thumbs/{sample}.png"
        if name not in self.done:
            try:
                pixels = figures.thumbnail(self.dataset, sample, box, size=THUMB_SIZE)
            except (PolypureError, OSError) as exc:
                # an unreadable image costs its thumbnail, not the report
                log.warning("report: no thumbnail of sample %d: %s", sample, exc)
                return None
            path = self.out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            self.done.add(name)
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
    """The summary table as HTML: per group and cluster method, a row per space, a column per metric."""
    if not records:
        return '<p class="meta">The store has no summary table (run the evaluate stage).</p>'
    found = list(dict.fromkeys(r["method"] for r in records if r["method"]))
    order = [m for m in methods if m in found] + [m for m in found if m not in methods] or [None]
    out = []
    for group in dict.fromkeys(r["group"] for r in records):
        for method in order:
            chosen = [r for r in records if r["group"] == group and r["method"] in ("", method)]
            if not chosen:
                continue
            n = max(r["n"] for r in chosen)
            title = f"{group} ({n} neuron{'s' if n != 1 else ''})" + (f", clusters: {method}" if method else "")
            tables = []
            # reference-space metrics and ground truth side by side, as the text table's two blocks
            for part in (("corr", "inner", "inter"), ("ARI", "NMI")):
                rows = [r for r in chosen if r["metric"].split(" ", 1)[0] in part]
                if not rows:
                    continue
                metrics = list(dict.fromkeys(r["metric"] for r in rows))
                spaces = list(dict.fromkeys(r["space"] for r in rows))
                cells = {(r["space"], r["metric"]): r for r in rows}
                head = "".join(f"<th>{_e(m)}</th>" for m in metrics)
                body = []
                for space in spaces:
                    tds = []
                    for metric in metrics:
                        r = cells.get((space, metric))
                        ok = r is not None and np.isfinite(r["mean"])
                        tds.append(f"<td>{r['mean']:.3f} ± {r['std']:.3f}</td>" if ok else "<td></td>")
                    body.append(f"<tr><td>{_e(space)}</td>{''.join(tds)}</tr>")
                tables.append(f"<table><thead><tr><th>space</th>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
                              "</table>")
            out.append(f'<h3>{_e(title)}</h3><div class="tables">{"".join(tables)}</div>')
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


def _neuron_page(store: Store, target: _Target, row: int, out: Path, thumbs: _Thumbs, dataset,
                 notes: list[str]) -> None:
    neuron = int(target.neurons[row])
    root = "../../"
    page_dir = out / "neurons" / target.slug
    fig_dir = page_dir / "fig"
    position = target.pages.index(row)
    links = [f'<a href="{root}index.html#t-{_e(target.slug)}">all neurons of {_e(target.name)}</a>']
    if position > 0:
        links.append(f'<a href="{int(target.neurons[target.pages[position - 1]])}.html">previous</a>')
    if position + 1 < len(target.pages):
        links.append(f'<a href="{int(target.neurons[target.pages[position + 1]])}.html">next</a>')
    flags = [f"{label} ({int(v[row])} values)" for label, v in target.mixture.items() if v[row] >= 2]
    parts = [f"<h1>{_e(target.name)} neuron {neuron}</h1>",
             f'<p class="meta">{" · ".join(links)}<br>{len(target.refs[row])} references'
             + (f' · <span class="poly">polysemantic by {_e(", ".join(flags))}</span>' if flags else "") + "</p>"]
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    parts.append(_neuron_metrics(target, row))
    figs = []
    for reference in target.corr:
        figs.append(_draw(page_dir, f"distance matrices, reference {reference} (seed Figure 2)",
                          figures.distance_matrices, store, target.name, row, reference, fig_dir, formats=("png",),
                          stem=f"{neuron}_distances_{figures.safe_name(reference)}"))
    figs.append(_draw(page_dir, "UMAP of the references per space, coloured by cluster, and the top references of "
                                "each cluster (seed Figure 4)",
                      figures.neuron_umap, store, dataset, target.name, row, fig_dir,
                      method=target.method or "kmeans", view=_view(target), formats=("png",), stem=f"{neuron}_umap"))
    parts.append("<h2>Figures</h2>" + "<br>".join(figs))
    parts.append("<h2>Clusters</h2>" + _grids_html(store, target, row, thumbs, root))
    path = out / target.page(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(f"{target.name} neuron {neuron}", "\n".join(parts), root=root), encoding="utf-8")


def _view(target: _Target) -> str:
    return "crop" if target.boxes is not None else "full"


def _draw(page_dir: Path, caption: str, draw, *args, **kwargs) -> str:
    """``draw(*args, **kwargs)`` shown as HTML, or the reason it failed (the rest of the report still gets written)."""
    try:
        return _figure_html(draw(*args, **kwargs), page_dir, caption)
    except Exception as exc:  # one figure that fails must not cost the whole report
        log.warning("report: %s: %s", caption, exc)
        return f'<p class="note err">{_e(caption)}: not drawn ({_e(type(exc).__name__)}: {_e(exc)})</p>'


def write_report(store_path, out=None, dataset=None, max_neurons=None, view="auto", progress=True) -> Path:
    """Write the HTML report of a store.

    Parameters
    ----------
    store_path : str or Path
        The polypure HDF5 store.
    out : str or Path, optional
        The report folder (default ``<store without .h5>_report`` next to the store).
    dataset : polypure.data.PolypureDataset, optional
        The store's samples, for thumbnails. Default: rebuilt from the store's config; where that is not
        possible (``data.kind: memory``, a missing folder) the report has no images and says why.
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
    notes: list[str] = []
    with Store(store_path, "r") as store:
        if dataset is None:
            dataset, why = _rebuild_dataset(store)
        else:
            dataset, why = _check_dataset(store, dataset)
        if why:
            notes.append(f"No thumbnails: {why}.")
        records = summary.read(store)
        targets = [_read_target(store, name, view, _label_order(records)) for name in store.relevance_targets()]
        for target in targets:
            target.pages = _choose_pages(target, limit)
        thumbs = _Thumbs(out, dataset, store)
        global_jobs = [(t, ref) for t in targets for ref in t.corr]
        has_truth = any(str(r["metric"]).startswith("ARI") for r in records)
        total = len(global_jobs) + has_truth + sum(len(t.pages) for t in targets)
        with tqdm(total=total, desc="report", unit="step", disable=not progress, leave=False) as bar:
            fig_dir = out / "figures"
            truth_html = ""
            if has_truth:
                truth_html = _draw(out, "ground truth: ARI of the clusters with known labels, per group and space",
                                   figures.ground_truth_table, store, fig_dir)
                bar.update()
            target_figs = {}
            for target, reference in global_jobs:
                shown = []
                if len(target.layers) >= 2:
                    shown.append(_draw(out, f"{target.name}: earlier layers against {target.layers[-1]}, correlation "
                                            f"with {reference} (seed Figure 3a)",
                                       figures.correlation_scatter, store, target.name, reference, fig_dir))
                shown.append(_draw(out, f"{target.name}: correlation with {reference} per space (seed Figure 3b)",
                                   figures.space_bars, store, target.name, reference, fig_dir))
                target_figs.setdefault(target.name, []).extend(shown)
                bar.update()
            for target in targets:
                for row in target.pages:
                    bar.set_postfix_str(f"{target.name} {int(target.neurons[row])}")
                    _neuron_page(store, target, row, out, thumbs, dataset, notes)
                    bar.update()
        index = _index_html(store, store_path, targets, records, truth_html, target_figs, notes)
    path = out / "index.html"
    path.write_text(index, encoding="utf-8")
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
