"""iGPT (Chen et al., 2020): a transformer over an image's pixels as colour-palette indices.

Stages: quantize (loader workers: images -> the nearest palette colour of each pixel of the image
reduced to ``igpt.resolution``, raster order) -> forward_tokens (pre-norm transformer, causal for
``ar``) -> forward_loss (next index for ``ar``; the 15% masked indices for ``bert``). The encoder kept
for evaluation is the transformer itself: features = average-pooled hidden states of a layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitpipe.config import ConfigError, PretrainConfig, check
from vitpipe.ssl.objective import Objective, ObjectiveCommand, ObjectiveSpec, Output
from vitpipe.ssl.objectives.igpt import commands, figures
from vitpipe.ssl.vit import LN_EPS, Block, drop_path_rates, init_weights

PALETTE = "palette.json"


@dataclass
class IGPTConfig:
    task: str = "ar"
    """ar: predict every index from the ones before it (raster order) | bert: predict masked indices."""
    resolution: int = 16
    """Side of the reduced image the sequence is read from (32 in the paper; 16-24 on CPU)."""
    palette_size: int = 16
    """Colours of the k-means palette (512 in the paper; 16-64 suits greyscale data)."""
    palette: str = ""
    """A palette file from `vitpipe palette fit` to reuse ("" = fit one on this run's training shards)."""
    palette_images: int = 2000
    """Training images read to fit the palette."""
    palette_pixels: int = 200_000
    """Pixels (drawn from those images) k-means runs on."""
    palette_seed: int = 0
    """Seed of the pixel draw and of k-means."""
    mask_ratio: float = 0.15
    """bert: fraction of indices masked (exact per image)."""
    memory_budget_gb: float = 0.0
    """Refuse a batch x sequence whose estimated step memory exceeds this (0 = 80% of this machine's RAM)."""

    def __post_init__(self) -> None:
        check(self.task in ("ar", "bert"), "igpt.task must be ar | bert")
        check(4 <= self.resolution <= 64, "igpt.resolution must be in 4..64")
        check(2 <= self.palette_size <= 4096, "igpt.palette_size must be in 2..4096")
        check(self.palette_images >= 1 and self.palette_pixels >= self.palette_size,
              "igpt.palette_images must be >= 1 and igpt.palette_pixels >= igpt.palette_size")
        check(0 < self.mask_ratio < 1, "igpt.mask_ratio must be in (0, 1)")
        check(self.memory_budget_gb >= 0, "igpt.memory_budget_gb must be >= 0")


# -- palette ---------------------------------------------------------------------------------------


def fit_palette(pixels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """[N, C] pixels in [-1, 1] -> [size, C] k-means centroids (faiss), ordered by brightness so
    index order means something when printed."""
    import faiss

    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    kmeans = faiss.Kmeans(pixels.shape[1], size, niter=25, seed=seed, verbose=False, spherical=False)
    kmeans.train(pixels)
    centroids = kmeans.centroids
    return centroids[np.lexsort((*centroids.T[::-1], centroids.sum(axis=1)))]


def palette_bytes(palette: np.ndarray, source: str) -> bytes:
    return (json.dumps({"channels": int(palette.shape[1]), "space": "pixels scaled to [-1, 1]", "source": source,
                        "colours": [[float(v) for v in colour] for colour in palette]}) + "\n").encode()


def load_palette(data: bytes, channels: int, origin: str) -> torch.Tensor:
    """A palette file -> [K, C] tensor, checked against the run's channel count."""
    try:
        content = json.loads(data)
        colours = torch.tensor(content["colours"], dtype=torch.float32, device="cpu")  # checked: even in a meta build
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{origin}: not a vitpipe palette file ({err})") from None
    if colours.ndim != 2 or colours.shape[1] != channels or int(content.get("channels", -1)) != channels:
        raise ConfigError(f"{origin}: a palette of {colours.shape[-1] if colours.ndim == 2 else '?'}-channel colours, "
                          f"but this run's images have {channels} (data.channels)")
    check_palette(colours, origin)
    return colours


def check_palette(colours: torch.Tensor, origin: str) -> None:
    """What would train to a meaningless number: a non-finite colour (every distance NaN), two equal
    colours (the second never chosen: bits per dim measured against a smaller palette than
    claimed), a size igpt.palette_size cannot be set to."""
    if not torch.isfinite(colours).all():
        raise ConfigError(f"{origin}: the palette holds NaN or infinite values")
    distinct = len(torch.unique(colours, dim=0))
    if distinct < len(colours):
        raise ConfigError(f"{origin}: {len(colours) - distinct} of its {len(colours)} colours repeat others; "
                          "a palette's colours must differ")
    if not 2 <= len(colours) <= 4096:
        raise ConfigError(f"{origin}: {len(colours)} colours; a palette has 2..4096")


def to_unit_range(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, resolution: int) -> torch.Tensor:
    """Normalized [B, C, H, W] -> pixels in [-1, 1] reduced to [B, resolution^2, C], raster order."""
    pixels = (images * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)) * 2 - 1
    if pixels.shape[-1] != resolution or pixels.shape[-2] != resolution:
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode="area")
    return pixels.flatten(2).transpose(1, 2)


def quantize(pixels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """[..., C] pixels -> [...] index of the nearest palette colour."""
    return torch.cdist(pixels.reshape(-1, pixels.shape[-1]), palette).argmin(dim=1).view(pixels.shape[:-1])


def dequantize(indices: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """[...] indices -> [..., C] palette colours in [-1, 1]."""
    return palette[indices]


class Quantize:
    """Batch hook (loader workers): images -> ``pixels`` [B, T] palette indices, and for bert an
    exact ``mask_ratio`` of positions per image in ``masked`` [B, T]."""

    def __init__(self, palette: torch.Tensor, mean: list[float], std: list[float], resolution: int,
                 mask_ratio: float | None) -> None:
        self.palette, self.resolution, self.mask_ratio = palette, resolution, mask_ratio
        channels = palette.shape[1]
        self.mean, self.std = torch.tensor(mean[:channels]), torch.tensor(std[:channels])

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        images = batch["image"]
        batch["pixels"] = quantize(to_unit_range(images, self.mean, self.std, self.resolution), self.palette)
        if self.mask_ratio is not None:
            length = self.resolution**2
            ranks = torch.rand(len(images), length, generator=generator).argsort(dim=1)
            batch["masked"] = ranks < round(length * self.mask_ratio)
        return batch


# -- model -----------------------------------------------------------------------------------------


class PixelTransformer(nn.Module):
    """The encoder: palette-index embeddings + learned positions, pre-norm blocks (causal for ar).
    Given images it quantizes them itself, so evaluation feeds it like any encoder."""

    def __init__(self, palette: torch.Tensor, mean: list[float], std: list[float], resolution: int, width: int,
                 depth: int, heads: int, mlp_ratio: float, causal: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        channels = palette.shape[1]
        self.embed_dim, self.resolution, self.causal = width, resolution, causal
        self.register_buffer("palette", palette.clone())
        self.register_buffer("mean", torch.tensor(mean[:channels]))
        self.register_buffer("std", torch.tensor(std[:channels]))
        self.special = len(palette)  # start-of-image (ar) or mask (bert) token
        self.token_embed = nn.Embedding(len(palette) + 1, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, resolution**2, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, rate) for rate in drop_path_rates(drop_path, depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.apply(init_weights)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "token_embed.weight"}

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized [B, C, H, W] -> [B, T] palette indices of the reduced image."""
        return quantize(to_unit_range(images, self.mean, self.std, self.resolution), self.palette)

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, T] indices -> what the transformer reads: ar shifts right behind the start token."""
        if not self.causal:
            return pixels
        start = torch.full_like(pixels[:, :1], self.special)
        return torch.cat([start, pixels[:, :-1]], dim=1)

    def forward_tokens(self, tokens: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """[B, L] token ids (L <= T) -> normed [B, L, D] after each block in ``layers`` (default: last)."""
        wanted = [layer % self.depth for layer in (layers if layers is not None else [-1])]
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        outputs = {}
        for index, block in enumerate(self.blocks):
            x = block(x, is_causal=self.causal)
            if index in wanted:
                outputs[index] = self.norm(x)
                if len(outputs) == len(set(wanted)):
                    break  # later blocks would only cost time
        return [outputs[layer] for layer in wanted]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.inputs(self.quantize(images)))[0]

    def intermediate_layers(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        return self.forward_tokens(self.inputs(self.quantize(images)), layers)

    def pool(self, tokens: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """[B, T, D] -> [B, D]: the average over positions (the paper's probe features)."""
        if pool not in (None, "gap"):
            raise ConfigError(f"an iGPT encoder has no {pool!r} pooling (no CLS token): use gap")
        return tokens.mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(images))


class IGPT(Objective):
    transform_preset = "mae"
    batch_fields = ("image",)

    def __init__(self, encoder: PixelTransformer, config: IGPTConfig) -> None:
        super().__init__()
        self.backbone = encoder
        self.config = config
        self.head = nn.Linear(encoder.embed_dim, len(encoder.palette), bias=False)  # untied from the embedding
        nn.init.normal_(self.head.weight, std=0.02)

    def encoder(self) -> PixelTransformer:
        return self.backbone

    def batch_hook(self) -> Quantize:
        enc = self.backbone
        return Quantize(enc.palette, enc.mean.tolist(), enc.std.tolist(), enc.resolution,
                        self.config.mask_ratio if self.config.task == "bert" else None)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, L, K] scores of the palette index at each position."""
        return self.head(self.backbone.forward_tokens(tokens)[0])

    def forward_loss(self, logits: torch.Tensor, pixels: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy in nats per predicted index (every index for ar, the masked ones for bert)."""
        if masked is not None:
            return F.cross_entropy(logits[masked], pixels[masked])
        return F.cross_entropy(logits.flatten(0, 1), pixels.flatten())

    def forward(self, batch: dict[str, Any]) -> Output:
        pixels, masked = batch["pixels"], batch.get("masked")
        tokens = self.backbone.inputs(pixels) if masked is None else pixels.masked_fill(masked, self.backbone.special)
        loss = self.forward_loss(self.logits(tokens), pixels, masked)
        return Output(loss, {"bits_per_dim": loss.detach() / math.log(2)})

    @torch.no_grad()
    def complete(self, pixels: torch.Tensor, given: int, temperature: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, T] indices of which the first ``given`` are kept -> [B, T] with the rest sampled, one
        index at a time in raster order (ar only)."""
        if self.config.task != "ar":
            raise ConfigError("completing images needs igpt.task=ar (this run is bert)")
        out = pixels.clone()
        for position in range(given, pixels.shape[1]):
            scores = self.logits(self.backbone.inputs(out)[:, : position + 1])[:, -1] / max(temperature, 1e-6)
            if top_k:
                kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            out[:, position] = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        return out


# -- registry entry --------------------------------------------------------------------------------


def fit_artifacts(config: PretrainConfig, read) -> dict[str, bytes]:
    """The palette: k-means on pixels of the training images (or ``igpt.palette``, checked)."""
    from pathlib import Path

    igpt, data = config.igpt, config.data
    if igpt.palette:
        path = Path(igpt.palette)
        if not path.is_file():
            raise ConfigError(f"igpt.palette={igpt.palette}: no such file (make one with `vitpipe palette fit`)")
        colours = load_palette(path.read_bytes(), data.channels, str(path))
        check(len(colours) == igpt.palette_size, f"igpt.palette={igpt.palette} has {len(colours)} colours; "
                                                 f"set igpt.palette_size={len(colours)}")
        return {PALETTE: path.read_bytes()}
    return {PALETTE: palette_from_shards(data, igpt, read)}


def palette_from_shards(data, igpt: IGPTConfig, read) -> bytes:
    """A palette file's bytes: k-means on pixels of the shards ``read`` yields (``data``: DataConfig)."""
    pixels = sample_pixels(read, data, igpt)
    distinct = len(np.unique(pixels, axis=0))
    if distinct < 2:
        raise ConfigError(f"{data.shards}: every sampled pixel has the same colour; nothing for iGPT to model")
    if distinct < igpt.palette_size:  # k-means would repeat colours
        raise ConfigError(f"{data.shards}: the sampled pixels have {distinct} distinct colours, fewer than "
                          f"igpt.palette_size={igpt.palette_size}; set igpt.palette_size={distinct} or less")
    return palette_bytes(fit_palette(pixels, igpt.palette_size, igpt.palette_seed), data.shards)


def sample_pixels(read, data, igpt: IGPTConfig) -> np.ndarray:
    """Pixels in [-1, 1] of up to ``palette_images`` images at the run's resolution, then a seeded draw."""
    channels = data.channels
    mean, std = torch.tensor(data.mean[:channels]), torch.tensor(data.std[:channels])
    parts = [to_unit_range(batch["image"], mean, std, igpt.resolution).reshape(-1, channels)
             for batch in read(("image",), igpt.palette_images)]
    if not parts:
        raise ConfigError(f"{data.shards}: no images to fit the palette on")
    pixels = torch.cat(parts).numpy()
    rng = np.random.default_rng(igpt.palette_seed)
    return pixels[rng.choice(len(pixels), size=min(igpt.palette_pixels, len(pixels)), replace=False)]


def build(config: PretrainConfig, artifacts: dict[str, bytes]) -> IGPT:
    igpt, model, data = config.igpt, config.model, config.data
    palette = load_palette(artifacts[PALETTE], data.channels, f"artifact {PALETTE}")
    encoder = PixelTransformer(palette, data.mean, data.std, igpt.resolution, model.embed_dim, model.depth,
                               model.num_heads, model.mlp_ratio, causal=igpt.task == "ar",
                               drop_path=model.drop_path)
    return IGPT(encoder, igpt)


def step_memory_bytes(batch: int, length: int, width: int, depth: int, vocab: int) -> float:
    """Estimated peak bytes of one training step (fp32): ~20 saved [T, D] tensors per block (fused
    attention keeps no T x T scores) plus the logits and their gradient. Measured against real
    peaks at 16x16 and 24x24 in benchmarks/RESULTS.md (iGPT memory): within 10%."""
    return 4.0 * batch * (depth * 20 * length * width + 3 * length * vocab)


def check_memory(config: PretrainConfig) -> None:
    import os

    igpt, model = config.igpt, config.model
    length = igpt.resolution**2
    need = step_memory_bytes(config.train.batch_size, length, model.embed_dim, model.depth, igpt.palette_size)
    budget = igpt.memory_budget_gb * 2**30 or 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > budget:
        raise ConfigError(f"igpt: a step of train.batch_size={config.train.batch_size} x {length} tokens "
                          f"({igpt.resolution}x{igpt.resolution}) needs ~{need / 2**30:.1f} GiB, over "
                          f"the {budget / 2**30:.1f} GiB budget (igpt.memory_budget_gb); lower train.batch_size "
                          "(raise train.grad_accum) or igpt.resolution")


SPEC = ObjectiveSpec(
    name="igpt", build=build, section="igpt", section_type=IGPTConfig, fit_artifacts=fit_artifacts,
    preflight=check_memory, probe_layers="all",
    # the paper's optimizer (AdamW betas 0.9/0.95, no weight decay for the small models), images
    # kept whole and in [-1, 1] like the palette; width/depth/heads come from model.*
    defaults={"optim": {"betas": [0.9, 0.95], "weight_decay": 0.0, "base_lr": 1e-3, "warmup_fraction": 0.05},
              "data": {"crop_scale_min": 0.8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
              "model": {"class_token": False, "pool": "gap"}},
    summary="iGPT: autoregressive (or BERT) modelling of palette-quantized pixels (palette fitted by k-means)",
    renamed={"objective": "task"},
    commands=(ObjectiveCommand("bits-per-dim", commands.eval_bits_per_dim),
              ObjectiveCommand("sample", commands.sample, group="")),
    figures=(figures.completions,),
)
