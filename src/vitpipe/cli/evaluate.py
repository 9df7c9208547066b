"""`vitpipe eval linear-probe|knn|retrieval|finetune`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpipe.runlayout import RunLayout
from vitpipe.cli.common import user_errors
from vitpipe.config import ConfigError


RunArg = Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.")]
InitOpt = Annotated[str, typer.Option("--init", help="trained | random (same shape, random weights: a baseline).")]
PixelsOpt = Annotated[bool, typer.Option("--pixels", help="Baseline: raw pixels instead of an encoder.")]
PoolOpt = Annotated[Optional[str], typer.Option("--pool", help="cls | gap | map (default: the model's).")]
MaxSkippedOpt = Annotated[float, typer.Option(
    "--max-skipped", help="Fail (exit 1) when more than this fraction of the expected samples cannot be read.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="DataLoader workers for feature extraction.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="auto (bf16 where the hardware has it and it measures faster) | fp32 | bf16; "
                        "features are stored as fp32, the choice is recorded in the result.")]
MaxLeakOpt = Annotated[float, typer.Option(
    "--max-contamination", help="Refuse (exit 2) when more than this fraction of the test images have a near-copy "
                                "in the pretraining or the eval's own training data.")]


def print_result(title: str, rows: list[tuple[str, str]], path: Path, result: dict | None = None) -> None:
    """The result's rows, then its contamination figure (beside every number, never left out)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    leaks = (result or {}).get("contamination")
    if leaks:
        rows = rows + [("contamination", f"{100 * leaks['fraction']:.2f}% ({leaks['contaminated']} of {leaks['test_images']})")]
    for name, value in rows:
        table.add_row(name, value)
    Console(soft_wrap=True).print(table)
    typer.echo(f"wrote {path}")


def _check_shared(pool: Optional[str], max_skipped: float = 0.0) -> None:
    """Options every eval shares, refused before any feature is extracted."""
    if pool is not None and pool not in ("cls", "gap", "map"):
        raise ConfigError("--pool must be cls, gap or map")
    if not 0 <= max_skipped <= 1:  # -1 passed every eval that lost nothing and failed every other
        raise ConfigError(f"--max-skipped must be a fraction in [0, 1]; got {max_skipped}")


@user_errors
def eval_linear_probe(
    run: RunArg,
    train: Annotated[str, typer.Option("--train", help="Labelled training shards.")],
    test: Annotated[str, typer.Option("--test", help="Labelled test shards (reported only).")],
    init: InitOpt = "trained", pixels: PixelsOpt = False, pool: PoolOpt = None, workers: WorkersOpt = 2,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Blocks to probe, 0-based, e.g. 3,7,11, or all (the per-layer curve).")] = None,
    epochs: Annotated[int, typer.Option(help="Probe training epochs.")] = 30,
    concat: Annotated[bool, typer.Option("--concat", help="Also probe the --layers concatenated.")] = False,
    lrs: Annotated[str, typer.Option(help="Learning rates of the sweep.")] = "0.01,0.03,0.1,0.3,1,3,10",
    wds: Annotated[str, typer.Option(help="Weight decays of the sweep.")] = "0,1e-4,1e-3",
    folds: Annotated[int, typer.Option(help="What judges the pick: 1 = one 10% held-out split, k = k-fold "
                                            "cross-validation then a refit on all, 0 = auto (k=3 under 50,000 train images).")] = 0,
    max_skipped: MaxSkippedOpt = 0.01, max_contamination: MaxLeakOpt = 0.01, precision: PrecisionOpt = "auto",
) -> None:
    """Frozen features + BatchNorm/Linear heads; a lr x wd sweep in one pass, picked on held-out train images."""
    from vitpipe.downstream.evaluate import eval_linear_probe as run_probe, source_for
    from vitpipe.downstream.probe import ProbeSettings

    _check_shared(pool, max_skipped)
    settings = ProbeSettings(lrs=_floats(lrs), weight_decays=_floats(wds), epochs=epochs, folds=folds)
    source = source_for(run, init, pixels, precision)
    layer_list = _layer_list(layers, source)
    path, result = run_probe(source, train, test, layer_list, pool, settings, workers, concat, max_skipped,
                             max_contamination)
    if path is None:  # a torchrun process other than the first: its share of the features is written
        return
    rows = [("top1", f"{result['top1']:.4f}"), ("top5", f"{result['top5']:.4f}"), ("val top1", f"{result['val_top1']:.4f} ({result['judged']} images, {result['folds']} fold(s))"),
            ("layer", result["layer"]), ("lr / wd", f"{result['lr']} / {result['weight_decay']}")]
    rows += [(f"top1 {name}", f"{r['top1']:.4f}") for name, r in result["per_layer"].items()] if layer_list else []
    print_result("linear probe", rows, path, result)


@user_errors
def eval_knn(
    run: RunArg,
    train: Annotated[str, typer.Option("--train", help="Labelled reference shards.")],
    test: Annotated[str, typer.Option("--test", help="Labelled query shards.")],
    init: InitOpt = "trained", pixels: PixelsOpt = False, pool: PoolOpt = None, workers: WorkersOpt = 2,
    temperature: Annotated[float, typer.Option(help="Vote weight exp(cos / T).")] = 0.07,
    layer: Annotated[Optional[int], typer.Option("--layer", help="Block to use, 0-based (default: the output).")] = None,
    max_skipped: MaxSkippedOpt = 0.01,
    index_type: Annotated[str, typer.Option("--index-type", help="flat (exact) | ivf | ivfpq | hnsw: the reference set's index")] = "flat",
    nlist: Annotated[int, typer.Option(help="IVF cells.")] = 100,
    nprobe: Annotated[int, typer.Option(help="IVF cells searched.")] = 8,
    pq_m: Annotated[int, typer.Option(help="IVF-PQ: bytes per vector.")] = 16,
    max_contamination: MaxLeakOpt = 0.01, precision: PrecisionOpt = "auto",
) -> None:
    """Weighted k-NN (k = 10, 20, 200) on L2-normalised features with FAISS (on the GPUs when
    faiss-gpu sees any). Exact by default."""
    from vitpipe.downstream.evaluate import eval_knn as run_knn, source_for
    from vitpipe.downstream.retrieval import IndexSettings

    _check_shared(pool, max_skipped)
    settings = IndexSettings(kind=index_type, nlist=nlist, nprobe=nprobe, pq_m=pq_m)
    path, result = run_knn(source_for(run, init, pixels, precision), train, test, temperature=temperature, pool=pool,
                           workers=workers, layer=layer, max_skipped=max_skipped, index=settings,
                           max_contamination=max_contamination)
    if path is None:  # a torchrun process other than the first: its share of the features is written
        return
    print_result("k-NN", [(f"top1 k={k}", f"{v:.4f}") for k, v in result["per_k"].items()], path, result)


@user_errors
def eval_retrieval(
    run: RunArg,
    index: Annotated[str, typer.Option("--index", help="Shards to index.")],
    query: Annotated[Optional[Path], typer.Option("--query", help="An image to search for.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Hits to show for --query.")] = 8,
    index_type: Annotated[str, typer.Option("--index-type", help="flat (exact) | ivf | ivfpq (compressed: for indexes larger than memory) | hnsw")] = "flat",
    nlist: Annotated[int, typer.Option(help="IVF cells.")] = 100,
    nprobe: Annotated[int, typer.Option(help="IVF cells searched.")] = 8,
    hnsw_m: Annotated[int, typer.Option(help="HNSW neighbours per node.")] = 32,
    pq_m: Annotated[int, typer.Option(help="IVF-PQ: bytes per vector (sub-quantisers; must divide the dimension).")] = 16,
    init: InitOpt = "trained", pixels: PixelsOpt = False, pool: PoolOpt = None, workers: WorkersOpt = 2,
    max_skipped: MaxSkippedOpt = 0.01,
    text: Annotated[Optional[str], typer.Option("--text", help="Image-text runs: a caption to search images for.")] = None,
    precision: PrecisionOpt = "auto",
) -> None:
    """Build a FAISS index over shards (saved in RUN/eval/retrieval/), report recall@1/5/10, answer
    --query; for image-text runs also recall both ways between images and their captions, and --text."""
    from vitpipe.downstream.evaluate import eval_retrieval as run_retrieval, hit_grid, query_image, source_for
    from vitpipe.downstream.featurestore import Processes
    from vitpipe.downstream.retrieval import IndexSettings
    from vitpipe.pipeline.shardset import resolve_shards

    _check_shared(pool, max_skipped)
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1; got {top_k}")
    if query is not None and not Path(query).is_file():
        raise ConfigError(f"query image not found: {query}" if not Path(query).exists()
                          else f"--query {query} is a folder; give one image file")
    processes = Processes.from_env()
    if processes.world > 1 and (query is not None or text is not None):
        raise ConfigError("--query and --text answer on one process: build the index under torchrun, then query without it")
    source = source_for(run, init, pixels, precision)
    pairs = _image_text_pairs(source, index, text)
    settings = IndexSettings(kind=index_type, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, pq_m=pq_m)
    index_dir = RunLayout.of(run).eval / f"retrieval{source.baseline_suffix}"
    built = json.loads((index_dir / "ids.json").read_text()) if (index_dir / "ids.json").is_file() else {}
    current = (index, resolve_shards(index).identity())
    if query is None or (built.get("shards"), built.get("shards_identity")) != current:
        # (re)build unless a query reuses the index of these very shards (same files, same content)
        path, result = run_retrieval(source, index, settings, pool, workers, max_skipped)
        if path is None:  # a torchrun process other than the first
            return
        rows = [(f"recall@{k}", f"{v:.4f}") for k, v in result["recall"].items()] + [("indexed", str(result["size"]))]
        print_result("retrieval", rows, path)
    if query is not None:
        hits = query_image(source, query, top_k, pool)
        for rank, (key, similarity) in enumerate(hits, 1):
            typer.echo(f"{rank}\t{key}\t{similarity:.4f}")
        grid = hit_grid(query, hits, index, index_dir / f"query_{Path(query).stem}.png")
        typer.echo(f"wrote {grid}")
    if pairs:
        _text_retrieval(source, index, text, top_k, workers, max_skipped)


def _image_text_pairs(source, index: str, text: str | None) -> bool:
    """Whether to measure image-text retrieval on ``index`` (an image-text run, every sample
    captioned); told before any work, with --text refused when it cannot be answered."""
    from vitpipe.pipeline.census import require, take_census
    from vitpipe.pipeline.shardset import resolve_shards
    from vitpipe.ssl import registry

    if text is not None and not text.strip():
        raise ConfigError("--text is empty; give the words to search for")
    if source.kind == "pixels" or "text" not in registry.get(source.config.objective).towers:
        if text is not None:
            raise ConfigError(f"--text needs an image-text run (clip); this run is {source.config.objective}")
        return False
    shards = resolve_shards(index)
    if text is not None:
        require(shards, index, ("text",), "--text (image-text retrieval)", every=True)
        return True
    census = take_census(shards)
    if census is not None and census.text < census.samples:
        typer.echo(f"note: {census.samples - census.text} of {census.samples} samples of {index} have no caption: "
                   "image-text recall skipped", err=True)
        return False
    return True


def _text_retrieval(source, index: str, text: str | None, top_k: int, workers: int, max_skipped: float) -> None:
    from vitpipe.downstream.evaluate import hit_grid
    from vitpipe.downstream.imagetext import eval_text_retrieval, query_text

    path, result = eval_text_retrieval(source, index, workers, max_skipped)
    rows = [(f"{direction} recall@{k}", f"{v:.4f}") for direction in ("image_to_text", "text_to_image")
            for k, v in result[direction].items()]
    print_result("image-text retrieval", rows, path)
    if text is not None:
        hits = query_text(source, text, top_k)
        for rank, (key, similarity) in enumerate(hits, 1):
            typer.echo(f"{rank}\t{key}\t{similarity:.4f}")
        typer.echo(f"wrote {hit_grid(text, hits, index, path.parent / 'retrieval-text' / 'query_text.png')}")


@user_errors
def eval_finetune(
    run: RunArg,
    train: Annotated[str, typer.Option("--train", help="Labelled training shards.")],
    test: Annotated[str, typer.Option("--test", help="Labelled test shards.")],
    init: InitOpt = "trained",
    probe_init: Annotated[bool, typer.Option(
        "--probe-init", help="Start the head from a linear probe on the same labels (LP-FT).")] = False,
    max_skipped: MaxSkippedOpt = 0.01, max_contamination: MaxLeakOpt = 0.01,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="key=value settings of the fine-tuning run: data.subset_fraction (labels used), train.max_steps, "
             "optim.lr, finetune.freeze_blocks, finetune.layer_decay, model.drop_path, data.image_size, ... "
             "(`vitpipe config show --objective classify` lists them with the recipe's defaults).")] = None,
) -> None:
    """Fine-tune (full or partly frozen) with layer-wise lr decay; --init random trains from scratch."""
    from vitpipe.downstream.evaluate import source_for
    from vitpipe.downstream.finetune import finetune
    from vitpipe.ssl.engine.trainer import EXIT_PREEMPTED, Preempted

    _check_shared(None, max_skipped)
    try:
        path, result = finetune(source_for(run, init, False), train, test, overrides, probe_init, max_skipped,
                                max_contamination)
    except Preempted as stop:
        typer.echo(f"stopped: {stop}; rerun the same command to resume (exit {EXIT_PREEMPTED})", err=True)
        raise typer.Exit(EXIT_PREEMPTED) from None
    print_result("fine-tune", [("top1", f"{result['top1']:.4f}"), ("labels", f"{result['label_fraction']:g}"),
                                ("steps", str(result["steps"])), ("train seconds", str(result["train_seconds"]))], path, result)


def _layer_list(layers: Optional[str], source) -> list[int] | None:
    if not layers:
        return None
    if layers.strip() == "all":
        return list(range(source.depth()))
    try:
        blocks = list(dict.fromkeys(int(x) for x in layers.split(",") if x.strip()))  # "3,3" probes block 3 once
    except ValueError:
        blocks = []
    if not blocks:  # " , " probed the output as if no --layers were given
        raise ConfigError(f"--layers: expected comma-separated block numbers or all, got {layers!r}")
    return blocks


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None
