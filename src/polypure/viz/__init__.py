"""Views of a store.

:mod:`~polypure.viz.figure_data` reads what each figure shows from a store, :mod:`~polypure.viz.figures`
draws PNG and SVG figures from it, :mod:`~polypure.viz.imaging` makes thumbnails, grids and UMAP canvases,
and :mod:`~polypure.viz.report` writes the browsable HTML report, from the page model of
:mod:`~polypure.viz.report_model`, the manifest of :mod:`~polypure.viz.report_cache`, the thumbnails of
:mod:`~polypure.viz.thumbnails` and the templates of :mod:`~polypure.viz.report_render`.
"""
