"""iGPT's report figure: completions of sample images (autoregressive runs only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vitpipe.report.sections import FigureContext, Section


def completions(ctx: FigureContext) -> Section | None:
    from PIL import Image

    from vitpipe.ssl.objectives.igpt.evals import completion_grid

    if ctx.objective is None or ctx.objective.config.task != "ar":
        return None
    with torch.no_grad():
        grid = completion_grid(ctx.objective, ctx.images[:6], torch.Generator().manual_seed(0))
    png = ctx.out_dir / "completions.png"
    Image.fromarray(grid).save(png)
    palette = ctx.objective.encoder().palette
    note = " (a greyscale palette: the data has one channel)" if palette.shape[1] == 1 else ""
    return ("Completions", f"Upper half given (lower half grey) | the model's completion, sampled at temperature 1 "
            f"| the image as the model sees it: {len(palette)} palette colours{note}.", png)
