"""The HTML report: a self-contained folder whose links all resolve, rendered for real in headless Chromium.

Also: neuron pages for the chosen neurons, crops, and grace with missing data and missing store sections.
"""

from __future__ import annotations

import ast
import copy
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import h5py
import numpy as np
import pytest
from PIL import Image

from polypure.evaluation import comparisons
from polypure.store.hdf5_store import Store
from polypure.viz import figure_data, figures, imaging, report_cache
from polypure.viz.report import FIGURES as SPECS
from polypure.viz.report import write_report
from polypure.viz.thumbnails import THUMB_SIZE

from .helpers import chromium, screenshot


class _Links(HTMLParser):
    """Every href / src of a page, the ids it defines, and its external resources."""

    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key) is not None:
                self.links.append((tag, key, attrs[key]))


def parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def check_links(folder: Path) -> dict[Path, _Links]:
    """Every link of every page points to a file of the folder (and to an id of it, for #fragments)."""
    pages = {page: parse(page) for page in folder.rglob("*.html")}
    for page, parsed in pages.items():
        for _, key, link in parsed.links:
            assert not re.match(r"^[a-z]+:", link), f"{page.name}: external or absolute {key} {link!r}"
            target, _, fragment = link.partition("#")
            resolved = (page.parent / unquote(target)).resolve() if target else page.resolve()
            assert resolved.is_file(), f"{page.relative_to(folder)}: {link!r} does not exist"
            assert folder.resolve() in resolved.parents, f"{link!r} leaves the report folder"
            if fragment:
                ids = pages[resolved].ids if resolved in pages else parse(resolved).ids
                assert fragment in ids, f"{page.relative_to(folder)}: no id {fragment!r} for {link!r}"
    return pages


@pytest.fixture(scope="module")
def built(figure_store):
    return figure_store


@pytest.fixture(scope="module")
def report(built, tmp_path_factory):
    path, dataset = built
    out = tmp_path_factory.mktemp("report") / "rep"
    index = write_report(path, out=out, dataset=dataset, max_neurons=2, progress=False)
    return index


def test_report_folder_has_index_neuron_pages_and_images_and_every_link_resolves(report, built):
    path, _ = built
    folder = report.parent
    assert report.name == "index.html" and report.is_file()
    pages = check_links(folder)
    with h5py.File(path, "r") as f:
        targets = {name: f[f"relevance/{name}/neurons"][()] for name in f["relevance"]}
    for target, neurons in targets.items():
        slug = target.replace("@", "-")
        written = sorted(p.stem for p in (folder / "neurons" / slug).glob("*.html"))
        assert len(written) == min(2, len(neurons)) and set(map(int, written)) <= set(neurons.tolist())
    index_links = [link for _, _, link in pages[report.resolve()].links]
    assert sum(link.startswith("neurons/c3/") and link.endswith(".html") for link in index_links) == 2
    assert any(link.endswith("ground_truth.png") for link in index_links)
    assert any(link.endswith("scatter_c3_labels.svg") for link in index_links)
    neuron_page = next((folder / "neurons" / "c3").glob("*.html"))
    srcs = [link for tag, _, link in pages[neuron_page.resolve()].links if tag == "img"]
    assert any("_umap.png" in s for s in srcs) and any("_distances_labels.png" in s for s in srcs)
    assert any("_selectivity.png" in s for s in srcs)
    page = neuron_page.read_text()
    assert "selectivity circuit" in page and "selectivity null" in page and "is the split real?" in page
    assert sum("/thumbs/" in s for s in srcs) >= 8
    assert not list(folder.rglob("*.svg")) or all(p.stat().st_size > 0 for p in folder.rglob("*.svg"))


def test_index_lists_every_neuron_and_links_only_those_with_a_page(report, built):
    path, _ = built
    text = report.read_text()
    table = text[text.index('id="neurons-c3"'):]
    table = table[:table.index("</table>")]
    with h5py.File(path, "r") as f:
        neurons = f["relevance/c3/neurons"][()]
    assert table.count("<tr>") == len(neurons) + 1
    assert len(re.findall(r'<a href="neurons/c3/\d+\.html">', table)) == 2
    assert table.count('class="nolink"') == len(neurons) - 2
    assert "corr labels: c2" in table and "c1 − c2 (labels)" in table and "ARI class: c1" in table
    assert "<script" in text and "http" not in re.sub(r"<p class=\"meta\">.*?</p>", "", text)


def test_without_data_the_report_says_so_and_still_has_pages(built, tmp_path):
    path, _ = built
    index = write_report(path, out=tmp_path / "r", max_neurons=1, progress=False)
    text = index.read_text()
    assert "No thumbnails" in text and "data.kind: memory" in text
    assert not (tmp_path / "r" / "thumbs").exists()
    page = next((tmp_path / "r" / "neurons" / "c3").glob("*.html"))
    assert "No thumbnails" in page.read_text()
    check_links(tmp_path / "r")


def test_a_store_without_embeddings_clusters_or_metrics_gives_a_smaller_report(built, tmp_path):
    path, dataset = built
    bare = tmp_path / "bare.h5"
    shutil.copy(path, bare)
    with h5py.File(bare, "a") as f:
        for group in ("embeddings", "clusters", "metrics"):
            del f[group]
    index = write_report(bare, dataset=dataset, max_neurons=1, progress=False)
    assert index == tmp_path / "bare_report" / "index.html"
    text = index.read_text()
    assert "no summary table" in text and "Neurons of c3" in text
    check_links(index.parent)


def test_pages_go_to_the_neurons_an_earlier_layer_splits_best_and_the_best_correlated(report, built):
    path, _ = built
    with h5py.File(path, "r") as f:
        neurons = f["relevance/c3/neurons"][()]
        c1, c2 = (f[f"metrics/c3/distance_correlation/labels/{s}"][()] for s in ("c1", "c2"))
    pages = {int(p.stem) for p in (report.parent / "neurons" / "c3").glob("*.html")}
    assert len(pages) == 2 and {int(neurons[np.nanargmax(c1 - c2)]), int(neurons[np.nanargmax(c2)])} <= pages


def test_crop_view_shows_the_stored_crops(built, tmp_path):
    path, dataset = built
    cropped = tmp_path / "crops.h5"
    shutil.copy(path, cropped)
    with h5py.File(cropped, "a") as f:
        m, n_refs = f["relevance/c3/activation"].shape[:2]
        boxes = np.tile(np.array([0, 8, 16, 24], np.int64), (m, n_refs, 1))
        boxes[:, 1] = -1                                   # the second reference of each neuron: whole image
        f["crops/c3"] = boxes
    index = write_report(cropped, out=tmp_path / "crop", dataset=dataset, max_neurons=1, progress=False)
    page = next((index.parent / "neurons" / "c3").glob("*.html")).read_text()
    row = int(re.search(r"thumbs/c3/(\d+)_0\.png", page).group(1))
    with h5py.File(cropped, "r") as f:
        sample = int(f["topk/c3/indices"][f["relevance/c3/neurons"][row], 0])
    with Image.open(index.parent / f"thumbs/c3/{row}_0.png") as img:
        expected = figures.thumbnail(dataset, sample, boxes[row, 0], size=THUMB_SIZE)
        np.testing.assert_array_equal(np.asarray(img), expected)
    assert re.search(r'src="\.\./\.\./thumbs/\d+\.png"', page)            # the uncropped one
    full = write_report(cropped, out=tmp_path / "full", dataset=dataset, max_neurons=1, view="full", progress=False)
    assert not (full.parent / "thumbs" / "c3").exists()


# -- a real browser ------------------------------------------------------------------------------------


def test_report_renders_in_headless_chromium(report, tmp_path):
    index_img = screenshot(tmp_path, report, "report_index.png")
    page = sorted((report.parent / "neurons" / "c3").glob("*.html"))[0]
    neuron_img = screenshot(tmp_path, page, "report_neuron.png")
    for img in (index_img, neuron_img):
        assert img.size == (1280, 1600)
        pixels = np.asarray(img)
        assert pixels.std() > 20                                    # not one uniform colour
        assert len(img.getcolors(1 << 22)) > 500                    # text, tables and pictures
    # the neuron page's random-pixel thumbnails: thousands of colours in its upper half
    assert len(neuron_img.crop((0, 0, 1280, 1600)).getcolors(1 << 22)) > 5000

    dom = chromium(tmp_path, "--dump-dom", report.as_uri()).stdout
    assert "Neurons of c3" in dom and "corr labels: c2" in dom and "ARI planted" in dom
    assert 'title="click to sort"' in dom                          # the inline script ran
    assert "<img" in chromium(tmp_path, "--dump-dom", page.as_uri()).stdout


def test_clicking_a_column_header_sorts_the_neuron_table(report, tmp_path):
    # the report's own script, then a click on the c1 correlation header of the c3 table
    text = report.read_text()
    click = ("<script>var t=document.getElementById('neurons-c3');"
             "var h=Array.prototype.find.call(t.tHead.rows[0].cells,function(c){return c.textContent=="
             "'corr labels: c1';});h.click();h.click();</script></body>")
    probe = report.parent / "probe.html"
    probe.write_text(text.replace("</body>", click))
    dom = chromium(tmp_path, "--dump-dom", probe.as_uri()).stdout
    table = dom[dom.index('id="neurons-c3"'):]
    table = table[:table.index("</table>")]
    header = re.findall(r"<th[^>]*>(.*?)</th>", table)
    column = header.index("corr labels: c1")
    values = []
    for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]:
        cell = re.findall(r'<td data-v="([^"]*)"', row)[column]
        values.append(float(cell) if cell else np.nan)
    finite = [v for v in values if np.isfinite(v)]
    assert finite == sorted(finite, reverse=True) and len(finite) >= 2     # two clicks: descending
    assert all(np.isnan(v) for v in values[len(finite):])                  # missing values last


def test_comparison_section_renders_its_figures_and_every_stored_row(report, built, tmp_path):
    path, _ = built
    with Store(path) as store:
        rows, attrs = comparisons.read(store)
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    assert len(rows) > 0 and "gain labels" in metrics and attrs["n_resamples"] == 2000
    # after loading, the page writes the width of each comparison figure as the browser decoded it
    probe = report.parent / "probe_comparisons.html"
    script = ("<script>window.addEventListener('load',function(){var w=[];document.querySelectorAll("
              "'#comparison-figures img').forEach(function(i){w.push(i.naturalWidth);});"
              "document.body.setAttribute('data-widths',w.join(','));});</script></body>")
    probe.write_text(report.read_text().replace("</body>", script))
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    section = dom[dom.index('<h2 id="comparisons">'):]
    section = section[:section.index("<h2", 5)]
    images = re.findall(r'<img src="(figures/[^"]+)"', section)
    assert images == [f"figures/{kind}_{figures.safe_name(m)}.png" for m in metrics for kind in ("forest", "paired")]
    widths = [int(w) for w in re.search(r'data-widths="([^"]*)"', dom).group(1).split(",")]
    assert len(widths) == len(images) and min(widths) > 100
    table = section[section.index('id="comparison-table"'):section.index("</table>")]
    body = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)[1:]
    assert len(body) == len(rows)
    first = re.findall(r"<td[^>]*>(.*?)</td>", body[0], flags=re.S)
    assert first[:4] == [rows[0]["group"], rows[0]["metric"], rows[0]["method"],
                         f"{rows[0]['space_b']} vs {rows[0]['space_a']}"]
    assert first[10] == comparisons.format_p(rows[0]["p_holm"])
    assert "mono-topK is monosemanticity restricted to each neuron's top-K references" in " ".join(section.split())
    # the neuron table shows the purity scores and split gains
    neurons = dom[dom.index('id="neurons-c3"'):]
    header = re.findall(r"<th[^>]*>(.*?)</th>", neurons[:neurons.index("</tr>")])
    assert {"clarity labels", "mono-topK labels", "redundancy labels", "gain labels: c1"} <= set(header)


# -- writing again: only what changed -------------------------------------------------------------------


FIGURES = ("distance_matrices", "correlation_scatter", "space_bars", "neuron_umap", "ground_truth_table",
           "comparison_forest", "paired_scatter", "selectivity_bars")


@pytest.fixture
def drawn(monkeypatch):
    """The calls of every figure function and of the thumbnail the report writes, by name and first arguments."""
    calls = []
    for module, name in [*((figures, name) for name in FIGURES), (imaging, "thumbnail")]:
        original = getattr(module, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, *[a for a in args[:4] if isinstance(a, (str, int))]))
            return _original(*args, **kwargs)

        counting.__name__ = name
        monkeypatch.setattr(module, name, counting)
    return calls


def pages_and_times(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*.html")}


def subset_rows(f: h5py.File, target: str, keep: np.ndarray) -> None:
    """Keep only some rows (neurons) of a target, in every dataset of the store that has one per neuron."""
    m = len(f[f"relevance/{target}/neurons"])
    found = []
    for root in (f"relevance/{target}", f"clusters/{target}", f"metrics/{target}", f"crops/{target}"):
        if root in f:
            f[root].visititems(lambda n, o, root=root: found.append(f"{root}/{n}") if isinstance(o, h5py.Dataset)
                               else None)
    for name in f.get("embeddings", {}):
        if target in f[f"embeddings/{name}"]:
            found.append(f"embeddings/{name}/{target}")
    for path in found:
        data = f[path]
        if data.shape[:1] == (m,):
            attrs = dict(data.attrs)
            values = data[()][keep]
            del f[path]
            f[path] = values
            f[path].attrs.update(attrs)


def test_writing_again_draws_only_what_changed_and_removes_stale_pages(built, tmp_path, drawn):
    path, dataset = built
    store = tmp_path / "s.h5"
    shutil.copy(path, store)
    out = tmp_path / "rep"
    write_report(store, out=out, dataset=dataset, max_neurons=2, progress=False)
    first = list(drawn)
    assert {c[0] for c in first} == {*FIGURES, "thumbnail"}
    times = pages_and_times(out)

    drawn.clear()
    write_report(store, out=out, dataset=dataset, max_neurons=2, progress=False)
    assert drawn == []                                              # nothing to redraw
    assert pages_and_times(out) == times                            # and no page rewritten

    with h5py.File(store, "a") as f:                                # new clusters for one target
        for space in f["clusters/logits"]:
            labels = f[f"clusters/logits/{space}/kmeans"]
            labels[...] = 1 - labels[()]
            labels[:, 0] = 2
    drawn.clear()
    write_report(store, out=out, dataset=dataset, max_neurons=2, progress=False)
    assert drawn and {c[0] for c in drawn} == {"neuron_umap"} and {c[1] for c in drawn} == {"logits"}
    now = pages_and_times(out)
    changed = {page for page in now if now[page] != times[page]}
    assert changed and all(page.startswith("neurons/logits/") for page in changed)

    with h5py.File(store, "a") as f:                                # one target gone, another one shrinks
        for group in ("relevance", "clusters", "metrics", "topk"):
            for name in [n for n in f[group] if n.startswith("c3@planted")]:
                del f[f"{group}/{name}"]
        for name in f["embeddings"]:
            f[f"embeddings/{name}"].pop("c3@planted", None)
        kept = f["relevance/c3/neurons"][[0, 1]]
        subset_rows(f, "c3", np.array([0, 1]))
    write_report(store, out=out, dataset=dataset, max_neurons=2, progress=False)
    assert not (out / "neurons" / "c3-planted").exists()
    assert sorted(int(p.stem) for p in (out / "neurons" / "c3").glob("*.html")) == sorted(kept.tolist())
    assert sorted(p.name.split("_")[0] for p in (out / "neurons" / "c3" / "fig").glob("*.png")) == \
        sorted(str(n) for n in kept.tolist() for _ in ("labels", "classes", "umap", "selectivity"))
    check_links(out)
    with h5py.File(store, "r") as f:
        samples = {int(s) for t in ("c3", "logits") for s in f[f"topk/{t}/indices"][f[f"relevance/{t}/neurons"][()]].ravel()}
    assert {int(p.stem) for p in (out / "thumbs").glob("*.png")} <= samples


def test_text_from_the_store_is_shown_as_text_never_as_markup(built, tmp_path):
    path, dataset = built
    store = tmp_path / "<b>&'store\".h5"
    shutil.copy(path, store)
    hostile = [f"<script>alert({i})</script>" for i in range(len(dataset))]
    with h5py.File(store, "a") as f:
        f["samples/ids"][...] = hostile
        f["samples/labels"].attrs["classes"] = ["<i>zero</i>", "one & <b>", "two\"'"]
    renamed = copy.copy(dataset)
    renamed.ids = hostile                                    # the same samples under the store's new ids
    index = write_report(store, out=tmp_path / "r", dataset=renamed, max_neurons=1, progress=False)
    pages = check_links(index.parent)
    for page in pages:
        text = page.read_text()
        assert "<script>alert" not in text and "<i>zero" not in text and "<b>&" not in text
        tags = []
        parser = HTMLParser()
        parser.handle_starttag = lambda tag, attrs, tags=tags: tags.append(tag)
        parser.feed(text)
        assert set(tags) <= {"html", "head", "meta", "title", "style", "body", "nav", "a", "main", "h1", "h2", "h3",
                             "h4", "p", "table", "thead", "tbody", "tr", "th", "td", "div", "span", "figure", "img",
                             "figcaption", "br", "script"}
        assert tags.count("script") == (page == index)       # only the report's own sorting script
    assert "polypure report: &lt;b&gt;&amp;" in index.read_text()
    page = next((index.parent / "neurons" / "c3").glob("*.html")).read_text()
    assert "&lt;script&gt;alert(" in page and ("class &lt;i&gt;zero&lt;/i&gt;" in page or "one &amp; &lt;b&gt;" in page)


def test_every_figure_of_the_report_has_a_reader_and_a_drawing_function():
    assert sorted(spec.figure for spec in SPECS) == sorted(figure_data.READERS) == sorted(FIGURES)
    assert all(callable(getattr(figures, spec.figure)) for spec in SPECS)
    assert {spec.scope for spec in SPECS} == {"store", "metric", "reference", "neuron"}


def test_the_code_key_covers_every_module_that_draws_and_changes_with_any_of_them(tmp_path, monkeypatch):
    viz = Path(report_cache.__file__).parent
    drawing = set()
    for path in viz.glob("*.py"):
        modules = {alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                   for alias in node.names}
        modules |= {node.module or "" for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom)}
        modules |= {f"polypure.viz.{alias.name}" for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module == "polypure.viz" for alias in node.names}
        # matplotlib and PIL draw; the image helpers draw the thumbnails
        if any(m.split(".")[0] in ("matplotlib", "PIL") or m == "polypure.viz.imaging" for m in modules):
            drawing.add(path.stem)
    assert {"figures", "imaging", "thumbnails"} <= drawing
    assert drawing <= set(report_cache.DRAWING_MODULES)
    # the key is of the files' text: an edit to any of them gives another key
    copied = tmp_path / "viz"
    shutil.copytree(viz, copied)
    monkeypatch.setattr(report_cache, "__file__", str(copied / "report_cache.py"))
    before = report_cache.code_key()
    for name in report_cache.DRAWING_MODULES:
        path = copied / f"{name}.py"
        path.write_text(path.read_text() + "\n# edited\n")
        after = report_cache.code_key()
        assert after != before, name
        before = after
