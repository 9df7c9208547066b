"""`vitpipe compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpipe.cli.common import user_errors


@user_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Pretraining run directories (any objectives).")],
    train: Annotated[str, typer.Option("--train", help="Labelled training shards of the evals.")],
    test: Annotated[str, typer.Option("--test", help="Labelled test shards; must be data no run pretrained on.")],
    out: Annotated[Path, typer.Option("--out", help="Where compare.json and index.html go.")],
    suite: Annotated[str, typer.Option(help="Evals: any of probe,knn,finetune.")] = "probe,knn,finetune",
    layers: Annotated[str, typer.Option(help="Probe layers: auto (every block where the objective's best "
                                             "layer is not the last) | all | last.")] = "auto",
    label_fraction: Annotated[float, typer.Option(help="Labels the fine-tune sees.")] = 0.1,
    finetune_set: Annotated[Optional[list[str]], typer.Option("--finetune-set", help="key=value setting of every fine-tune (repeatable), e.g. train.max_steps=300.")] = None,
    probe_epochs: Annotated[int, typer.Option(help="Linear-probe epochs.")] = 30,
    concat: Annotated[bool, typer.Option("--concat", help="Where several layers are probed, also probe them concatenated.")] = False,
    knn_layer: Annotated[str, typer.Option("--knn-layer", help="k-NN features: last | probe (the single block the probe picked on held-out labels).")] = "last",
    finetune_probe_init: Annotated[bool, typer.Option("--finetune-probe-init", help="Start each fine-tune's head from a linear probe on its labels (LP-FT).")] = False,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers for feature extraction.")] = 2,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto (bf16 where the hardware has it and it measures faster) | fp32 | bf16.")] = "auto",
    max_contamination: Annotated[float, typer.Option(
        "--max-contamination", help="Refuse (exit 2) a run when more than this fraction of the test images have a "
                                    "near-copy in its pretraining data or in --train.")] = 0.01,
) -> None:
    """The same evaluation suite on every run, each beside the random init of its architecture and
    raw pixels, with each run's pretraining cost: OUT/compare.json and OUT/index.html. Finished
    evals and extracted features are reused, so a rerun is free."""
    from vitpipe.downstream.compare import CompareSettings, compare as run_compare
    from vitpipe.report.compare_page import write_page

    settings = CompareSettings(tuple(s.strip() for s in suite.split(",") if s.strip()), layers, label_fraction,
                               tuple(finetune_set or ()), probe_epochs,
                               concat, knn_layer, finetune_probe_init, workers, precision, max_contamination)
    result = run_compare(runs, train, test, out, settings, log=lambda line: typer.echo(line, err=True))
    write_page(result, out)
    for row in result["runs"]:
        scores = ", ".join(f"{task} {e['trained']['top1']:.3f} ({e['delta_vs_random']:+.3f} vs random)"
                           for task, e in row["evals"].items())
        typer.echo(f"{row['objective']:6s} {row['name']}: {scores}")
    typer.echo(f"top-1 on {result['test_samples']} samples of {test} (trained on {result['train_samples'] or 'the labelled subset of'} "
               f"samples of {train})")
    typer.echo(f"wrote {out / 'compare.json'} and {out / 'index.html'}")


@user_errors
def eval_suite(
    suite: Annotated[Path, typer.Argument(help="Suite YAML: datasets: [{name, train, test, evals, classes, templates}].")],
    runs: Annotated[list[Path], typer.Argument(help="Pretraining run directories (any objectives).")],
    out: Annotated[Path, typer.Option("--out", help="Where suite.json, index.html and results/ go.")],
    probe_epochs: Annotated[int, typer.Option(help="Linear-probe epochs.")] = 30,
    layers: Annotated[str, typer.Option(help="Probe layers: auto | all | last.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers for feature extraction.")] = 2,
    precision: Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16.")] = "auto",
    max_contamination: Annotated[float, typer.Option(
        "--max-contamination", help="Refuse (mark, no numbers) a dataset for a run when more than this fraction of its "
                                    "test images have a near-copy in the run's pretraining data or its train shards.")] = 0.01,
) -> None:
    """Many datasets, several evals each (linear-probe, knn, zero-shot, retrieval), every run beside
    its random init and raw pixels: OUT/suite.json and OUT/index.html with the average over datasets
    and each dataset's contamination. Finished evals and cached features are reused."""
    from vitpipe.downstream.suite import SuiteSettings, load_suite, run_suite, with_compare
    from vitpipe.report.suite_page import write_suite_page

    datasets = load_suite(suite)
    settings = with_compare(SuiteSettings(), probe_epochs=probe_epochs, layers=layers, workers=workers,
                            precision=precision, max_contamination=max_contamination)
    result = run_suite(datasets, runs, out, settings, log=lambda line: typer.echo(line, err=True))
    for name in result["runs"]:
        means = ", ".join(f"{task} {a['trained']['mean']:.3f} ({a['trained']['mean'] - a['random']['mean']:+.3f} vs random, "
                          f"{a['trained']['datasets']} datasets)" for task, a in result["average"][name].items())
        typer.echo(f"{name}: {means or 'no eval ran (every dataset refused or not applicable)'}")
    typer.echo(f"wrote {out / 'suite.json'} and {write_suite_page(result, out)}")
