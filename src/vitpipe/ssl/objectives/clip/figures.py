"""CLIP's report figures, drawn from what its evals left in RUN/eval/ (nothing when they never ran).
Imports of the report (matplotlib) wait for the call: training never pays them."""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING
from vitpipe.runlayout import RunLayout

if TYPE_CHECKING:
    from vitpipe.report.sections import FigureContext, Section


def zero_shot_confusion(ctx: FigureContext) -> Section | None:
    from vitpipe.report import figures

    path = RunLayout(ctx.run_dir).result("zero-shot")
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    png = figures.confusion_matrix(result["confusion"], result["classes"], ctx.out_dir / "zero_shot_confusion.png")
    return ("Zero-shot confusion", f"Rows: true class, columns: the class whose prompts scored highest "
            f"(top-1 {result['top1']:.3f}, chance {result['chance']:.3f}).", png)


def text_query_grid(ctx: FigureContext) -> Section | None:
    grid = RunLayout(ctx.run_dir).eval / "retrieval-text" / "query_text.png"
    if not grid.is_file():
        return None
    png = ctx.out_dir / "retrieval_text_query.png"
    shutil.copyfile(grid, png)
    return "Text query", "The last `vitpipe eval retrieval --text` query and its nearest images.", png
