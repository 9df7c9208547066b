"""I-JEPA (Assran et al., 2023): predict the target encoder's representations of masked blocks
from a context block, in latent space.

Stages: masks (loader workers, ``MultiBlockMasks``) -> the student (context encoder + predictor,
``Student``: what the optimizer trains and compile / DDP wrap) -> forward_targets (EMA encoder, no
gradient) -> forward_loss; ``on_step_end`` moves the EMA.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitpipe.config import PretrainConfig, check
from vitpipe.ssl.engine.ema import ema_update
from vitpipe.ssl.engine.schedules import linear
from vitpipe.ssl.masking import MultiBlockMasks
from vitpipe.ssl.objective import Objective, ObjectiveSpec, Output
from vitpipe.ssl.vit import (
    LN_EPS,
    Block,
    VisionTransformer,
    init_weights,
    sincos_pos_embed_2d,
)


@dataclass
class JEPAConfig:
    predictor_dim: int = 96
    """Predictor token width (narrower than the encoder)."""
    predictor_depth: int = 4
    """Predictor blocks."""
    predictor_heads: int = 4
    """Predictor attention heads."""
    num_targets: int = 4
    """Target blocks per image."""
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])
    """Fraction of the patch grid one target block covers (min, max)."""
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])
    """Height / width of a target block (min, max)."""
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    """Fraction of the grid the context block covers before the targets are cut out of it."""
    min_keep: int = 4
    """Fewest context patches an image may keep."""
    ema_start: float = 0.996
    """EMA momentum of the target encoder at step 0 ..."""
    ema_end: float = 1.0
    """... rising linearly to this at the last step."""
    loss: str = "smooth_l1"
    """smooth_l1 | mse, in latent space."""

    def __post_init__(self) -> None:
        check(self.predictor_dim % self.predictor_heads == 0, "jepa.predictor_dim must be divisible by predictor_heads")
        check(self.predictor_dim % 4 == 0, "jepa.predictor_dim must be divisible by 4 (sin-cos positions)")
        check(self.predictor_depth >= 1 and self.num_targets >= 1, "jepa.predictor_depth and num_targets must be >= 1")
        for name in ("target_scale", "target_aspect", "context_scale"):
            low, high = (list(getattr(self, name)) + [0, 0])[:2]
            check(len(getattr(self, name)) == 2 and 0 < low <= high, f"jepa.{name} needs two values, 0 < min <= max")
        check(self.target_scale[1] <= 1 and self.context_scale[1] <= 1, "jepa scales must be <= 1")
        check(self.min_keep >= 1, "jepa.min_keep must be >= 1")
        check(0 <= self.ema_start <= self.ema_end <= 1, "jepa EMA momentum needs 0 <= ema_start <= ema_end <= 1")
        check(self.loss in ("smooth_l1", "mse"), "jepa.loss must be smooth_l1 | mse")


class Predictor(nn.Module):
    """Narrow transformer: context tokens + mask tokens at the targets' positions -> target features."""

    def __init__(self, encoder_dim: int, grid: tuple[int, int], config: JEPAConfig) -> None:
        super().__init__()
        dim = config.predictor_dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid))  # a constant
        self.blocks = nn.ModuleList(Block(dim, config.predictor_heads) for _ in range(config.predictor_depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.proj = nn.Linear(dim, encoder_dim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """context [B, Kc, D], context_idx [B, Kc], target_idx [B, T, Kt] -> predictions [B, T, Kt, D]."""
        batch, targets, length = target_idx.shape
        positions = self.pos_embed.expand(batch, -1, -1)
        x = self.embed(context) + torch.gather(positions, 1, _expand(context_idx, positions.shape[-1]))
        x = x.repeat_interleave(targets, dim=0)  # one sequence per (image, target): [B*T, Kc, P]
        flat_targets = target_idx.flatten(0, 1)  # [B*T, Kt]
        queries = self.mask_token + torch.gather(positions.repeat_interleave(targets, dim=0), 1,
                                                 _expand(flat_targets, positions.shape[-1]))
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, -length:])).unflatten(0, (batch, targets))


def _expand(index: torch.Tensor, width: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(*index.shape, width)


class Student(nn.Module):
    """Context encoder + predictor; attribute names are JEPA's own, so parameter names match."""

    def __init__(self, backbone: VisionTransformer, predictor: Predictor) -> None:
        super().__init__()
        self.backbone, self.predictor = backbone, predictor

    def forward(self, images: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], context_idx [B, Kc], target_idx [B, T, Kt] -> predictions [B, T, Kt, D]
        (the context encoder's prefix tokens dropped)."""
        context = self.backbone.forward_features(images, keep_idx=context_idx)[:, self.backbone.num_prefix_tokens:]
        return self.predictor(context, context_idx, target_idx)


class JEPA(Objective):
    transform_preset = "mae"  # random resized crop + flip: I-JEPA uses no other augmentation
    batch_fields = ("image",)

    def __init__(self, encoder: VisionTransformer, config: JEPAConfig) -> None:
        super().__init__()
        self.backbone = encoder  # the context encoder: the only one the optimizer trains
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.predictor = Predictor(encoder.embed_dim, encoder.grid, config)
        self.config = config
        object.__setattr__(self, "student", Student(self.backbone, self.predictor))  # not a submodule: same names
        # a buffer, so a resumed run logs the momentum an uninterrupted one would
        self.register_buffer("momentum", torch.tensor(config.ema_start, dtype=torch.float64))
        self.masks = MultiBlockMasks(encoder.grid, config.num_targets, tuple(config.target_scale),
                                     tuple(config.target_aspect), tuple(config.context_scale), config.min_keep)
        self.masks.check()

    def encoder(self) -> VisionTransformer:
        """Evaluation and export use the EMA target encoder (average-pooled by default)."""
        return self.target_encoder

    def batch_hook(self) -> MultiBlockMasks:
        return self.masks

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | {"predictor.mask_token"}

    def trainable_module(self) -> Student:
        return self.student

    @torch.no_grad()
    def forward_targets(self, images: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """Layer-normed target-encoder tokens of the full image at the targets: [B, T, Kt, D]."""
        self.target_encoder.eval()
        tokens = self.target_encoder.forward_features(images)[:, self.target_encoder.num_prefix_tokens:]
        tokens = F.layer_norm(tokens, tokens.shape[-1:])
        flat = torch.gather(tokens, 1, _expand(target_idx.flatten(1), tokens.shape[-1]))
        return flat.unflatten(1, target_idx.shape[1:])

    def forward_loss(self, predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "mse":
            return F.mse_loss(predicted, targets)
        return F.smooth_l1_loss(predicted, targets)

    def forward(self, batch: dict[str, Any]) -> Output:
        images, context_idx, target_idx = batch["image"], batch["context_idx"], batch["target_idx"]
        predicted = self.trainable(images, context_idx, target_idx)
        return Output(self.forward_loss(predicted, self.forward_targets(images, target_idx)),
                      {"ema_momentum": self.momentum.item(), "context_patches": float(context_idx.shape[1]),
                       "mask_shortfalls": float(batch.get("mask_shortfalls", 0))})

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """target <- m * target + (1 - m) * context, m from ema_start to ema_end over training, for
        parameters and floating buffers alike (a conv stem's BatchNorm statistics are the target's
        too: eval and export use this encoder); integer buffers (batch counts) are copied."""
        momentum = linear(step, max_steps, self.config.ema_start, self.config.ema_end)
        self.momentum.fill_(momentum)
        ema_update(self.target_encoder, self.backbone, momentum)


def build(config: PretrainConfig, artifacts: dict[str, bytes]) -> JEPA:
    return JEPA(VisionTransformer(config.model, config.data.image_size, config.data.channels), config.jepa)


SPEC = ObjectiveSpec(
    name="jepa", build=build, section="jepa", section_type=JEPAConfig,
    # the paper's recipe: no CLS token, average-pooled features, AdamW with weight decay 0.04 -> 0.4,
    # crops of 30-100%; lr scaled for small CPU batches (the paper: 1e-3 at batch 2048)
    defaults={"model": {"class_token": False, "pool": "gap"}, "data": {"crop_scale_min": 0.3},
              "optim": {"base_lr": 1e-3, "weight_decay": 0.04, "weight_decay_end": 0.4, "betas": [0.9, 0.999],
                        "warmup_fraction": 0.1, "min_lr": 1e-6}},
    summary="I-JEPA: predict the EMA encoder's latents of masked blocks from a context block",
)
