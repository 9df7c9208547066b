"""Which figures a run's report gets: its objective's own (``ObjectiveSpec.figures``), then the
encoder figures every ViT gets; the report never asks which objective it is drawing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vitpipe.runlayout import RunLayout
from vitpipe.downstream.features import LayerKey, single_blocks
from vitpipe.report import figures
from vitpipe.ssl.vit import VisionTransformer


@dataclass
class FigureContext:
    run_dir: Path
    config: Any
    """The run's resolved config."""
    objective: nn.Module | None
    """The whole objective from the newest verified checkpoint (None when the run kept none)."""
    encoder: nn.Module
    """The evaluated encoder (``Encoder`` protocol)."""
    images: torch.Tensor
    """A few normalized sample images from the training shards, [B, C, H, W]."""
    out_dir: Path

    @property
    def mean(self) -> list[float]:
        return self.config.data.mean

    @property
    def std(self) -> list[float]:
        return self.config.data.std


Section = tuple[str, str, Path]
"""(title, caption, PNG written under ctx.out_dir)."""
FigureFn = Callable[[FigureContext], Section | None]

def _cls_attention(ctx: FigureContext) -> Section | None:
    if not isinstance(ctx.encoder, VisionTransformer):
        return None
    png = figures.cls_attention(ctx.encoder, ctx.images[:4], ctx.mean, ctx.std, ctx.out_dir / "attention.png")
    if png is None:
        return None
    return "CLS attention", "Last block: attention of the CLS token to each patch, per head.", png


def _positions(ctx: FigureContext) -> Section | None:
    if not isinstance(ctx.encoder, VisionTransformer):
        return None
    png = figures.position_similarity(ctx.encoder, ctx.out_dir / "positions.png")
    return ("Position embeddings", "For each patch position, cosine similarity of its embedding to every other "
            "position.", png)


def _attention_distance(ctx: FigureContext) -> Section | None:
    if not isinstance(ctx.encoder, VisionTransformer):
        return None
    distances = figures.mean_attention_distance(ctx.encoder, ctx.images)
    png = figures.attention_distance_plot(distances, ctx.out_dir / "attention_distance.png")
    return ("Attention distance", "Mean attention distance (pixels) per head and block, averaged over sample "
            "images: local heads sit low, global heads high.", png)


def _layer_probe(ctx: FigureContext) -> Section | None:
    import json

    path = RunLayout(ctx.run_dir).result("linear-probe")
    per_layer = json.loads(path.read_text()).get("per_layer", {}) if path.is_file() else {}
    blocks = single_blocks(per_layer)
    if len(blocks) < 2:
        return None
    joined = next((result for name, result in per_layer.items() if LayerKey.parse(name).joined), None)  # --concat's
    png = figures.layer_probe_curve(blocks, ctx.out_dir / "layer_probe.png", joined)
    best = str(LayerKey((max(blocks, key=lambda block: blocks[block]["val_top1"]),)))
    side_by_side = f"; the blocks side by side (`--concat`): {joined['top1']:.3f}, the dashed line" if joined else ""
    return ("Linear probe by layer", f"`vitpipe eval linear-probe --layers ...`: test top-1 of the probe on each "
            f"block's average-pooled features (best single block on val: {best}{side_by_side}).", png)


ENCODER_FIGURES: list[FigureFn] = [_cls_attention, _positions, _attention_distance, _layer_probe]
"""Figures of the encoder itself; each draws only what its encoder has (ViT attention, positions)."""


def figure_sections(ctx: FigureContext) -> list[Section]:
    from vitpipe.ssl import registry

    out = []
    for figure in [*registry.get(ctx.config.objective).figures, *ENCODER_FIGURES]:
        section = figure(ctx)
        if section is not None:
            out.append(section)
    return out
