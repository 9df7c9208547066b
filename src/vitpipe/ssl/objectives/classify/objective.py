"""Supervised classification on top of a pretrained encoder: the objective used for fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitpipe.config import PretrainConfig, check
from vitpipe.ssl.objective import Objective, ObjectiveSpec, Output
from vitpipe.ssl.vit import VisionTransformer


@dataclass
class FinetuneConfig:
    num_classes: int = 0
    """Classes of the labelled data; 0 = from the training shards' manifest label map."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i of D gets lr * decay^(D - i); 1 disables it."""
    freeze_blocks: int = 0
    """Freeze the first K transformer blocks."""
    freeze_patch_embed: bool = False
    """Freeze the patch embedding."""
    layer: int = -1
    """Classify from this block's features (0-based; -1 = the last): later blocks are dropped (iGPT's
    best features sit mid-stack)."""

    def __post_init__(self) -> None:
        check(self.num_classes == 0 or self.num_classes >= 2, "finetune.num_classes must be 0 (from the data) or >= 2")
        check(0 <= self.label_smoothing < 1, "finetune.label_smoothing must be in [0, 1)")
        check(0 < self.layer_decay <= 1, "finetune.layer_decay must be in (0, 1]")
        check(self.freeze_blocks >= 0, "finetune.freeze_blocks must be >= 0")
        check(self.layer >= -1, "finetune.layer must be -1 (the last block) or a block number")


class Classifier(Objective):
    transform_preset = "finetune"
    batch_fields = ("image", "label")

    def __init__(self, encoder: VisionTransformer, config: FinetuneConfig) -> None:
        super().__init__()
        check(config.num_classes >= 2, "finetune.num_classes must be >= 2 (or 0 with labelled shards)")
        if config.layer >= 0:
            check(config.layer < encoder.depth, f"finetune.layer={config.layer}: the encoder has blocks 0..{encoder.depth - 1}")
            encoder.blocks = encoder.blocks[: config.layer + 1]
        self.backbone = encoder
        self.config = config
        self.head = nn.Linear(encoder.embed_dim, config.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self._freeze()

    def _freeze(self) -> None:
        frozen = []
        if self.config.freeze_patch_embed:  # a ViT's patch embedding, a pixel model's colour embedding
            frozen.append(getattr(self.backbone, "patch_embed", None) or self.backbone.token_embed)
        frozen += list(self.backbone.blocks[: self.config.freeze_blocks])
        for module in frozen:
            for param in module.parameters():
                param.requires_grad_(False)
        if self.config.freeze_blocks and getattr(self.backbone, "cls_token", None) is not None:
            self.backbone.cls_token.requires_grad_(False)  # it only reaches the first block

    def encoder(self) -> VisionTransformer:
        return self.backbone

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def lr_scale(self, name: str) -> float:
        """Layer-wise decay: the head gets 1, block i gets decay^(depth - i), embeddings decay^(depth + 1)."""
        depth = len(self.backbone.blocks)
        decay = self.config.layer_decay
        if name.startswith("backbone.blocks."):
            return decay ** (depth - int(name.split(".")[2]))
        if name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed", "backbone.token_embed")):
            return decay ** (depth + 1)
        return 1.0

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, classes]."""
        return self.head(self.backbone(images))

    def forward(self, batch: dict[str, Any]) -> Output:
        logits = self.logits(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.config.label_smoothing)
        accuracy = (logits.argmax(dim=-1) == batch["label"]).float().mean()
        return Output(loss, {"train_top1": accuracy})


def build(config: PretrainConfig, artifacts: dict[str, bytes]) -> Classifier:
    return Classifier(VisionTransformer(config.model, config.data.image_size, config.data.channels), config.finetune)


SPEC = ObjectiveSpec(
    name="classify", build=build, section="finetune", section_type=FinetuneConfig, needs=("label",),
    # the fine-tuning recipe (DeiT/MAE style, shortened): what `vitpipe eval finetune` starts from
    defaults={"optim": {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_fraction": 0.1,
                        "warmup_steps": 0, "min_lr": 1e-6, "clip_grad": 0.0},
              "train": {"max_steps": 1000, "batch_size": 128, "grad_accum": 1, "ckpt_every_steps": 250},
              "model": {"drop_path": 0.1}, "data": {"crop_scale_min": 0.08},
              "finetune": {"label_smoothing": 0.1, "layer_decay": 0.75}},
    summary="supervised classification (what `vitpipe eval finetune` trains)",
)
