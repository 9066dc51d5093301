"""The report's HTML: Jinja2 templates of ``polypure/viz/templates`` and the page contexts they render.

:func:`render` renders a template with every value escaped unless marked safe, and the styles and the
table-sorting script inlined, so that a page stands alone (also used by ``polypure compare``).
:func:`index_html` and :func:`neuron_page` gather what the index and a neuron page show from the
:class:`~polypure.viz.report_model.Target` of each target and the figures drawn for them; :func:`grids`
lays out a neuron's cluster image grids (its thumbnails are written on the way, by
:class:`~polypure.viz.thumbnails.Thumbs`). The number formats of the tables are the template filters
``number``, ``data_value`` and ``tint``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import yaml

from polypure import __version__
from polypure.evaluation import comparisons, summary
from polypure.store.hdf5_store import Store
from polypure.viz import figure_data, figures
from polypure.viz.report_model import Target
from polypure.viz.thumbnails import Thumbs


@functools.lru_cache(maxsize=1)
def templates():
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


def render(template: str, **context) -> str:
    """A template of ``polypure/viz/templates`` rendered with ``context`` (and the polypure version)."""
    return templates().get_template(template).render(version=__version__, **context)


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


def _columns(target: Target) -> list[dict]:
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
    cols += [{"header": f"selectivity: {space}", "kind": "value", "values": values}
             for space, values in target.selectivity.get("circuit", {}).items()]
    for label, spaces in target.ari.items():
        cols += [{"header": f"ARI {label}: {space}", "kind": "value", "values": values}
                 for space, values in spaces.items()]
    return cols


def _neuron_rows(target: Target) -> list[dict]:
    """A row per neuron of a target: its id, its page (where it has one), mixture counts and flags."""
    pages = set(target.pages)
    rows = []
    for row, neuron in enumerate(target.neurons):
        counts = [int(values[row]) for values in target.mixture.values()]
        rows.append({"index": row, "neuron": int(neuron), "page": target.page(row) if row in pages else None,
                     "mixture": counts,
                     "flags": [label for label, count in zip(target.mixture, counts) if count >= 2]})
    return rows


def grids(store: Store, target: Target, row: int, thumbs: Thumbs) -> list[dict]:
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


def _neuron_metrics(target: Target, row: int) -> dict:
    """A neuron's numbers: a row per space, a column per reference correlation, ARI and selectivity (and its null)."""
    columns = [(f"corr {ref}", values) for ref, values in target.corr.items()]
    columns += [(f"ARI {label}", values) for label, values in target.ari.items()]
    columns += [(f"selectivity {of}", values) for of, values in target.selectivity.items()]
    spaces = list(dict.fromkeys(s for _, values in columns for s in values))
    return {"columns": [name for name, _ in columns],
            "rows": [(space, [values[space][row] if space in values else None for _, values in columns])
                     for space in spaces]}


def neuron_page(target: Target, row: int, figs: list[dict], sections: list[dict], notes: list[str]) -> str:
    """The HTML of a neuron's page: its numbers, ``figs`` (drawn for it), its cluster grids (:func:`grids`)."""
    neuron = int(target.neurons[row])
    position = target.pages.index(row)
    return render("neuron.html", title=f"{target.name} neuron {neuron}", root="../../", sortable=False,
                  target=target, neuron=neuron, notes=notes, references=len(target.refs[row]),
                  previous=int(target.neurons[target.pages[position - 1]]) if position > 0 else None,
                  next=int(target.neurons[target.pages[position + 1]]) if position + 1 < len(target.pages) else None,
                  flags=[f"{label} ({int(v[row])} values)" for label, v in target.mixture.items() if v[row] >= 2],
                  metrics=_neuron_metrics(target, row), figures=figs, grids=sections)


def dictionary_rows(store: Store) -> list[dict]:
    """A row per finished dictionary of the store: its id, kind, layer, concepts and quality on held-out positions.

    The quality is what the dictionary stage stored (:meth:`~polypure.store.hdf5_store.Store.dictionary_attrs`):
    ``r2``, ``dead_share``, ``mean_active`` and ``n_heldout``; ``concepts`` is the trained ``n_concepts``.
    """
    import json

    from polypure.store import schema

    rows = []
    for dictionary_id in store.dictionary_ids():
        attrs = store.dictionary_attrs(dictionary_id)
        if not attrs.get(schema.COMPLETE_ATTR):
            continue
        settings = json.loads(attrs.get(schema.SIGNATURE_ATTR) or "{}")
        rows.append({"id": dictionary_id, "kind": attrs.get(schema.KIND_ATTR, "?"),
                     "layer": attrs.get(schema.LAYER_ATTR, "?"), "concepts": settings.get("n_concepts"),
                     **{key: attrs.get(key) for key in schema.QUALITY_ATTRS}})
    return rows


def _comparison_rows(rows: list[dict]) -> list[dict]:
    """The stored comparisons as the index's table shows them."""
    def spaces(r: dict) -> str:
        # a leaderboard compares across cluster methods: name the baseline's where it is another
        other = r.get("method_a") and r["method_a"] != r["method"]
        return f"{r['space_b']} vs {r['space_a']}" + (f" ({r['method_a']})" if other else "")

    return [{**r, "spaces": spaces(r), "p_text": comparisons.format_p(r["p_value"]),
             "p_holm_text": comparisons.format_p(r["p_holm"])} for r in rows]


def index_html(store: Store, store_path: Path, targets: list[Target], records: list[dict], notes: list[str], *,
               truth: dict | None, target_figs: dict[str, list[dict]], compared: tuple[list[dict], dict],
               compared_figs: list[dict]) -> str:
    """The HTML of the index.

    Parameters
    ----------
    store : Store
    store_path : Path
    targets : list of Target
        With their pages chosen.
    records : list of dict
        The summary table (:func:`polypure.evaluation.summary.read`).
    notes : list of str
        Shown at the top (such as why there are no thumbnails).
    truth : dict or None
        The ground-truth figure, where drawn.
    target_figs : dict of str to list of dict
        The figures of each target.
    compared : tuple of (list of dict, dict)
        The stored comparisons and their attributes (:func:`polypure.evaluation.comparisons.read`).
    compared_figs : list of dict
        The figures of the stored comparisons.

    Returns
    -------
    str
    """
    compared_rows, compared_attrs = compared
    compared = {"rows": _comparison_rows(compared_rows), "figures": compared_figs,
                "confidence": compared_attrs.get("confidence", 0.95), "forest_lines": figure_data.FOREST_LINES}
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
              "purity": bool(t.purity), "gain": bool(t.gain), "selectivity": bool(t.selectivity),
              "columns": _columns(t), "rows": _neuron_rows(t)} for t in targets]
    return render("index.html", title=f"polypure report: {store_path.name}", root="", sortable=True, store=about,
                  notes=notes, targets=shown, summary=_summary_groups(records, methods), truth=truth,
                  dictionaries=dictionary_rows(store),
                  target_figures={name: figs for name, figs in target_figs.items() if figs}, compared=compared)
