"""`vitpipe pretrain`, `export`, `report`, `demo` and `slurm render|submit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpipe.cli.common import error_line, user_errors
from vitpipe.config import ConfigError


@user_errors
def pretrain(
    objective: Annotated[str, typer.Argument(help="Objective: mae, clip, igpt, jepa, dino or one an installed "
                                                  "package registers (an unknown name lists them all).")],
    data: Annotated[Optional[str], typer.Option("--data", help="Shards: ingest directory, brace pattern or URL.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML config (see configs/).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="auto (latest checkpoint, if any) | never | CHECKPOINT_DIR.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value config overrides.", show_default=False)] = None,
) -> None:
    """Pretrain a ViT with a self-supervised objective. Exit 75 = stopped by a signal after
    checkpointing (rerun with --resume auto)."""
    from vitpipe.cluster.slurm import requeue_if_slurm
    from vitpipe.pipeline.loader import DataError
    from vitpipe.ssl import registry
    from vitpipe.ssl.engine.checkpoints import CheckpointError
    from vitpipe.ssl.engine.trainer import EXIT_PREEMPTED, Preempted, Trainer, TrainingError

    registry.get(objective)
    if out is None:
        raise ConfigError("--out RUN_DIR is required")
    cfg = registry.pretrain_config(objective, config, overrides, {"data": {"shards": data}} if data else None)
    if not cfg.data.shards:
        raise ConfigError("no shards: pass --data SHARDS (or data.shards in the config)")
    try:
        summary = Trainer(cfg, out, resume=resume, on_preempt=requeue_if_slurm).run()
    except Preempted as stop:
        typer.echo(f"stopped: {stop}; rerun with --resume auto (exit {EXIT_PREEMPTED})", err=True)
        raise typer.Exit(EXIT_PREEMPTED) from None
    except (TrainingError, DataError, CheckpointError) as err:
        error_line(str(err))
        raise typer.Exit(1) from None
    if summary.is_main:
        loss = "n/a" if summary.final_loss is None else f"{summary.final_loss:.4f}"
        typer.echo(f"done: {summary.steps} steps, final loss {loss}, {summary.seconds:.1f}s this session, "
                   f"{summary.images_per_second:.0f} img/s; run {summary.run_dir}, checkpoint {summary.checkpoint}")


@user_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    format: Annotated[str, typer.Option("--format", help="timm | hf | vitpipe | onnx | open_clip (hf of a CLIP run: CLIPModel)")] = "timm",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files already in --out.")] = False,
) -> None:
    """Export the encoder: model.safetensors + config.json (timm hub format) + a model card README.md."""
    from vitpipe.export import export as run_export

    path = run_export(run, out, format, overwrite)
    weights = {"onnx": "model.onnx", "open_clip": "open_clip_model.safetensors"}.get(format, "model.safetensors")
    config = "open_clip_config.json" if format == "open_clip" else "config.json"
    typer.echo(f"exported {path / weights}, {path / config} and {path / 'README.md'}")


@user_errors
def report(run: Annotated[Path, typer.Argument(help="Pretraining run directory.")]) -> None:
    """Write RUN/report/index.html: curves, reconstructions, attention, positions, retrieval, evals."""
    from vitpipe.report.html import build_report

    typer.echo(f"wrote {build_report(run)}")


@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where everything goes.")] = Path("runs/demo"),
    config: Annotated[Optional[Path], typer.Option("--config", help="Pretraining config (default configs/demo.yaml).")] = None,
    train_images: Annotated[int, typer.Option(help="Fashion-MNIST training images to serve.")] = 6000,
    test_images: Annotated[int, typer.Option(help="Fashion-MNIST test images to serve.")] = 1000,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides of the pretraining config.")] = None,
) -> None:
    """End to end on real images: loopback URL list -> ingest -> MAE -> probes vs random init -> report."""
    from vitpipe.cli import main
    from vitpipe.demo import run_demo

    headline = run_demo(out, main, config, train_images, test_images, overrides, echo=typer.echo)
    typer.echo("")
    typer.echo(f"linear probe top-1: {headline['linear_probe_top1']:.4f} (random init "
               f"{headline['linear_probe_top1_random_init']:.4f})")
    typer.echo(f"k-NN top-1 (k=20):  {headline['knn_top1']:.4f} (random init {headline['knn_top1_random_init']:.4f})")
    typer.echo(f"retrieval recall@1: {headline['retrieval_recall_at_1']:.4f} (random init "
               f"{headline['retrieval_recall_at_1_random_init']:.4f})")
    copies = headline["test_images_with_a_near_copy"]
    typer.echo(f"on {headline['test_images']} test images ({'not checked for' if copies is None else copies} "
               f"with a near-copy in the pretraining or train data, counted in); "
               f"probe and k-NN fit on {headline['train_images']} train images")
    typer.echo(f"report:  {headline['report']}")
    typer.echo(f"run:     {headline['run']}   shards: {headline['shards']}")
    typer.echo(f"total:   {headline['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------
# slurm
# ---------------------------------------------------------------------------------------------

CommandArg = Annotated[list[str], typer.Argument(help="After --: the vitpipe command line to run.")]


NodesOpt = Annotated[int, typer.Option(help="Nodes.")]
GpusOpt = Annotated[int, typer.Option(help="GPUs per node (0 = CPU job).")]
ProcsOpt = Annotated[int, typer.Option(help="CPU training processes per node (CPU jobs).")]
CpusOpt = Annotated[int, typer.Option(help="CPUs per node task.")]
TimeOpt = Annotated[str, typer.Option(help="Time limit, HH:MM:SS.")]
TextOpt = Annotated[Optional[str], typer.Option()]
SignalOpt = Annotated[int, typer.Option(help="USR1 to the batch shell this many seconds before the limit.")]


@user_errors
def slurm_job(
    ctx: typer.Context,
    command: CommandArg, nodes: NodesOpt = 1, gpus_per_node: GpusOpt = 0, processes_per_node: ProcsOpt = 1,
    cpus_per_task: CpusOpt = 2, time: TimeOpt = "01:00:00", partition: TextOpt = None, account: TextOpt = None,
    job_name: Annotated[str, typer.Option()] = "vitpipe", signal_seconds: SignalOpt = 90, output: TextOpt = None,
    sweep: Annotated[Optional[list[str]], typer.Option("--sweep", help="One array task per value: its key=value overrides.")] = None,
    pipeline: Annotated[bool, typer.Option("--pipeline", help="Stages separated by :: run as a chain of dependent jobs.")] = False,
) -> None:
    """`render` prints the sbatch script(s) for a vitpipe command (requeue, append logs, USR1 to the
    batch shell); `submit` submits them and prints the job id(s). --sweep makes an array job,
    --pipeline a chain of dependent jobs."""
    import shlex

    from vitpipe.cluster.slurm import JobSpec, render, sbatch, split_pipeline

    submit = ctx.info_name == "submit"
    spec = JobSpec(nodes, gpus_per_node, processes_per_node, cpus_per_task, time, partition, account, job_name,
                   signal_seconds, output)
    if pipeline and sweep:
        raise ConfigError("--pipeline and --sweep do not combine")
    stages = split_pipeline(command) if pipeline else [command]
    array = [shlex.split(item) for item in sweep] if sweep else None
    previous = None
    for stage in stages:
        script = render(spec, stage, array)
        if not submit:
            typer.echo(script, nl=False)
            continue
        previous = sbatch(script, dependency=f"afterok:{previous}" if previous and pipeline else None)
        typer.echo(previous)




@user_errors
def plan(
    objective: Annotated[str, typer.Argument(help="Objective (vitpipe pretrain's OBJECTIVE).")],
    config: Annotated[Optional[Path], typer.Option("--config", help="Pretraining config YAML.")] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs the run would use.")] = 1,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="h100 | a100-80 | a100-40 | l40s | l4 | a10g | v100.")] = None,
    memory_gb: Annotated[Optional[float], typer.Option("--memory-gb", help="Memory per GPU, instead of --gpu.")] = None,
    mfu: Annotated[float, typer.Option("--mfu", help="Model FLOPs utilisation assumed for the step time.")] = 0.4,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides of the config.")] = None,
) -> None:
    """Parameters, optimizer state with and without FSDP, activations per sample with and without
    checkpointing (counted on one real step on this CPU), the largest batch per GPU and the step time."""
    from vitpipe.ssl.engine.plan import plan_for

    found = plan_for(objective, config, list(overrides or []), gpus, gpu, memory_gb, mfu)
    typer.echo(f"{objective}: {found.parameters / 1e6:.1f} M parameters ({found.trainable / 1e6:.1f} M trainable), "
               f"{found.flops_per_sample / 1e9:.2f} GFLOP per sample (forward + backward)")
    typer.echo(f"per GPU ({found.gpus} x {found.gpu_memory_gb:g} GB): weights + gradients + AdamW "
               f"{found.state_gb_per_gpu['ddp']:.2f} GB (DDP), {found.state_gb_per_gpu['fsdp']:.2f} GB (FSDP)")
    typer.echo(f"activations per sample ({found.precision}): {found.activations_mb_per_sample['plain']:.1f} MB, "
               f"{found.activations_mb_per_sample['checkpointed']:.1f} MB with train.grad_checkpointing=true; "
               f"per step whatever the batch: {found.activations_mb_per_step['plain']:.1f} MB")
    typer.echo("largest batch per GPU: " + ", ".join(f"{k} {v}" for k, v in found.max_batch_per_gpu.items()))
    fits = found.fits()
    typer.echo(f"train.batch_size={found.batch_per_gpu} per GPU fits with: {', '.join(fits)}" if fits else
               f"train.batch_size={found.batch_per_gpu} per GPU fits with none of these: lower it and raise "
               "train.grad_accum, or give more memory")
    if found.step_seconds is not None:
        typer.echo(f"step of global batch {found.global_batch}: ~{found.step_seconds:.3g} s at {found.mfu:.0%} MFU")
