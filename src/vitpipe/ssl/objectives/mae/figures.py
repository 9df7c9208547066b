"""MAE's report figure. Imports of the report (matplotlib) wait for the call: training never pays them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitpipe.report.sections import FigureContext, Section


def reconstructions(ctx: FigureContext) -> Section | None:
    from vitpipe.report import figures

    if ctx.objective is None:
        return None
    png = figures.mae_reconstructions(ctx.objective, ctx.images, ctx.mean, ctx.std, ctx.out_dir / "reconstructions.png")
    return ("MAE reconstructions", "original | 75% of patches hidden | decoder output | output with the visible "
            "patches pasted back.", png)
