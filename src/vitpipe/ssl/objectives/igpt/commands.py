"""iGPT's own commands: `vitpipe eval bits-per-dim` and `vitpipe sample` (found through its SPEC)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
def eval_bits_per_dim(
    run: RunArg,
    test: Annotated[str, typer.Option("--test", help="Held-out shards.")],
    init: InitOpt = "trained", workers: WorkersOpt = 2, max_skipped: MaxSkippedOpt = 0.01,
    max_contamination: MaxLeakOpt = 0.01, precision: PrecisionOpt = "auto",
) -> None:
    """Held-out loss of a pixel-sequence model (igpt) in bits per palette index."""
    from vitpipe.downstream.evaluate import source_for
    from vitpipe.ssl.objectives.igpt.evals import eval_bits_per_dim as run_bits

    path, result = run_bits(source_for(run, init, False, precision), test, workers, max_skipped, max_contamination)
    print_result("bits per dim", [("bits per dim", f"{result['bits_per_dim']:.4f}"),
                                   ("uniform palette", f"{result['uniform_bits']:.4f}"),
                                   ("images", str(result["test_samples"]))], path, result)


@user_errors
def sample(
    run: RunArg,
    prompt: Annotated[str, typer.Option("--prompt", help="Shards whose first images are completed.")],
    out: Annotated[Path, typer.Option("--out", help="PNG grid: upper half given | completion | original.")],
    n: Annotated[int, typer.Option("--n", help="Images to complete.")] = 8,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the sampling.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the K likeliest colours (0 = all).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    workers: WorkersOpt = 2,
) -> None:
    """iGPT: complete the lower half of held-out images, one palette index at a time."""
    from vitpipe.ssl.objectives.igpt.evals import sample as run_sample

    path = run_sample(run, prompt, n, out, temperature, top_k, seed, workers)
    typer.echo(f"wrote {path}")
