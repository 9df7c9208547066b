"""I-JEPA's multi-block masks, drawn in the loader workers (the objective's batch hook).

Per image: ``num_targets`` target blocks (scale and aspect ranges) and one context block (scale
range, square) with every target patch removed from it. Block sizes are drawn once per batch
(as in the paper, so every image has equally long targets), positions per image, uniformly over
every position where the block fits. The official sampler draws ``randint(0, grid - size)``,
whose exclusive end never reaches the last position: on an 8x8 grid its 7x7 context block always
sits in the top-left corner. Context index lists are cut to the batch's shortest by a random
subset (not the first indices, which would favour the top rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitpipe.config import ConfigError

MAX_TRIES = 20
"""Draws per image before the best one found is used (never a loop without end)."""


@dataclass(frozen=True)
class MultiBlockMasks:
    grid: tuple[int, int]
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 4

    def block_size(self, scale: tuple[float, float], aspect: tuple[float, float],
                   generator: torch.Generator) -> tuple[int, int]:
        """(rows, cols) of a block covering a drawn fraction of the grid with a drawn aspect. Draws are
        made on the generator's device, whatever the default (a meta-device build runs ``check``)."""
        rows, cols = self.grid
        s = scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=generator, device=generator.device).item()
        a = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(1, generator=generator, device=generator.device).item()
        area = s * rows * cols
        return (min(rows, max(1, round(math.sqrt(area * a)))), min(cols, max(1, round(math.sqrt(area / a)))))

    def place(self, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """[rows, cols] bool mask of one block at a uniform position where it fits."""
        rows, cols = self.grid
        top = torch.randint(0, rows - size[0] + 1, (1,), generator=generator, device=generator.device).item()
        left = torch.randint(0, cols - size[1] + 1, (1,), generator=generator, device=generator.device).item()
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=generator.device)
        mask[top:top + size[0], left:left + size[1]] = True
        return mask

    def draw_one(self, target_size, context_size, generator) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
        """(target index lists, context indices, whether min_keep was met) for one image."""
        best = None
        for _ in range(MAX_TRIES):
            targets = [self.place(target_size, generator) for _ in range(self.num_targets)]
            context = self.place(context_size, generator)
            for target in targets:
                context &= ~target
            draw = ([t.flatten().nonzero().squeeze(1) for t in targets], context.flatten().nonzero().squeeze(1))
            if len(draw[1]) >= self.min_keep:
                return (*draw, True)
            if best is None or len(draw[1]) > len(best[1]):
                best = draw
        return (*best, False)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        """Adds ``context_idx`` [B, Kc] and ``target_idx`` [B, num_targets, Kt] (patch indices, raster order)."""
        count = len(batch["image"])
        target_size = self.block_size(self.target_scale, self.target_aspect, generator)
        context_size = self.block_size(self.context_scale, (1.0, 1.0), generator)
        draws = [self.draw_one(target_size, context_size, generator) for _ in range(count)]
        shortest = min(max(1, len(context)) for _, context, _ in draws)
        contexts = []
        for _, context, _ in draws:
            if len(context) == 0:  # only possible past the pre-flight check: keep one patch to attend to
                context = torch.zeros(1, dtype=torch.long)
            keep = torch.randperm(len(context), generator=generator)[:shortest]
            contexts.append(context[keep.sort().values])
        batch["context_idx"] = torch.stack(contexts)
        batch["target_idx"] = torch.stack([torch.stack(targets) for targets, _, _ in draws])
        batch["mask_shortfalls"] = sum(not met for _, _, met in draws)
        return batch

    def check(self, draws: int = 256, seed: int = 0) -> None:
        """Pre-flight, before training: settings under which most first draws leave fewer than
        min_keep context patches are a config error. (Rejection sampling could still find some, but
        the draws it keeps would be the rare ones whose targets pile onto each other.)"""
        generator = torch.Generator().manual_seed(seed)
        met = 0
        for _ in range(draws):
            target_size = self.block_size(self.target_scale, self.target_aspect, generator)
            context = self.place(self.block_size(self.context_scale, (1.0, 1.0), generator), generator)
            for _ in range(self.num_targets):
                context &= ~self.place(target_size, generator)
            met += int(context.sum()) >= self.min_keep
        if met < draws // 2:
            rows, cols = self.grid
            raise ConfigError(
                f"jepa masks: only {met} of {draws} draws on the {rows}x{cols} patch grid keep jepa.min_keep="
                f"{self.min_keep} context patches after removing {self.num_targets} targets of scale "
                f"{list(self.target_scale)}; use fewer or smaller targets, a lower min_keep or a finer grid")
