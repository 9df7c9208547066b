"""CLIP's own command: `vitpipe eval zero-shot` (found by the CLI through the objective's SPEC)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpipe.cli.common import user_errors
from vitpipe.cli.evaluate import (
    InitOpt,
    MaxLeakOpt,
    MaxSkippedOpt,
    PrecisionOpt,
    RunArg,
    WorkersOpt,
    print_result,
)


@user_errors
def eval_zero_shot(
    run: RunArg,
    test: Annotated[str, typer.Option("--test", help="Labelled test shards.")],
    classes: Annotated[Optional[Path], typer.Option(
        "--classes", help="Class names, one per line in label order (default: the test manifest's label map).")] = None,
    templates: Annotated[Optional[Path], typer.Option(
        "--templates", help="Prompt templates with {} for the class name, one per line.")] = None,
    init: InitOpt = "trained", workers: WorkersOpt = 2, max_skipped: MaxSkippedOpt = 0.01,
    max_contamination: MaxLeakOpt = 0.01, precision: PrecisionOpt = "auto",
) -> None:
    """Zero-shot classification by class-name prompts (image-text objectives such as clip)."""
    from vitpipe.downstream.evaluate import source_for
    from vitpipe.downstream.imagetext import eval_zero_shot as run_zero_shot

    path, result = run_zero_shot(source_for(run, init, False, precision), test, classes, templates, workers, max_skipped,
                                 max_contamination)
    print_result("zero-shot", [("top1", f"{result['top1']:.4f}"), ("top5", f"{result['top5']:.4f}"),
                                ("chance", f"{result['chance']:.4f}"), ("classes", str(len(result["classes"])))], path, result)
