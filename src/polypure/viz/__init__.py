"""Views of a store.

:mod:`~polypure.viz.figures` draws PNG and SVG figures, :mod:`~polypure.viz.imaging` makes thumbnails,
grids and UMAP canvases, and :mod:`~polypure.viz.report` writes the browsable HTML report.
"""
