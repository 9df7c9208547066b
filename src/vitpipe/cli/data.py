"""`vitpipe ingest`, `vitpipe shards verify`, `vitpipe config show`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpipe.atomic import write_bytes_atomic
from vitpipe.cli.common import user_errors
from vitpipe.config import CONFIG_KINDS, ConfigError, IngestConfig, dump_yaml, load_config, read_yaml


def _ingest_defaults() -> dict[str, object]:
    import dataclasses

    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(IngestConfig)}


_DEFAULTS = _ingest_defaults()
_KEYS_HELP = "key=value ingest settings, with their defaults: " + ", ".join(
    f"{name}={value}" for name, value in _DEFAULTS.items()) + " (docs: vitpipe/config/schema.py IngestConfig)."


@user_errors
def ingest(
    source: Annotated[str, typer.Argument(help="URL list (.csv .tsv .txt .parquet .jsonl[.gz]), image folder, "
                                               "hf:PATH, idx:IMAGES[,LABELS] or fashion-mnist[:train|:test]")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for shards and manifest.")],
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML with ingest settings.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help=f"Resize to fit N pixels (0 keeps sizes; default {_DEFAULTS['image_size']}).")] = None,
    url_col: Annotated[Optional[str], typer.Option(help=f"URL column of a URL list (default {_DEFAULTS['url_col']}).")] = None,
    caption_col: Annotated[Optional[str], typer.Option(help="Caption column of a URL list.")] = None,
    split_col: Annotated[Optional[str], typer.Option(help="Split column of a URL list (train, test, ...: each to OUT/<split>/).")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help=f"Samples per shard (default {_DEFAULTS['shard_size']}).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help=f"Carve a validation split from train (default {_DEFAULTS['val_fraction']}).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Hugging Face datasets: take only this split.")] = None,
    processes: Annotated[Optional[int], typer.Option(help=f"Download processes, URL lists (default {_DEFAULTS['processes']}).")] = None,
    threads: Annotated[Optional[int], typer.Option(help=f"Download threads per process (default {_DEFAULTS['threads']}).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier ingest in --out.")] = False,
    overrides: Annotated[Optional[list[str]], typer.Argument(help=_KEYS_HELP,
                                                             show_default=False)] = None,
) -> None:
    """Turn a source into verified WebDataset shards + sizes.json + manifest.json."""
    from vitpipe.pipeline.ingest import check_outcome, ingest as run_ingest

    options = dict(image_size=image_size, url_col=url_col, caption_col=caption_col, split_col=split_col, shard_size=shard_size,
                   val_fraction=val_fraction, processes=processes, threads=threads, split=split)
    cfg = load_config(IngestConfig, config, overrides, {k: v for k, v in options.items() if v is not None})
    manifest = run_ingest(source, out, cfg, overwrite=overwrite)
    _print_ingest_summary(manifest, out)
    check_outcome(manifest, cfg)


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
    for name, count in manifest.get("fields", {}).items():
        if count:
            table.add_row(f"written {name.replace('_', ' ')}", str(count))
    for name, split in manifest["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        table.add_row(f"split {name}", f"{split['written']} in {len(split['shards'])} shards, {size / 1e6:.1f} MB")
    table.add_row("throughput", f"{manifest['images_per_second']} img/s")
    console.print(table)


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
    name = objective or (_objective_of(read_yaml(config)) if config else None) or "mae"
    typer.echo(dump_yaml(registry.pretrain_config(name, config, overrides)), nl=False)


def _objective_of(data: dict) -> str | None:
    """The objective a config file is for: its `objective` key, else the one whose section it has."""
    from vitpipe.ssl import registry

    if "objective" in data:
        return data["objective"]
    named = [name for name, spec in registry.OBJECTIVES.items() if spec.section in data]
    return named[0] if len(named) == 1 else None


_PALETTE_OPTIONS = {"igpt.palette_size": "--size", "igpt.palette_images": "--images",
                    "igpt.palette_pixels": "--pixels", "igpt.resolution": "--resolution",
                    "data.image_size": "--resolution", "data.channels": "--channels"}


@user_errors
def palette_fit(
    shards: Annotated[str, typer.Argument(help="Shards whose pixels the palette is fitted on.")],
    out: Annotated[Path, typer.Option("--out", help="Palette file (JSON) to write; igpt.palette=FILE reuses it.")],
    size: Annotated[int, typer.Option("--size", help="Colours (k-means centroids).")] = 16,
    resolution: Annotated[int, typer.Option("--resolution", help="Images are reduced to this side first, as igpt.resolution.")] = 16,
    channels: Annotated[int, typer.Option("--channels", help="1 (greyscale) or 3 (RGB), as data.channels.")] = 3,
    images: Annotated[int, typer.Option("--images", help="Images read.")] = 2000,
    pixels: Annotated[int, typer.Option("--pixels", help="Pixels k-means runs on (a seeded draw).")] = 200_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the draw and of k-means.")] = 0,
) -> None:
    """Fit a k-means colour palette (faiss) on shards, once, for several igpt runs."""
    from vitpipe.config import DataConfig
    from vitpipe.ssl.engine.artifacts import read_samples
    from vitpipe.ssl.objectives.igpt.objective import IGPTConfig, palette_from_shards

    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name the palette file to write")
    try:
        data = DataConfig(shards=shards, image_size=resolution, channels=channels)
        igpt = IGPTConfig(resolution=resolution, palette_size=size, palette_images=images, palette_pixels=pixels,
                          palette_seed=seed)
    except ConfigError as err:  # the configs' checks, said with this command's option names
        message = str(err)
        for key, option in _PALETTE_OPTIONS.items():
            message = message.replace(key, option)
        raise ConfigError(message) from None
    content = palette_from_shards(data, igpt, lambda fields, limit: read_samples(data, fields, limit))
    write_bytes_atomic(out, content)
    typer.echo(f"wrote {out} ({size} colours, {channels} channel{'s' if channels > 1 else ''})")
