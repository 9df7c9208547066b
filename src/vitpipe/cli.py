"""The `vitpipe` command line: parse, load config, call one function per command.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error (one line, no traceback),
75 (EX_TEMPFAIL) training stopped by a signal after checkpointing: rerun with --resume auto.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpipe.config import CONFIG_KINDS, ConfigError, IngestConfig, dump_yaml, load_config, read_yaml

app = typer.Typer(help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode="rich")
shards_app = typer.Typer(help="Inspect and check shard sets.", no_args_is_help=True)
config_app = typer.Typer(help="Show resolved configs.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
app.add_typer(config_app, name="config")
eval_app = typer.Typer(help="How good is the representation: probes, k-NN, retrieval.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
slurm_app = typer.Typer(help="Run vitpipe commands as SLURM jobs that survive preemption.", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")

EXIT_USAGE = 2
DEBUG_ENV = "VITPIPE_DEBUG"


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of a runtime failure.")] = False) -> None:
    """Options for every command."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def runtime_failure_line(err: BaseException) -> str:
    """One line for a failure at run time; the traceback stays behind --debug / VITPIPE_DEBUG=1."""
    from vitpipe.ssl.checkpoints import is_disk_full

    if is_disk_full(err):
        where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        return f"disk full{where}; free space and rerun (finished work is kept)"
    text = (str(err).strip().splitlines() or [""])[0]
    known = ("TrainingError", "DataError", "CheckpointError")  # their messages are written for users
    prefix = "" if type(err).__name__ in known else f"{type(err).__name__}: "
    return f"{prefix}{text} (traceback: rerun with --debug or {DEBUG_ENV}=1)"


def user_errors(command):
    """Turn the errors a user can fix (bad config, paths, inputs) into one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as err:
            _err(str(err))
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


# ---------------------------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------------------------


@app.command()
@user_errors
def ingest(
    source: Annotated[str, typer.Argument(help="URL list (.csv .tsv .txt .parquet .jsonl[.gz]), image folder, "
                                               "hf:PATH, idx:IMAGES[,LABELS] or fashion-mnist[:train|:test]")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for shards and manifest.")],
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML with ingest settings.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Resize to fit N pixels (0 keeps sizes).")] = None,
    url_col: Annotated[Optional[str], typer.Option(help="URL column of a URL list.")] = None,
    caption_col: Annotated[Optional[str], typer.Option(help="Caption column of a URL list.")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Samples per shard.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Carve a validation split.")] = None,
    processes: Annotated[Optional[int], typer.Option(help="Download processes (URL lists).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Download threads per process.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier ingest in --out.")] = False,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value ingest settings.",
                                                             show_default=False)] = None,
) -> None:
    """Turn a source into verified WebDataset shards + sizes.json + manifest.json."""
    from vitpipe.pipeline.ingest import ingest as run_ingest

    options = dict(image_size=image_size, url_col=url_col, caption_col=caption_col, shard_size=shard_size,
                   val_fraction=val_fraction, processes=processes, threads=threads)
    cfg = load_config(IngestConfig, config, overrides, {k: v for k, v in options.items() if v is not None})
    manifest = run_ingest(source, out, cfg, overwrite=overwrite)
    _print_ingest_summary(manifest, out)


def _print_ingest_summary(manifest: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, soft_wrap=True)
    if manifest.get("resumed_nothing_to_do"):
        console.print(f"{out}: this ingest is already complete; nothing to do.")
    table = Table(title=f"ingest -> {out}", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows read", str(manifest["rows"]))
    table.add_row("samples written", str(manifest["written"]))
    for reason, count in manifest["failures"].items():
        table.add_row(f"failed: {reason}", str(count))
    for reason, count in manifest["filtered"].items():
        table.add_row(f"filtered: {reason}", str(count))
    table.add_row("duplicates removed", str(manifest["duplicates"]))
    for name, split in manifest["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        table.add_row(f"split {name}", f"{split['written']} in {len(split['shards'])} shards, {size / 1e6:.1f} MB")
    table.add_row("throughput", f"{manifest['images_per_second']} img/s")
    console.print(table)


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------


@shards_app.command("verify")
@user_errors
def shards_verify(directory: Annotated[Path, typer.Argument(help="Directory written by vitpipe ingest.")]) -> None:
    """Read every sample, decode every image, check sha256 and counts. Exit 1 on any problem."""
    from vitpipe.pipeline.verify import verify

    report = verify(directory)
    for problem in report.problems:
        typer.echo(f"problem: {problem}")
    for shard in report.shards:
        for problem in shard.problems:
            typer.echo(f"problem: {shard.path}: {problem}")
    bad = sum(bool(s.problems) for s in report.shards)
    typer.echo(f"{len(report.shards)} shards, {report.samples} samples read, {bad} shards with problems")
    if not report.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# pretrain, export
# ---------------------------------------------------------------------------------------------


@app.command()
@user_errors
def pretrain(
    objective: Annotated[str, typer.Argument(help="Objective from the registry: mae, ...")],
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
    from vitpipe.ssl.checkpoints import CheckpointError
    from vitpipe.ssl.trainer import EXIT_PREEMPTED, Preempted, Trainer, TrainingError

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
        _err(str(err))
        raise typer.Exit(1) from None
    if summary.is_main:
        loss = "n/a" if summary.final_loss is None else f"{summary.final_loss:.4f}"
        typer.echo(f"done: {summary.steps} steps, final loss {loss}, {summary.seconds:.1f}s this session, "
                   f"{summary.images_per_second:.0f} img/s; run {summary.run_dir}, checkpoint {summary.checkpoint}")


@app.command()
@user_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    format: Annotated[str, typer.Option("--format", help="timm | hf | vitpipe")] = "timm",
) -> None:
    """Export the encoder: model.safetensors + config.json (timm hub format) + a model card README.md."""
    from vitpipe.export import export as run_export

    path = run_export(run, out, format)
    typer.echo(f"exported {path / 'model.safetensors'}, {path / 'config.json'} and {path / 'README.md'}")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------

RunArg = Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.")]
InitOpt = Annotated[str, typer.Option("--init", help="trained | random (same shape, random weights: a baseline).")]
PixelsOpt = Annotated[bool, typer.Option("--pixels", help="Baseline: raw pixels instead of an encoder.")]
PoolOpt = Annotated[Optional[str], typer.Option("--pool", help="cls | gap | map (default: the model's).")]
MaxSkippedOpt = Annotated[float, typer.Option(
    "--max-skipped", help="Fail (exit 1) when more than this fraction of the expected samples cannot be read.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="DataLoader workers for feature extraction.")]


def _print_result(title: str, rows: list[tuple[str, str]], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console(soft_wrap=True).print(table)
    typer.echo(f"wrote {path}")


def _check_pool(pool: Optional[str]) -> None:
    if pool is not None and pool not in ("cls", "gap", "map"):
        raise ConfigError("--pool must be cls, gap or map")


@eval_app.command("linear-probe")
@user_errors
def eval_linear_probe(
    run: RunArg,
    train: Annotated[str, typer.Option("--train", help="Labelled training shards.")],
    test: Annotated[str, typer.Option("--test", help="Labelled test shards (reported only).")],
    init: InitOpt = "trained", pixels: PixelsOpt = False, pool: PoolOpt = None, workers: WorkersOpt = 2,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Comma-separated blocks to probe, 0-based, e.g. 3,7,11.")] = None,
    epochs: Annotated[int, typer.Option(help="Probe training epochs.")] = 30,
    concat: Annotated[bool, typer.Option("--concat", help="Also probe the --layers concatenated.")] = False,
    lrs: Annotated[str, typer.Option(help="Learning rates of the sweep.")] = "0.01,0.03,0.1,0.3,1,3,10",
    wds: Annotated[str, typer.Option(help="Weight decays of the sweep.")] = "0,1e-4,1e-3",
    max_skipped: MaxSkippedOpt = 0.01,
) -> None:
    """Frozen features + BatchNorm/Linear heads; a lr x wd sweep in one pass, picked on a val split."""
    from vitpipe.downstream.evaluate import eval_linear_probe as run_probe, source_for
    from vitpipe.downstream.probe import ProbeSettings

    _check_pool(pool)
    settings = ProbeSettings(lrs=_floats(lrs), weight_decays=_floats(wds), epochs=epochs)
    layer_list = [int(x) for x in layers.split(",")] if layers else None
    path, result = run_probe(source_for(run, init, pixels), train, test, layer_list, pool, settings, workers, concat,
                             max_skipped)
    rows = [("top1", f"{result['top1']:.4f}"), ("top5", f"{result['top5']:.4f}"), ("val top1", f"{result['val_top1']:.4f}"),
            ("layer", result["layer"]), ("lr / wd", f"{result['lr']} / {result['weight_decay']}")]
    rows += [(f"top1 {name}", f"{r['top1']:.4f}") for name, r in result["per_layer"].items()] if layer_list else []
    _print_result("linear probe", rows, path)


@eval_app.command("knn")
@user_errors
def eval_knn(
    run: RunArg,
    train: Annotated[str, typer.Option("--train", help="Labelled reference shards.")],
    test: Annotated[str, typer.Option("--test", help="Labelled query shards.")],
    init: InitOpt = "trained", pixels: PixelsOpt = False, pool: PoolOpt = None, workers: WorkersOpt = 2,
    temperature: Annotated[float, typer.Option(help="Vote weight exp(cos / T).")] = 0.07,
    layer: Annotated[Optional[int], typer.Option("--layer", help="Block to use, 0-based (default: the output).")] = None,
    max_skipped: MaxSkippedOpt = 0.01,
) -> None:
    """Weighted k-NN (k = 10, 20, 200) on L2-normalised features with FAISS."""
    from vitpipe.downstream.evaluate import eval_knn as run_knn, source_for

    _check_pool(pool)
    path, result = run_knn(source_for(run, init, pixels), train, test, temperature=temperature, pool=pool,
                           workers=workers, layer=layer, max_skipped=max_skipped)
    _print_result("k-NN", [(f"top1 k={k}", f"{v:.4f}") for k, v in result["per_k"].items()], path)


@eval_app.command("retrieval")
@user_errors
def eval_retrieval(
    run: RunArg,
    index: Annotated[str, typer.Option("--index", help="Shards to index.")],
    query: Annotated[Optional[Path], typer.Option("--query", help="An image to search for.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Hits to show for --query.")] = 8,
    index_type: Annotated[str, typer.Option("--index-type", help="flat (exact) | ivf | hnsw")] = "flat",
    nlist: Annotated[int, typer.Option(help="IVF cells.")] = 100,
    nprobe: Annotated[int, typer.Option(help="IVF cells searched.")] = 8,
    hnsw_m: Annotated[int, typer.Option(help="HNSW neighbours per node.")] = 32,
    init: InitOpt = "trained", pixels: PixelsOpt = False, pool: PoolOpt = None, workers: WorkersOpt = 2,
    max_skipped: MaxSkippedOpt = 0.01,
) -> None:
    """Build a FAISS index over shards (saved in RUN/eval/retrieval/), report recall@1/5/10, answer --query."""
    from vitpipe.downstream.evaluate import eval_retrieval as run_retrieval, hit_grid, query_image, run_dir_of, source_for
    from vitpipe.downstream.retrieval import IndexSettings
    from vitpipe.pipeline.shardset import resolve_shards

    _check_pool(pool)
    source = source_for(run, init, pixels)
    settings = IndexSettings(kind=index_type, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m)
    index_dir = run_dir_of(run) / "eval" / f"retrieval{source.baseline_suffix}"
    built = json.loads((index_dir / "ids.json").read_text()) if (index_dir / "ids.json").is_file() else {}
    current = (index, resolve_shards(index).identity())
    if query is None or (built.get("shards"), built.get("shards_identity")) != current:
        # (re)build unless a query reuses the index of these very shards (same files, same content)
        path, result = run_retrieval(source, index, settings, pool, workers, max_skipped)
        rows = [(f"recall@{k}", f"{v:.4f}") for k, v in result["recall"].items()] + [("indexed", str(result["size"]))]
        _print_result("retrieval", rows, path)
    if query is not None:
        hits = query_image(source, query, top_k, pool)
        for rank, (key, similarity) in enumerate(hits, 1):
            typer.echo(f"{rank}\t{key}\t{similarity:.4f}")
        grid = hit_grid(query, hits, index, index_dir / f"query_{Path(query).stem}.png")
        typer.echo(f"wrote {grid}")


@eval_app.command("finetune")
@user_errors
def eval_finetune(
    run: RunArg,
    train: Annotated[str, typer.Option("--train", help="Labelled training shards.")],
    test: Annotated[str, typer.Option("--test", help="Labelled test shards.")],
    init: InitOpt = "trained",
    probe_init: Annotated[bool, typer.Option(
        "--probe-init", help="Start the head from a linear probe on the same labels (LP-FT).")] = False,
    max_skipped: MaxSkippedOpt = 0.01,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="key=value settings of the fine-tuning run: data.subset_fraction (labels used), train.max_steps, "
             "optim.lr, finetune.freeze_blocks, finetune.layer_decay, model.drop_path, data.image_size, ... "
             "(`vitpipe config show --objective classify` lists them with the recipe's defaults).")] = None,
) -> None:
    """Fine-tune (full or partly frozen) with layer-wise lr decay; --init random trains from scratch."""
    from vitpipe.downstream.evaluate import source_for
    from vitpipe.downstream.finetune import finetune
    from vitpipe.ssl.trainer import EXIT_PREEMPTED, Preempted

    try:
        path, result = finetune(source_for(run, init, False), train, test, overrides, probe_init, max_skipped)
    except Preempted as stop:
        typer.echo(f"stopped: {stop}; rerun the same command to resume (exit {EXIT_PREEMPTED})", err=True)
        raise typer.Exit(EXIT_PREEMPTED) from None
    _print_result("fine-tune", [("top1", f"{result['top1']:.4f}"), ("labels", f"{result['label_fraction']:g}"),
                                ("steps", str(result["steps"])), ("train seconds", str(result["train_seconds"]))], path)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


@app.command()
@user_errors
def report(run: Annotated[Path, typer.Argument(help="Pretraining run directory.")]) -> None:
    """Write RUN/report/index.html: curves, reconstructions, attention, positions, retrieval, evals."""
    from vitpipe.report.html import build_report

    typer.echo(f"wrote {build_report(run)}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where everything goes.")] = Path("runs/demo"),
    config: Annotated[Optional[Path], typer.Option("--config", help="Pretraining config (default configs/demo.yaml).")] = None,
    train_images: Annotated[int, typer.Option(help="Fashion-MNIST training images to serve.")] = 6000,
    test_images: Annotated[int, typer.Option(help="Fashion-MNIST test images to serve.")] = 1000,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides of the pretraining config.")] = None,
) -> None:
    """End to end on real images: loopback URL list -> ingest -> MAE -> probes vs random init -> report."""
    from vitpipe.demo import run_demo

    headline = run_demo(out, main, config, train_images, test_images, overrides, echo=typer.echo)
    typer.echo("")
    typer.echo(f"linear probe top-1: {headline['linear_probe_top1']:.4f} (random init "
               f"{headline['linear_probe_top1_random_init']:.4f})")
    typer.echo(f"k-NN top-1 (k=20):  {headline['knn_top1']:.4f} (random init {headline['knn_top1_random_init']:.4f})")
    typer.echo(f"retrieval recall@1: {headline['retrieval_recall_at_1']:.4f}")
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


slurm_app.command("render")(user_errors(slurm_job))
slurm_app.command("submit")(user_errors(slurm_job))


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@config_app.command("show")
@user_errors
def config_show(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config file (optional).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides.")] = None,
    objective: Annotated[Optional[str], typer.Option(
        help="Objective whose section and recipe defaults apply (default: the file's, else mae).")] = None,
    kind: Annotated[str, typer.Option(help="Schema: pretrain | ingest.")] = "pretrain",
) -> None:
    """Print the resolved config: defaults <- the objective's recipe <- file <- overrides."""
    from vitpipe.ssl import registry

    if kind not in CONFIG_KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(CONFIG_KINDS)}")
    if config is not None and "=" in str(config) and not config.exists():  # no file, only overrides
        config, overrides = None, [str(config), *(overrides or [])]
    if kind == "ingest":
        typer.echo(dump_yaml(load_config(IngestConfig, config, overrides)), nl=False)
        return
    name = objective or (read_yaml(config).get("objective") if config else None) or "mae"
    typer.echo(dump_yaml(registry.pretrain_config(name, config, overrides)), nl=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point; also callable from tests as ``main([...])`` returning the exit code."""
    try:
        # without standalone mode click returns the exit code of typer.Exit instead of exiting
        result = app(args=argv, prog_name="vitpipe", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Exit as exit_:
        code = exit_.exit_code
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except ConfigError as err:
        _err(str(err))
        code = EXIT_USAGE
    except (typer.BadParameter, typer.Abort) as err:
        _err(str(err))
        code = EXIT_USAGE
    except Exception as err:
        import click

        if isinstance(err, click.exceptions.UsageError):
            err.show()
            code = EXIT_USAGE
        elif isinstance(err, click.exceptions.ClickException):
            err.show()
            code = err.exit_code
        elif os.environ.get(DEBUG_ENV):
            raise
        else:
            _err(runtime_failure_line(err))
            code = 1
    if argv is None:
        sys.exit(code)
    return code
