"""The HTML report of a store, a folder that opens from disk in any browser.

It holds the summary table, the global figures, the stored comparisons between spaces (a forest plot and
a paired scatter per metric, and their table), a sortable table of every neuron, and a page per
interesting neuron with its figures and cluster image grids.

Example
-------
>>> from polypure.viz.report import write_report        # doctest: +SKIP
>>> write_report("storage/demo.h5")                 # doctest: +SKIP
PosixPath('storage/demo_report/index.html')

Plain HTML rendered from the Jinja2 templates in ``polypure/viz/templates`` (every value escaped,
:mod:`~polypure.viz.report_render`), with the styles and the table-sorting script of that folder inlined
into each page, images as files next to the pages, nothing fetched from elsewhere, so it opens from
``file://``. It reads only the store (:mod:`~polypure.viz.report_model`; and, for thumbnails, the data its
config describes, :mod:`~polypure.viz.thumbnails`), so it can be written again at any time. It never runs
code a store's config names: data made by a ``python:`` factory gets no thumbnails unless the dataset is
passed. Which figures it draws, of what, is the table :data:`FIGURES`.

Layout of the folder::

    index.html                      summary table, global figures, comparisons, neuron tables (sortable)
    figures/                        scatter, bars, ground-truth, forest and paired figures (PNG and SVG)
    thumbs/                         reference thumbnails, one file per image (or per crop)
    neurons/<target>/<id>.html      a page per chosen neuron
    neurons/<target>/fig/           its distance-matrix and UMAP figures (PNG)
    manifest.json                   what was drawn from what (see below)

Writing again is incremental (:mod:`~polypure.viz.report_cache`). Every drawn file (figure or thumbnail)
is keyed in ``manifest.json`` by a hash of everything it is drawn from: the store data its figure function
reads (:func:`polypure.viz.figure_data.inputs`), the settings, the data's identity (its config and sample
ids) and the drawing code itself. A file whose key is unchanged is kept, so a report of an unchanged store
draws nothing, and a change redraws only the figures it affects; pages are rewritten only where their text
changes. ``write_report`` owns ``index.html``, ``manifest.json`` and the folders ``figures/``, ``thumbs/``
and ``neurons/``: whatever it did not write this time is removed from them (the pages of neurons and
targets no longer in the store, or no longer chosen), and anything else in the report folder is left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from numbers import Integral
from pathlib import Path

from tqdm.auto import tqdm

from polypure.config.paths import require_output_folder
from polypure.config.settings import default_report_folder
from polypure.errors import ConfigError
from polypure.evaluation import comparisons, summary
from polypure.store.hdf5_store import Store
from polypure.viz import figure_data, figures, report_render
from polypure.viz.report_cache import Outputs, code_key, digest
from polypure.viz.report_model import Target, choose_pages, label_order, read_target
from polypure.viz.thumbnails import Images, Thumbs

log = logging.getLogger("polypure")

#: Neuron pages per target when ``max_neurons`` is not given (each page costs about a second).
NEURON_PAGES = 8


@dataclass(frozen=True)
class Subject:
    """What one figure of the report is drawn of; the fields its scope does not have are left empty.

    Attributes
    ----------
    target : Target or None
        The target (scopes ``reference`` and ``neuron``).
    reference : str or None
        The reference space (scope ``reference``, and ``neuron`` figures drawn per reference).
    metric : str or None
        The compared metric (scope ``metric``).
    row : int or None
        The neuron's row in its target (scope ``neuron``).
    records : list of dict
        The summary table (scope ``store``).
    """

    target: Target | None = None
    reference: str | None = None
    metric: str | None = None
    row: int | None = None
    records: Sequence[dict] = ()

    def names(self) -> dict:
        """What a spec's stem and caption are formatted with (names made safe for files where they go in one)."""
        target = self.target
        return {"target": target.name if target else None, "slug": target.slug if target else None,
                "last": target.layers[-1] if target and target.layers else None,
                "neuron": int(target.neurons[self.row]) if target is not None and self.row is not None else None,
                "reference": self.reference, "ref": None if self.reference is None else figures.safe_name(self.reference),
                "metric": self.metric, "name": None if self.metric is None else figures.safe_name(self.metric)}


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the report, drawn once for every subject of its scope where it applies.

    Attributes
    ----------
    figure : str
        The function of :mod:`polypure.viz.figures` that draws it (found by name when drawing), called as
        ``figure(store, [dataset,] *args, out_dir, formats=..., stem=..., **options)``.
    scope : {"store", "metric", "reference", "neuron"}
        What it is drawn of: the store, each compared metric, each target and reference (all three on the
        index, files in ``figures/``), or each neuron with a page (on its page, files in
        ``neurons/<target>/fig/``).
    stem, caption : str
        Its file name without suffix and its caption, formatted with :meth:`Subject.names`.
    args : callable
        The figure's arguments between the store and the output folder, for a subject.
    options : callable
        Its keyword arguments for a subject (part of its key).
    when : callable
        Whether it applies to a subject.
    per_reference : bool
        Drawn once per reference of the subject's target (each with :attr:`Subject.reference` set).
    images : bool
        Drawn with the dataset's images (passed after the store), so its key holds the data's identity.
    formats : tuple of str
    """

    figure: str
    scope: str
    stem: str
    caption: str
    args: Callable[[Subject], tuple] = lambda subject: ()
    options: Callable[[Subject], dict] = lambda subject: {}
    when: Callable[[Subject], bool] = lambda subject: True
    per_reference: bool = False
    images: bool = False
    formats: tuple[str, ...] = figures.FORMATS


#: Every figure of the report, in the order each page shows them.
FIGURES = (
    FigureSpec("ground_truth_table", "store", "ground_truth",
               "ground truth: ARI of the clusters with known labels, per group and space",
               when=lambda s: any(str(r["metric"]).startswith("ARI") for r in s.records)),
    FigureSpec("comparison_forest", "metric", "forest_{name}",
               "{metric}: mean difference and interval of every comparison", args=lambda s: (s.metric,)),
    FigureSpec("paired_scatter", "metric", "paired_{name}",
               "{metric} per neuron, baseline against each space (first group and method)",
               args=lambda s: (s.metric,)),
    FigureSpec("correlation_scatter", "reference", "scatter_{slug}_{ref}",
               "{target}: earlier layers against {last}, correlation with {reference} (seed Figure 3a)",
               args=lambda s: (s.target.name, s.reference), when=lambda s: len(s.target.layers) >= 2),
    FigureSpec("space_bars", "reference", "bars_{slug}_{ref}",
               "{target}: correlation with {reference} per space (seed Figure 3b)",
               args=lambda s: (s.target.name, s.reference)),
    FigureSpec("distance_matrices", "neuron", "{neuron}_distances_{ref}",
               "distance matrices, reference {reference} (seed Figure 2)",
               args=lambda s: (s.target.name, s.row, s.reference), per_reference=True, formats=("png",)),
    FigureSpec("neuron_umap", "neuron", "{neuron}_umap",
               "UMAP of the references per space, coloured by cluster, and the top references of each cluster "
               "(seed Figure 4)",
               args=lambda s: (s.target.name, s.row),
               options=lambda s: {"method": s.target.method or "kmeans", "view": s.target.view},
               images=True, formats=("png",)),
    FigureSpec("selectivity_bars", "neuron", "{neuron}_selectivity",
               "is the split real? The drop of the activation when each cluster's circuit is ablated, on the "
               "cluster's references and on the others' (black lines: random sets of as many channels, or concepts "
               "in a dictionary space)",
               args=lambda s: (s.target.name, s.row), options=lambda s: {"method": s.target.method},
               when=lambda s: bool(s.target.selectivity), formats=("png",)),
)


class _Drawer:
    """Draws a figure unless the previous report drew it from the same inputs; gives its HTML either way."""

    def __init__(self, store: Store, out: Path, outputs: Outputs, images: Images, code: str):
        self.store = store
        self.out = out
        self.outputs = outputs
        self.images = images
        self.code = code

    def scope(self, scope: str, subject: Subject) -> list[dict]:
        """Every figure of ``scope`` that applies to ``subject``, in the order of :data:`FIGURES`."""
        shown = []
        for spec in FIGURES:
            if spec.scope != scope:
                continue
            each = [replace(subject, reference=r) for r in subject.target.corr] if spec.per_reference else [subject]
            shown += [self(spec, s) for s in each if spec.when(s)]
        return shown

    def __call__(self, spec: FigureSpec, subject: Subject) -> dict:
        """The figure for its page (for the template's ``figure``), or the reason it failed.

        The rest of the report still gets written when one figure fails. The figure is drawn only when
        its files are not up to date for its key: its drawing code, the data it reads (what
        :func:`polypure.viz.figure_data.inputs` says it reads) and its settings.
        """
        names = subject.names()
        stem, caption = spec.stem.format(**names), spec.caption.format(**names)
        if spec.scope == "neuron":
            page_dir = self.out / "neurons" / subject.target.slug
            fig_dir = page_dir / "fig"
        else:
            page_dir, fig_dir = self.out, self.out / "figures"
        files = [fig_dir / f"{stem}.{fmt}" for fmt in spec.formats]
        args, options = spec.args(subject), spec.options(subject)
        # the images drawn depend on the data, which the store holds only by its sample ids
        settings = (stem, spec.formats, *((self.images.key, self.images.available) if spec.images else ()))
        key = digest(self.code, spec.figure, figure_data.inputs(spec.figure, self.store, *args, **options), options,
                     settings)
        entry = self.outputs.cached(files, key)
        error = entry.get("error") if entry is not None else None
        if entry is None:
            try:
                data = (self.images.get(),) if spec.images else ()
                getattr(figures, spec.figure)(self.store, *data, *args, fig_dir, formats=spec.formats, stem=stem,
                                              **options)
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


def _page_count(store: Store, value, key: str, cap: bool = False) -> int:
    """Neuron pages per target: 0 (the index alone) up to the most neurons a target of the store has.

    With ``cap`` a larger value is a cap (every target gets a page for each of its neurons): a config's
    ``report.neurons`` is reused across runs narrowed to fewer neurons, and must not refuse them.
    """
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}: {value!r} is not a number of pages (0 writes the index alone)")
    largest = max((len(store.neurons(name)) for name in store.relevance_targets()), default=0)
    if value > largest > 0 and not cap:
        raise ConfigError(f"{key}: {value} is more than the {largest} neurons of the store's largest target "
                          f"(valid: up to {largest}; a target with fewer gets a page for each)")
    return int(value)


def write_report(store_path, out=None, dataset=None, max_neurons=None, view="auto", progress=True, *,
                 neurons_key: str = "max_neurons", cap: bool = False) -> Path:
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
        in the index either way. 0 writes the index alone; more than the largest target of the store has
        is refused (a target with fewer neurons gets a page for each).
    view : {"auto", "full", "crop"}
        Thumbnails of the whole images or of the crops in ``/crops/<target>`` (``auto``: crops where stored).
    progress : bool
        Show a progress bar.
    neurons_key : str
        The key or option ``max_neurons`` came from, as a refusal names it (``report.neurons``, ``--neurons``).
    cap : bool
        ``max_neurons`` is a cap, not a count to check against the targets (the report stage's
        ``report.neurons``, a config value that narrower runs of the same config reuse).

    Returns
    -------
    pathlib.Path
        The report's ``index.html``.

    Raises
    ------
    ConfigError
        For an output folder of the wrong kind (a file where the folder goes), or a page count below 0 or
        above the largest target's neurons, before anything is written.
    StoreError
        For a store that is missing, not a regular file, or not a polypure store.
    """
    store_path = Path(store_path)
    out = Path(out) if out is not None else default_report_folder(store_path)
    if view not in ("auto", "full", "crop"):
        raise ValueError(f"view must be auto, full or crop, not {view!r}")
    # every input is checked before the first file is written: the store's kind (opening it), the folder's
    # kind, and the page count against the targets the store holds
    with Store(store_path, "r") as store:
        require_output_folder(out, "report folder")
        limit = NEURON_PAGES if max_neurons is None else _page_count(store, max_neurons, neurons_key, cap)
        out.mkdir(parents=True, exist_ok=True)
        outputs = Outputs(out)
        code = code_key()
        images = Images(store, dataset, outputs.previous_data)
        draw = _Drawer(store, out, outputs, images, code)
        records = summary.read(store)
        targets = [read_target(store, name, view, label_order(records)) for name in store.relevance_targets()]
        for target in targets:
            target.pages = choose_pages(target, limit)
        thumbs = Thumbs(out, images, store, outputs, code)
        compared = comparisons.read(store)
        subjects = {"store": [Subject(records=records)],
                    "metric": [Subject(metric=m) for m in dict.fromkeys(r["metric"] for r in compared[0])],
                    "reference": [Subject(target=t, reference=ref) for t in targets for ref in t.corr],
                    "neuron": [Subject(target=t, row=row) for t in targets for row in t.pages]}
        index_figs: dict[str, list[dict]] = {}
        target_figs: dict[str, list[dict]] = {}
        pages = []
        with tqdm(total=sum(map(len, subjects.values())), desc="report", unit="step", disable=not progress,
                  leave=False) as bar:
            for scope in ("store", "metric", "reference"):
                for subject in subjects[scope]:
                    drawn = draw.scope(scope, subject)
                    index_figs.setdefault(scope, []).extend(drawn)
                    if subject.target is not None:
                        target_figs.setdefault(subject.target.name, []).extend(drawn)
                    bar.update()
            for subject in subjects["neuron"]:
                target, row = subject.target, subject.row
                bar.set_postfix_str(f"{target.name} {int(target.neurons[row])}")
                # the grids write the page's thumbnails
                pages.append((target, row, draw.scope("neuron", subject),
                              report_render.grids(store, target, row, thumbs)))
                bar.update()
        # pages last: whether the data could be found is only known once everything is drawn
        notes = [f"No thumbnails: {images.why}."] if images.why else []
        for target, row, figs, grids in pages:
            outputs.write_text(out / target.page(row), report_render.neuron_page(target, row, figs, grids, notes))
        # the store's one figure is the ground-truth table, where the store has ground truth
        truth = next(iter(index_figs.get("store", [])), None)
        index = report_render.index_html(store, store_path, targets, records, notes, truth=truth,
                                         target_figs=target_figs, compared=compared,
                                         compared_figs=index_figs.get("metric", []))
    path = out / "index.html"
    outputs.write_text(path, index)
    removed = outputs.finish(images.state())
    log.info("report: %d figure(s) and thumbnail(s) drawn, %d up to date; %d page(s) written; %d stale file(s) "
             "removed", outputs.drawn, outputs.kept, outputs.pages, removed)
    return path
