"""Masked autoencoder (He et al., 2021): encode the visible 25%, decode pixels of the rest.

Stages: random_masking -> forward_encoder -> forward_decoder -> forward_loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitpipe.config import PretrainConfig, check
from vitpipe.ssl.objective import Objective, ObjectiveSpec, Output
from vitpipe.ssl.objectives.mae import figures
from vitpipe.ssl.vit import (
    LN_EPS,
    Block,
    VisionTransformer,
    init_weights,
    patchify,
    sincos_pos_embed_2d,
)


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder."""
    decoder_dim: int = 128
    """Decoder token width."""
    decoder_depth: int = 2
    """Decoder blocks."""
    decoder_heads: int = 4
    """Decoder attention heads."""
    norm_pix_loss: bool = True
    """Regress per-patch normalized pixels (mean 0, std 1 per patch)."""

    def __post_init__(self) -> None:
        check(0 < self.mask_ratio < 1, "mae.mask_ratio must be in (0, 1)")
        check(self.decoder_dim % self.decoder_heads == 0, "mae.decoder_dim must be divisible by mae.decoder_heads")
        check(self.decoder_depth >= 1, "mae.decoder_depth must be >= 1")


class MAE(Objective):
    transform_preset = "mae"
    batch_fields = ("image",)

    def __init__(self, encoder: VisionTransformer, config: MAEConfig) -> None:
        super().__init__()
        self.backbone = encoder
        self.config = config
        self.patch_size = encoder.patch_size
        self.channels = encoder.in_chans
        dim = config.decoder_dim
        prefix = encoder.num_prefix_tokens
        self.decoder_embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dim, encoder.grid, prefix))  # a constant
        self.decoder_blocks = nn.ModuleList(Block(dim, config.decoder_heads) for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(dim, self.patch_size ** 2 * self.channels)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def encoder(self) -> VisionTransformer:
        return self.backbone

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def random_masking(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random subset of patches.

        Returns keep_idx [B, K] (visible patches, K = N * (1 - ratio)), mask [B, N] (1 = hidden)
        and restore_idx [B, N] (puts a [visible, hidden] sequence back in patch order).
        """
        n = self.backbone.num_patches
        keep = int(n * (1 - self.config.mask_ratio))
        noise = torch.rand(batch, n, device=device)
        shuffle_idx = torch.argsort(noise, dim=1)
        restore_idx = torch.argsort(shuffle_idx, dim=1)
        keep_idx = shuffle_idx[:, :keep]
        mask = torch.ones(batch, n, device=device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore_idx)
        return keep_idx, mask, restore_idx

    def forward_encoder(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], keep_idx [B, K] -> encoded tokens [B, prefix + K, D]."""
        return self.backbone.forward_features(images, keep_idx=keep_idx)

    def forward_decoder(self, tokens: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
        """[B, prefix + K, D] -> pixel predictions for every patch [B, N, p*p*C]."""
        prefix = self.backbone.num_prefix_tokens
        x = self.decoder_embed(tokens)
        batch, n = restore_idx.shape
        visible = x[:, prefix:]
        masked = self.mask_token.expand(batch, n - visible.shape[1], -1)
        patches = torch.cat([visible, masked], dim=1)
        patches = torch.gather(patches, 1, restore_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch targets [B, N, p*p*C] (normalized per patch with norm_pix_loss)."""
        target = patchify(images, self.patch_size)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over hidden patches only."""
        per_patch = ((pred - self.target(images)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, batch: dict[str, Any]) -> Output:
        images = batch["image"]
        keep_idx, mask, restore_idx = self.random_masking(images.shape[0], images.device)
        pred = self.forward_decoder(self.forward_encoder(images, keep_idx), restore_idx)
        return Output(self.forward_loss(images, pred, mask), {"mask_ratio": mask.mean()})


def build(config: PretrainConfig, artifacts: dict[str, bytes]) -> MAE:
    return MAE(VisionTransformer(config.model, config.data.image_size, config.data.channels), config.mae)


SPEC = ObjectiveSpec(
    name="mae", build=build, section="mae", section_type=MAEConfig,
    summary="masked autoencoder: reconstruct the pixels of 75% hidden patches",
    figures=(figures.reconstructions,),
)
