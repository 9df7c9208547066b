"""`vitpipe curate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpipe.cli.common import user_errors


@user_errors
def curate(
    shards: Annotated[str, typer.Argument(help="Shard set to curate (directory, glob or brace pattern).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: curated shards, manifest, curation.jsonl.")],
    config: Annotated[Optional[Path], typer.Option("--config", help="Recipe YAML: steps: [{name: settings}, ...].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier curate in --out.")] = False,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="step.key=value settings (filter.min_side=32, near_dup.radius=4, decontaminate.against=[DIR]); "
             "without --config they name the steps to run.", show_default=False)] = None,
) -> None:
    """Remove near-duplicates, evaluation look-alikes and unfit samples; every removal counted and listed."""
    from vitpipe.curate.recipe import load_recipe
    from vitpipe.curate.run import curate as run_curate

    recipe = load_recipe(config, overrides)
    manifest = run_curate(shards, out, recipe, overwrite=overwrite)
    if manifest is None:  # a torchrun process other than the first: its share of the embeddings is written
        return
    removed = ", ".join(f"{n} {reason}" for reason, n in manifest["removed"].items()) or "nothing removed"
    typer.echo(f"curated {manifest['rows']} samples: kept {manifest['written']}, {removed}"
               f"{', ' + str(manifest['undecodable']) + ' undecodable (kept)' if manifest['undecodable'] else ''}")
    typer.echo(f"wrote {out} (manifest.json, curation.jsonl lists every removed key)")
    if manifest["rows"] and not manifest["written"]:  # a pretraining on it would only say "no .tar shards"
        typer.echo(f"warning: the recipe removed every sample ({removed}); a decontaminate.against naming "
                   "the input itself, or a threshold set too wide, does this", err=True)
