"""Figures of a polypure store, each written as PNG and SVG.

The seed paper's distance matrices (Figure 2), correlation scatter (3a) and bars (3b), per-neuron UMAPs
with cluster image grids (Figure 4, PURE 1b), the ground-truth table, for the stored comparisons of
a metric between spaces a forest plot and a paired scatter, and per neuron the causal test of its split
(the drops of the selectivity stage).

Example
-------
>>> from polypure.viz.figures import space_bars                              # doctest: +SKIP
>>> space_bars("storage/demo.h5", "block_3", "clip", "figures")          # doctest: +SKIP
[PosixPath('figures/bars_block_3_clip.png'), PosixPath('figures/bars_block_3_clip.svg')]

Every function takes a :class:`~polypure.store.hdf5_store.Store` or the path of one, draws from what its
reader in :mod:`polypure.viz.figure_data` returns and nothing else (so that a hash of that tells whether a
figure is up to date), and draws on a bare :class:`matplotlib.figure.Figure` with the Agg canvas: no pyplot
state and no display, so figures can be made from worker processes and servers. The images inside figures
(thumbnails, grids, UMAP canvases) come from :mod:`polypure.viz.imaging`.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from polypure.evaluation.metrics import pairwise_distances
from polypure.viz import figure_data
from polypure.viz.imaging import mosaic, shrink, thumbnail, umap_canvas

#: Formats every figure function writes.
FORMATS = ("png", "svg")
#: References shown per cluster (the seed paper's Figure 4 shows the top 8).
TOP_PER_CLUSTER = 8

_NOISE_COLOUR = "#9a9a9a"
_LAYER_COLOURS = ("#1b6ca8", "#e07b00", "#2a9d3f", "#c8334a", "#7e57c2", "#8c564b", "#d459ad", "#17becf")
_CLUSTER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                    "#17becf", "#7f7f7f")


# ---------------------------------------------------------------------------------------------------
# names


def safe_name(text: str) -> str:
    """``text`` made safe as a file name (``block_3@planted`` -> ``block_3-planted``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-.") or "_"


# ---------------------------------------------------------------------------------------------------
# clusters


def top_per_cluster(labels: np.ndarray, count: int = TOP_PER_CLUSTER) -> dict[int, np.ndarray]:
    """Positions (in top-K order, so the most activating first) of the first ``count`` references per cluster."""
    out = {}
    for cluster in sorted(set(labels.tolist()), key=lambda c: (c < 0, c)):
        out[int(cluster)] = np.flatnonzero(labels == cluster)[:count]
    return out


def cluster_colour(cluster: int) -> str:
    """The colour of a cluster in every figure (grey for noise, label -1)."""
    return _NOISE_COLOUR if cluster < 0 else _CLUSTER_COLOURS[cluster % len(_CLUSTER_COLOURS)]


# ---------------------------------------------------------------------------------------------------
# writing


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_dir, stem: str, formats: Iterable[str] = FORMATS, dpi: int = 110) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # a fixed hash salt and no date keep the SVG identical from run to run
    with rc_context({"svg.hashsalt": "polypure", "svg.fonttype": "none"}):
        for fmt in formats:
            path = out_dir / f"{stem}.{fmt}"
            metadata = {"Date": None} if fmt == "svg" else None
            fig.savefig(path, format=fmt, dpi=dpi, metadata=metadata)
            paths.append(path)
    return paths


def _panel(ax, name: str) -> None:
    """Name an axes in the SVG (``id="panel-<name>"``), so tests and tools can find each panel."""
    ax.set_gid(f"panel-{safe_name(name)}")


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


# ---------------------------------------------------------------------------------------------------
# figures


def distance_matrices(store, target: str, neuron_row: int, reference: str, out_dir, *,
                      formats: Iterable[str] = FORMATS, stem: str | None = None) -> list[Path]:
    """Distance matrices of one neuron's references in a reference space and every relevance space.

    The seed paper's Figure 2: the Euclidean distances between the references in the reference space
    (``/embeddings/<reference>/<target>``), then at every attribution layer and in the activation space,
    each titled with its stored distance correlation with the reference.

    Parameters
    ----------
    store : Store or str or Path
    target : str
        A relevance target (``block_3``, ``logits``, ``block_3@planted``).
    neuron_row : int
        Row of the neuron in ``/relevance/<target>`` (not its channel id).
    reference : str
        An evaluator with stored embeddings (``clip``).
    out_dir : str or Path
    formats : iterable of str
        File formats to write.
    stem : str, optional
        File name without suffix (default ``distances_<target>_<neuron>_<reference>``).

    Returns
    -------
    list of Path
        The written files, one per format.
    """
    with figure_data.opened(store) as st:
        data = figure_data.distance_inputs(st, target, neuron_row, reference)
    neuron = data["neuron"]
    panels = [(f"{reference} (reference)", reference, data["reference"])]
    for space, features in data["features"].items():
        panels.append((f"{space}\nr = {_fmt(data['corr'][space])}", space, features))
    n_refs = len(panels[0][2])
    # a fixed layout instead of a layout engine: this figure is drawn for every neuron page of a report
    fig = _figure(2.3 * len(panels) + 0.3, 3.0, layout=None)
    fig.subplots_adjust(left=0.2 / len(panels), right=1 - 0.1 / len(panels), top=0.76, bottom=0.07, wspace=0.18)
    axes = fig.subplots(1, len(panels))
    for ax, (title, name, features) in zip(np.atleast_1d(axes), panels):
        ax.imshow(pairwise_distances(features), cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([0, n_refs - 1], ["1", str(n_refs)], fontsize=7)
        ax.set_yticks([0, n_refs - 1], ["1", str(n_refs)], fontsize=7)
        _panel(ax, name)
    # distances of different spaces have different units; only their pattern is compared
    fig.suptitle(f"{target} neuron {neuron}: distances between its {n_refs} references (top-K order; dark = "
                 "close, each panel on its own scale)", fontsize=10)
    paths = _save(fig, out_dir, stem or f"distances_{safe_name(target)}_{neuron}_{safe_name(reference)}", formats)
    return paths


def correlation_scatter(store, target: str, reference: str, out_dir, *, n_labels: int = 3,
                        formats: Iterable[str] = FORMATS, stem: str | None = None) -> list[Path]:
    """Per-neuron correlation of each earlier attribution layer against the last one (seed Figure 3a).

    x is the neuron's distance correlation with ``reference`` at the last attribution layer (the layer
    just below the target, PURE's choice), y the same at each earlier layer, one colour per layer;
    points above the dashed y = x line are neurons an earlier layer splits better.

    Parameters
    ----------
    store : Store or str or Path
    target : str
    reference : str
    out_dir : str or Path
    n_labels : int
        Neurons labelled by channel id: this many with the largest y - x per earlier layer, and this many
        with the highest x.
    formats : iterable of str
    stem : str, optional
        Default ``scatter_<target>_<reference>``.

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        If the target has fewer than two attribution layers or no correlations with ``reference``.
    """
    with figure_data.opened(store) as st:
        data = figure_data.scatter_inputs(st, target, reference)
    layers, corr, neurons = data["layers"], data["corr"], data["neurons"]
    if len(layers) < 2 or not all(layer in corr for layer in layers):
        raise ValueError(f"{target}: a scatter needs correlations with {reference!r} at two or more attribution "
                         f"layers (found {', '.join(s for s in layers if s in corr) or 'none'})")
    last, earlier = layers[-1], layers[:-1]
    x = corr[last]
    fig = _figure(5.6, 5.2)
    ax = fig.subplots()
    _panel(ax, "scatter")
    values = np.concatenate([x, *(corr[layer] for layer in earlier)])
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], "--", color="0.45", lw=1, label="y = x", zorder=1)
    labelled: dict[int, tuple[float, float]] = {}
    for i, layer in enumerate(earlier):
        y = corr[layer]
        ax.scatter(x, y, s=16, alpha=0.75, color=_LAYER_COLOURS[i % len(_LAYER_COLOURS)], label=layer,
                   edgecolors="none", zorder=2)
        gap = np.where(np.isfinite(y - x), y - x, -np.inf)
        for row in np.argsort(-gap, kind="stable")[:n_labels]:
            if gap[row] > 0 and row not in labelled:
                labelled[int(row)] = (float(x[row]), float(y[row]))
    best_y = np.fmax.reduce(np.stack([corr[layer] for layer in earlier]), axis=0)
    for row in np.argsort(-np.where(np.isfinite(x), x, -np.inf), kind="stable")[:n_labels]:
        if np.isfinite(x[row]) and row not in labelled:
            labelled[int(row)] = (float(x[row]), float(best_y[row]))
    for row, (px, py) in labelled.items():
        if np.isfinite(px) and np.isfinite(py):
            ax.annotate(f"#{int(neurons[row])}", (px, py), xytext=(4, 3), textcoords="offset points", fontsize=8,
                        zorder=3)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"correlation with {reference}: {last} (previous layer)")
    ax.set_ylabel(f"correlation with {reference}: earlier layer")
    ax.set_title(f"{target}: {len(x)} neurons", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    return _save(fig, out_dir, stem or f"scatter_{safe_name(target)}_{safe_name(reference)}", formats)


def space_bars(store, target: str, reference: str, out_dir, *, formats: Iterable[str] = FORMATS,
               stem: str | None = None) -> list[Path]:
    """Mean and standard deviation over neurons of the correlation with ``reference`` per space (seed Figure 3b).

    Parameters
    ----------
    store : Store or str or Path
    target : str
    reference : str
    out_dir : str or Path
    formats : iterable of str
    stem : str, optional
        Default ``bars_<target>_<reference>``.

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        If the store has no correlations of ``target`` with ``reference``.
    """
    with figure_data.opened(store) as st:
        data = figure_data.bars_inputs(st, target, reference)
    corr, layers = data["corr"], data["layers"]
    if not corr:
        raise ValueError(f"{target}: no distance correlations with {reference!r} in the store")
    names = list(corr)
    means = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in corr.values()])
    stds = np.array([np.nanstd(v) if np.isfinite(v).any() else np.nan for v in corr.values()])
    colours = [_LAYER_COLOURS[0] if n in layers else "#6c757d" if n == "activation" else "#e07b00" for n in names]
    fig = _figure(max(3.6, 0.85 * len(names) + 1.6), 3.8)
    ax = fig.subplots()
    _panel(ax, "bars")
    positions = np.arange(len(names))
    ax.bar(positions, np.nan_to_num(means), yerr=np.nan_to_num(stds), capsize=4, color=colours, width=0.65)
    for pos, mean, std in zip(positions, means, stds):
        # above the error bar, where the value never collides with the bar or the whisker
        top = (np.nan_to_num(mean) + np.nan_to_num(std)) if not np.isfinite(mean) or mean >= 0 else np.nan_to_num(mean)
        ax.annotate(_fmt(mean), (pos, top), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(positions, names, rotation=30 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center")
    ax.set_ylabel(f"correlation with {reference} distances")
    n = max(int(np.isfinite(v).sum()) for v in corr.values())
    ax.set_title(f"{target}: mean ± std over {n} neurons", fontsize=11)
    return _save(fig, out_dir, stem or f"bars_{safe_name(target)}_{safe_name(reference)}", formats)


_umap_cached = False


def _cache_umap_kernels() -> None:
    """Keep umap-learn's compiled numba kernels on disk across processes.

    umap-learn compiles its parallel kernels (k-nn, fuzzy simplicial set, layout epochs) without numba's
    disk cache, about 10 s on two cores at the first UMAP of every process; a report or a test would pay
    that each time. Turning the cache on for those dispatchers before their first call makes it a one-off.
    """
    global _umap_cached
    if _umap_cached:
        return
    _umap_cached = True
    try:
        import umap.layouts
        import umap.umap_
        import umap.utils
        from numba.core.caching import NullCache
        from numba.core.registry import CPUDispatcher
    except ImportError:
        return
    for module in (umap.umap_, umap.layouts, umap.utils):
        for kernel in list(vars(module).values()):
            if isinstance(kernel, CPUDispatcher) and isinstance(getattr(kernel, "_cache", None), NullCache):
                # a kernel numba cannot cache just compiles as before
                with contextlib.suppress(Exception):
                    kernel.enable_caching()


def umap_embedding(features: np.ndarray, random_state: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP of one neuron's reference vectors (umap-learn, Euclidean, seeded).

    ``n_neighbors`` is lowered to one less than the number of references, as UMAP requires. With fewer
    than four references (or all of them identical) there is no neighbourhood to learn, and the first two
    principal components stand in.
    """
    features = np.asarray(features, np.float64)
    if not np.isfinite(features).all():
        raise ValueError("the features have missing values (is the neuron's relevance complete?)")
    n = len(features)
    spread = np.ptp(features, axis=0).max() if n else 0.0
    if n < 4 or not spread > 0:
        centred = features - features.mean(0) if n else features
        coords = np.zeros((n, 2))
        if n and spread > 0:
            u, s, _ = np.linalg.svd(centred, full_matrices=False)
            k = min(2, len(s))
            coords[:, :k] = u[:, :k] * s[:k]
        return coords
    import umap

    _cache_umap_kernels()
    with warnings.catch_warnings():
        # umap warns that a fixed random_state disables parallelism, and about tiny graphs; both expected
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_neighbors=max(2, min(n_neighbors, n - 1)), n_components=2, metric="euclidean",
                            random_state=random_state, init="spectral" if n > 10 else "random")
        return reducer.fit_transform(features)


def neuron_umap(store, dataset, target: str, neuron_row: int, out_dir, method: str = "kmeans", *,
                spaces: Sequence[str] | None = None, view: str = "auto", thumb_size: int = 24,
                grid_size: int = 48, random_state: int = 0, formats: Iterable[str] = FORMATS,
                stem: str | None = None) -> list[Path]:
    """One neuron's references in every space: UMAP, clusters and top references (seed Figure 4, PURE Figure 1b).

    One row per space: the UMAP of the relevance vectors (one UMAP per space) with each reference's
    thumbnail framed in its cluster's colour (``/clusters/<target>/<space>/<method>``), then one image grid
    per cluster with its first :data:`TOP_PER_CLUSTER` references in top-K order (the most activating).

    Parameters
    ----------
    store : Store or str or Path
    dataset : polypure.data.datasets.PolypureDataset or None
        Supplies the images; None draws points only and no grids.
    target : str
    neuron_row : int
        Row of the neuron in ``/relevance/<target>``.
    out_dir : str or Path
    method : str
        Cluster method id whose labels colour the points.
    spaces : sequence of str, optional
        Default: the attribution layers, then ``activation``. Evaluator spaces (``clip``) are allowed.
    view : {"auto", "full", "crop"}
        Crop the thumbnails to ``/crops/<target>`` (``auto``: when the store has crops).
    thumb_size, grid_size : int
        Thumbnail sides in pixels at the UMAP points and in the cluster grids.
    random_state : int
        Seeds UMAP.
    formats : iterable of str
    stem : str, optional
        Default ``umap_<target>_<neuron>_<method>``.

    Returns
    -------
    list of Path
    """
    with figure_data.opened(store) as st:
        data = figure_data.umap_inputs(st, target, neuron_row, method, spaces, view)
    neuron, refs, features, labels = data["neuron"], data["refs"], data["features"], data["labels"]
    spaces = list(features)
    n_refs = len(refs)
    boxes_row = data["boxes"] if data["boxes"] is not None else [None] * n_refs
    small = big = None
    if dataset is not None:
        big = [thumbnail(dataset, int(i), box, size=grid_size) for i, box in zip(refs, boxes_row)]
        small = [shrink(img, thumb_size) for img in big]
    clustered = {s for s, lab in labels.items() if lab is not None}
    # an unclustered space is drawn as one group, so its references still show
    labels = {s: lab if lab is not None else np.zeros(n_refs, np.int64) for s, lab in labels.items()}
    groups = {s: top_per_cluster(lab) for s, lab in labels.items()}
    columns = 1 + (max(len(g) for g in groups.values()) if big is not None else 0)
    row_height = 3.0
    # the UMAP gets a square panel, each cluster grid (2 x 4 thumbnails) one twice as wide; a fixed layout
    # rather than a layout engine, because a report draws this figure for every neuron page
    width, height = row_height * (1.0 + 2.0 * (columns - 1)) + 0.5, row_height * len(spaces) + 0.6
    fig = _figure(width, height, layout=None)
    grid = fig.add_gridspec(len(spaces), columns, width_ratios=[1.0] + [2.0] * (columns - 1),
                            left=0.15 / width, right=1 - 0.15 / width, bottom=0.1 / height,
                            top=1 - 0.6 / height, wspace=0.08, hspace=0.14)
    for r, space in enumerate(spaces):
        coords = umap_embedding(features[space], random_state=random_state)
        ax = fig.add_subplot(grid[r, 0])
        _panel(ax, f"umap-{space}")
        colours = [cluster_colour(c) for c in labels[space]]
        if small is None:
            ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=18)
            _pad_limits(ax, coords)
        else:
            # one composited raster instead of an artist per thumbnail: ten times faster to save, small SVGs
            ax.imshow(umap_canvas(coords, small, colours), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{space}: UMAP ({method if space in clustered else 'not clustered'})", fontsize=9)
        if big is None:
            continue
        for c, (cluster, positions) in enumerate(groups[space].items()):
            cax = fig.add_subplot(grid[r, 1 + c])
            _panel(cax, f"grid-{space}-{cluster}")
            cax.imshow(mosaic([big[p] for p in positions]), interpolation="nearest")
            cax.set_xticks([])
            cax.set_yticks([])
            for spine in cax.spines.values():
                spine.set_edgecolor(cluster_colour(cluster))
                spine.set_linewidth(3)
            count = int((labels[space] == cluster).sum())
            name = "noise" if cluster < 0 else f"cluster {cluster}" if space in clustered else "all"
            cax.set_title(f"{space} {name}: {count} of {n_refs} refs", fontsize=9)
    fig.suptitle(f"{target} neuron {neuron}: references by space", fontsize=11, y=1 - 0.1 / height)
    return _save(fig, out_dir, stem or f"umap_{safe_name(target)}_{neuron}_{safe_name(method)}", formats, dpi=100)


def _pad_limits(ax, coords: np.ndarray) -> None:
    """Leave a margin around the outermost points, so that none is cut by the frame."""
    if not len(coords):
        return
    lo, hi = coords.min(0), coords.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    ax.set_xlim(lo[0] - 0.12 * span[0], hi[0] + 0.12 * span[0])
    ax.set_ylim(lo[1] - 0.12 * span[1], hi[1] + 0.12 * span[1])


def ground_truth_table(store, out_dir, method: str | None = None, *, formats: Iterable[str] = FORMATS,
                       stem: str = "ground_truth") -> list[Path]:
    """The ground-truth scores of the summary table as annotated heatmaps (groups x spaces, ARI mean ± std).

    One panel per label set (``ARI planted``, ``ARI shape``, ...), each with the groups that have it.

    Parameters
    ----------
    store : Store or str or Path
    out_dir : str or Path
    method : str, optional
        Cluster method id (default: the first in the table).
    formats : iterable of str
    stem : str

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        If ``/metrics/summary`` has no ARI rows.
    """
    with figure_data.opened(store) as st:
        data = figure_data.truth_inputs(st)
    records, targets, layer_order = data["records"], data["targets"], data["layers"]
    if not records:
        raise ValueError("the store's summary table has no ground-truth (ARI) rows")
    method = method or records[0]["method"]
    records = [r for r in records if r["method"] == method]
    if not records:
        raise ValueError(f"the summary table has no ARI rows for cluster method {method!r}")
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    found = list(dict.fromkeys(r["space"] for r in records))
    layers = list(dict.fromkeys(layer for target in targets for layer in layer_order[target]))
    # layers lowest first across all targets, then activation, then evaluator spaces
    spaces = [s for s in layers if s in found] + [s for s in ("activation",) if s in found]
    spaces += [s for s in found if s not in spaces]
    panels = []
    for metric in metrics:
        rows = [r for r in records if r["metric"] == metric]
        groups = list(dict.fromkeys(r["group"] for r in rows if r["n"] > 0))
        cells = {(r["group"], r["space"]): r for r in rows}
        mean = np.full((len(groups), len(spaces)), np.nan)
        std = np.full_like(mean, np.nan)
        for i, group in enumerate(groups):
            for j, space in enumerate(spaces):
                cell = cells.get((group, space))
                if cell is not None and cell["n"] > 0:
                    mean[i, j], std[i, j] = cell["mean"], cell["std"]
        if groups:
            panels.append((metric, groups, mean, std))
    label_width = max(len(g) for _, groups, _, _ in panels for g in groups)
    fig = _figure(1.15 * len(spaces) + 0.09 * label_width + 1.8,
                  sum(0.42 * len(groups) + 0.75 for _, groups, _, _ in panels) + 0.4)
    grid = fig.add_gridspec(len(panels), 1, height_ratios=[len(groups) + 1.6 for _, groups, _, _ in panels])
    for k, (metric, groups, mean, std) in enumerate(panels):
        ax = fig.add_subplot(grid[k])
        _panel(ax, metric)
        shown = np.ma.masked_invalid(mean)
        image = ax.imshow(shown, cmap=colormaps["viridis"].with_extremes(bad="#eeeeee"),
                          vmin=min(0.0, float(np.nanmin(mean))), vmax=1.0, aspect="auto")
        for i in range(len(groups)):
            for j in range(len(spaces)):
                if np.isfinite(mean[i, j]):
                    ax.text(j, i, f"{mean[i, j]:.2f}\n± {std[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if mean[i, j] > 0.55 else "white")
        ax.set_xticks(range(len(spaces)), spaces, fontsize=8)
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(f"{metric} (clusters: {method})", fontsize=10)
        fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04).ax.tick_params(labelsize=6)
    return _save(fig, out_dir, stem, formats)


def comparison_forest(store, metric: str, out_dir, *, formats: Iterable[str] = FORMATS,
                      stem: str | None = None) -> list[Path]:
    """The stored comparisons of one metric as a forest plot: difference and interval per comparison.

    One line per stored comparison (``/comparisons``) of ``metric``: group of neurons, cluster method and
    the two spaces, with the mean difference ``space - baseline`` over the neurons and its bootstrap
    interval; filled where the Holm-adjusted p-value is below 0.05.

    Parameters
    ----------
    store : Store or str or Path
    metric : str
        A metric label (``ARI shape``, ``gain clip``).
    out_dir : str or Path
    formats : iterable of str
    stem : str, optional
        Default ``forest_<metric>``.

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        If the store has no comparisons of ``metric``.
    """
    with figure_data.opened(store) as st:
        data = figure_data.forest_inputs(st, metric)
    rows = data["rows"]
    if not rows:
        raise ValueError(f"the store has no stored comparisons of {metric!r}")
    spaces = list(dict.fromkeys(r["space_b"] for r in rows))
    fig = _figure(8.0, 0.26 * len(rows) + 1.5)
    ax = fig.subplots()
    _panel(ax, "forest")
    positions = np.arange(len(rows))[::-1]
    for y, r in zip(positions, rows):
        colour = _LAYER_COLOURS[spaces.index(r["space_b"]) % len(_LAYER_COLOURS)]
        if np.isfinite(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=colour, lw=1.4)
        significant = np.isfinite(r["p_holm"]) and r["p_holm"] < 0.05
        ax.plot([r["mean_diff"]], [y], "o", color=colour, markerfacecolor=colour if significant else "white", ms=5)
    ax.axvline(0, color="0.4", lw=0.8, ls="--")
    labels = [f"{r['group']} · {r['method'] + ' · ' if r['method'] else ''}{r['space_b']} vs {r['space_a']}"
              + (f" ({r['method_a']})" if r.get("method_a") and r["method_a"] != r["method"] else "") for r in rows]
    ax.set_yticks(positions, labels, fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"mean difference, space - baseline,\nwith its {data['confidence']:.0%} bootstrap interval\n"
                  "(filled: Holm-adjusted p < 0.05)".replace("%", " %"), fontsize=8)
    shown = "" if data["total"] == len(rows) else f"\n(the largest differences: {len(rows)} of {data['total']})"
    ax.set_title(f"{metric}, paired over neurons{shown}", fontsize=10)
    return _save(fig, out_dir, stem or f"forest_{safe_name(metric)}", formats)


def paired_scatter(store, metric: str, out_dir, *, formats: Iterable[str] = FORMATS,
                   stem: str | None = None) -> list[Path]:
    """Per-neuron values of one metric, baseline against each space, for its first stored group and method.

    A panel per stored comparison of the first target, group of neurons and cluster method that the
    comparisons of ``metric`` have: x the neuron's value in the baseline (``space_a``), y in the other
    space, with the y = x line (points above it: the space scores higher). Bounded to that one group and
    method, so that a report has one such figure per metric.

    Parameters
    ----------
    store : Store or str or Path
    metric : str
    out_dir : str or Path
    formats : iterable of str
    stem : str, optional
        Default ``paired_<metric>``.

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        If the store has no comparisons of ``metric``.
    """
    with figure_data.opened(store) as st:
        data = figure_data.paired_inputs(st, metric)
    rows = data["rows"]
    if not rows:
        raise ValueError(f"the store has no stored comparisons of {metric!r}")
    values = data["values"]
    # a leaderboard compares dozens of spaces: panels wrap into rows of at most six
    columns = min(6, len(rows))
    lines = -(-len(rows) // columns)
    fig = _figure(2.9 * columns + 0.4, 3.3 * lines)
    axes = fig.subplots(lines, columns, squeeze=False).ravel()
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    for ax, r in zip(axes, rows):
        _panel(ax, f"{r['space_b']}-{r['space_a']}")
        x, y = values.get(r["space_a"]), values.get(r["space_b"])
        if x is None or y is None:
            continue
        finite = np.concatenate([x, y])
        finite = finite[np.isfinite(finite)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="0.45", lw=1)
        ax.scatter(x, y, s=14, alpha=0.75, color=_LAYER_COLOURS[0], edgecolors="none")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{r['space_a']} (baseline)", fontsize=8)
        ax.set_ylabel(r["space_b"], fontsize=8)
        ax.set_title(f"n = {r['n']}, difference {_fmt(r['mean_diff'])}", fontsize=9)
        ax.tick_params(labelsize=7)
    method = f", clusters: {data['method']}" if data["method"] else ""
    fig.suptitle(f"{metric} per neuron: {data['group']}{method}", fontsize=10)
    return _save(fig, out_dir, stem or f"paired_{safe_name(metric)}", formats)


def selectivity_bars(store, target: str, neuron_row: int, out_dir, method: str = "kmeans", *,
                     formats: Iterable[str] = FORMATS, stem: str | None = None) -> list[Path]:
    """One neuron's causal test of its split: per cluster, the drop its circuit's ablation causes (selectivity stage).

    A panel per tested space (an attribution layer or a dictionary): for each cluster of ``method``'s
    clustering there, the mean relative drop of the neuron's activation when the cluster's circuit is ablated
    (channels zeroed, or a dictionary's concepts subtracted), on the cluster's own references (its colour) and
    on the other clusters' (grey); a short black line over each bar is the same drop for random sets of as many
    channels or concepts (the null). A real split has tall own bars, low other bars, and lines well below the
    own bars. The title holds the selectivity (own minus other, averaged over the clusters) and its null.

    Parameters
    ----------
    store : Store or str or Path
    target : str
    neuron_row : int
        The neuron's row in the target.
    out_dir : str or Path
    method : str
        Cluster method id.
    formats : iterable of str
    stem : str, optional
        Default ``<neuron>_selectivity``.

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        If the store has no selectivity of ``target`` for ``method``.
    """
    with figure_data.opened(store) as st:
        data = figure_data.selectivity_inputs(st, target, neuron_row, method)
    spaces = data["spaces"]
    if not spaces:
        raise ValueError(f"{target}: no selectivity of the {method!r} clusters in the store (run the selectivity "
                         "stage)")
    fig = _figure(2.5 * len(spaces) + 0.5, 3.0)
    axes = fig.subplots(1, len(spaces), squeeze=False, sharey=True).ravel()
    for ax, (space, found) in zip(axes, spaces.items()):
        _panel(ax, space)
        drops = found["drops"]
        scored = [c for c in range(len(drops)) if np.isfinite(drops[c]).all()]
        for position, c in enumerate(scored):
            own, other, null_own, null_other = drops[c]
            ax.bar([position - 0.19, position + 0.19], [own, other], width=0.36,
                   color=[cluster_colour(c), "#b5b5b5"], edgecolor="white")
            for x, null in ((position - 0.19, null_own), (position + 0.19, null_other)):
                ax.plot([x - 0.17, x + 0.17], [null, null], color="black", lw=1.4)
        if not scored:
            ax.text(0.5, 0.5, "no score", ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(scored)), [f"cluster {c}" for c in scored], fontsize=8)
        ax.set_xlim(-0.6, max(len(scored), 1) - 0.4)
        ax.set_title(f"{space}: s = {_fmt(found['selectivity'])}, null {_fmt(found['null'])}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("relative drop of activation\n(own: colour, others: grey; line: random)", fontsize=8)
    fig.suptitle(f"{target} neuron {data['neuron']}: ablating each cluster's circuit (clusters: {method})", fontsize=10)
    return _save(fig, out_dir, stem or f"{data['neuron']}_selectivity", formats)
