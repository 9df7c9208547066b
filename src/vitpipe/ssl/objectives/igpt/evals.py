"""Evaluations of pixel-sequence models (iGPT): image completion and held-out bits per dimension."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitpipe.config import ConfigError
from vitpipe.downstream.contamination import DEFAULT_MAX
from vitpipe.downstream.evaluate import checked_contamination, write_result
from vitpipe.downstream.features import EncoderSource, FeatureSet, check_tally
from vitpipe.pipeline.loader import ReadTally, counted, eval_loader
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.ssl.runs import load_run_objective

CELL = 64
"""Pixels a completed image is drawn at (nearest-neighbour upscaling keeps the palette visible)."""


def load_pixel_model(source: EncoderSource):
    """The whole iGPT objective (encoder and output head) of a run."""
    if source.config.objective != "igpt":
        raise ConfigError(f"this needs an igpt run (pixel sequences); {source.run} is a {source.config.objective} run")
    return load_run_objective(source.run, source.config, seed=source.seed if source.kind == "random" else None,
                              trained=source.kind == "trained")


def _loader(source: EncoderSource, spec: str, workers: int, fields=("image",)):
    data = source.config.data
    shards = resolve_shards(spec)
    return shards, eval_loader(shards, data, fields, workers, batch_size=128)


def to_pixels(indices: torch.Tensor, palette: torch.Tensor, resolution: int) -> np.ndarray:
    """[B, T] palette indices -> [B, R, R, 3] uint8 RGB (greyscale palettes repeated over channels)."""
    colours = palette[indices].view(len(indices), resolution, resolution, -1)
    colours = colours.expand(-1, -1, -1, 3) if colours.shape[-1] == 1 else colours
    return ((colours.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def completion_grid(model, images: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                    top_k: int = 0) -> np.ndarray:
    """One row per image: the upper half given (lower half grey) | the model's completion | the
    image as the model sees it (palette-quantized); uint8 [rows * CELL, 3 * CELL, 3]."""
    encoder = model.encoder()
    pixels = encoder.quantize(images)
    half = pixels.shape[1] // 2
    completed = model.complete(pixels, half, temperature=temperature, top_k=top_k, generator=generator)
    given = to_pixels(pixels, encoder.palette, encoder.resolution)
    given[:, encoder.resolution // 2:] = 128
    columns = [given, to_pixels(completed, encoder.palette, encoder.resolution),
               to_pixels(pixels, encoder.palette, encoder.resolution)]
    scale = max(1, CELL // encoder.resolution)
    rows = [np.concatenate([np.kron(column[i], np.ones((scale, scale, 1), dtype=np.uint8)) for column in columns],
                           axis=1) for i in range(len(images))]
    return np.concatenate(rows, axis=0)


@torch.no_grad()
def sample(run: Path, prompt: str, n: int, out: Path, temperature: float, top_k: int, seed: int,
           workers: int = 2) -> Path:
    """Complete the lower half of the first ``n`` images of ``prompt``; write the grid PNG to ``out``."""
    from PIL import Image

    if n < 1 or temperature <= 0 or top_k < 0:
        raise ConfigError("--n must be >= 1, --temperature > 0 and --top-k >= 0")
    out = Path(out)
    if out.is_dir() or out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ConfigError(f"--out {out}: give an image file name (.png, .jpg or .webp), not a folder")
    source = EncoderSource.resolve(run)
    model = load_pixel_model(source)
    _, loader = _loader(source, prompt, workers)
    images = []
    for batch in counted(loader, ReadTally(None)):
        images.append(batch["image"])
        if sum(len(b) for b in images) >= n:
            break
    if not images:
        raise ConfigError(f"{prompt}: no images to complete")
    images = torch.cat(images)[:n]
    if len(images) < n:
        print(f"note: {prompt} has {len(images)} readable images; completing those, not --n {n}", file=sys.stderr)
    grid = completion_grid(model, images, torch.Generator().manual_seed(seed), temperature, top_k)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    return out


@torch.no_grad()
def eval_bits_per_dim(source: EncoderSource, test: str, workers: int = 2,
                      max_skipped: float = 0.01, max_contamination: float = DEFAULT_MAX) -> tuple[Path, dict[str, Any]]:
    """The model's loss on held-out images, in bits per predicted palette index (for ar: every
    pixel of the reduced image given the ones before it; for bert: the masked ones, masks seeded)."""
    start = time.monotonic()
    leaks = checked_contamination(source, test, max_contamination)
    source = source.resolved()
    model = load_pixel_model(source)
    shards, loader = _loader(source, test, workers)
    hook, generator = model.batch_hook(), torch.Generator().manual_seed(0)
    tally = ReadTally(shards.expected)
    total_nats = predicted = 0.0
    for batch in counted(loader, tally):
        batch = hook(batch, generator)
        count = int(batch["masked"].sum()) if "masked" in batch else batch["pixels"].numel()
        with source.autocast(str(batch["pixels"].device)):
            total_nats += model(batch).loss.float().item() * count
        predicted += count
    check_tally(test, FeatureSet({}, None, [], tally), max_skipped)
    if not tally.read:
        raise ConfigError(f"no test images in {test}")
    encoder = model.encoder()
    payload = {"bits_per_dim": total_nats / predicted / math.log(2), "task": model.config.task,
               "uniform_bits": math.log2(len(encoder.palette)), "palette_size": len(encoder.palette),
               "resolution": encoder.resolution, "test_samples": tally.read, "samples": {"test": tally.as_dict()},
               "contamination": leaks}
    return write_result(source, "bits-per-dim", payload, {"test": test}, time.monotonic() - start), payload
