"""The report stage: the browsable HTML report of the store (:func:`polypure.viz.report.write_report`).

It reads only the store (and, for thumbnails, the run's dataset), so it can also be written at any time
with ``polypure report STORE``. ``report.enabled: false`` skips it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polypure.pipeline.context import StageContext

NAME = "report"
WRITES = False  # it reads the committed store
HELP = "write the browsable HTML report of the store"


def run(ctx: StageContext) -> Path | None:
    """Write the report; returns its index page, or None when the config disables it."""
    from polypure.data.datasets import no_pixels_message
    from polypure.viz.report import write_report

    cfg = ctx.config.report
    if not cfg.enabled:
        ctx.log("report: disabled (report.enabled: false), skipped")
        return None
    if not ctx.dataset.has_pixels:
        ctx.log("report: no thumbnails: " + no_pixels_message("a thumbnail"))
    path = write_report(ctx.config.store_path, out=cfg.out, dataset=ctx.dataset, max_neurons=cfg.neurons,
                        view=cfg.view, progress=ctx.progress, neurons_key="report.neurons", cap=True)
    ctx.log(f"report: {path}")
    return path
