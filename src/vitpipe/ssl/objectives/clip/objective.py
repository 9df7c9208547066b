"""CLIP (Radford et al., 2021): image and text towers trained to agree, contrastively.

Stages: tokenise (loader workers) -> encode_image / encode_text (projected, L2-normalised) ->
forward_loss (symmetric cross-entropy over the global batch: features gathered across processes
with gradient). Locked-image tuning (LiT, Zhai et al., 2022): ``clip.image_init`` starts the image
tower from another vitpipe run's encoder, ``clip.lock_image`` freezes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitpipe.config import ConfigError, PretrainConfig, check
from vitpipe.ssl.engine.distributed import (
    gather_others,
    gather_with_grad,
    is_first_process,
)
from vitpipe.ssl.engine.warmstart import ENCODER_INIT
from vitpipe.ssl.objective import Objective, ObjectiveCommand, ObjectiveSpec, Output
from vitpipe.ssl.objectives.clip import commands, figures
from vitpipe.ssl.objectives.clip.text import TextTransformer, Tokenize, fit_bpe
from vitpipe.ssl.vit import VisionTransformer

MAX_LOGIT_SCALE = math.log(100)
TOKENIZER = "tokenizer.json"
IMAGE_INIT = "image_init.safetensors"
"""Where runs made before the engine started encoders (``warmstart``) kept LiT's image tower."""


@dataclass
class CLIPConfig:
    embed_dim: int = 128
    """Width of the shared image-text space (both projections)."""
    text_width: int = 128
    """Text transformer width."""
    text_depth: int = 4
    """Text transformer blocks."""
    text_heads: int = 4
    """Text transformer attention heads."""
    context_length: int = 32
    """Tokens per caption, [SOT] and [EOT] included; longer captions are cut (and counted)."""
    vocab_size: int = 4096
    """BPE vocabulary fitted on the training captions."""
    lowercase: bool = True
    """Lower-case captions before tokenising."""
    tokenizer_samples: int = 200_000
    """Captions read from the training shards to fit the BPE."""
    image_init: str = ""
    """LiT: a vitpipe run or checkpoint whose encoder starts the image tower ("" = random init)."""
    lock_image: bool = False
    """LiT: freeze the image tower (only the projections and the text tower train)..."""
    unlocked_blocks: int = 0
    """... except its last N blocks and final norm."""

    def __post_init__(self) -> None:
        check(min(self.text_width, self.text_depth, self.text_heads, self.embed_dim) >= 1,
              "clip.text_width, text_depth, text_heads and embed_dim must be >= 1")
        check(self.text_width % self.text_heads == 0, "clip.text_width must be divisible by clip.text_heads")
        check(self.context_length >= 4, "clip.context_length must be >= 4")
        check(self.vocab_size >= 300, "clip.vocab_size must be >= 300 (the byte alphabet and special tokens)")
        check(self.unlocked_blocks >= 0 and self.tokenizer_samples >= 1, "bad clip.unlocked_blocks / tokenizer_samples")
        check(not self.unlocked_blocks or self.lock_image, "clip.unlocked_blocks needs clip.lock_image=true")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor,
                     logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, E] unit image and text features, pair i = (image i, text i) -> (symmetric cross-entropy,
    image-to-text top-1 accuracy). One pair has no negative: its loss is 0 whatever the weights."""
    if len(image) < 2:
        raise ConfigError("CLIP needs at least 2 image-text pairs per step over all processes (each is the "
                          f"others' negative); this step has {len(image)}: raise train.batch_size")
    logits = logit_scale.exp() * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss, (logits.argmax(dim=1) == labels).float().mean()


class CLIP(Objective):
    transform_preset = "mae"  # random resized crop; clip-style recipes keep most of the image (data.crop_scale_min)
    batch_fields = ("image", "text")
    accumulates_step = True  # every micro-batch of a step is a negative for every other (``accumulate``)

    def __init__(self, image: VisionTransformer, text: TextTransformer, config: CLIPConfig, tokenizer: bytes) -> None:
        super().__init__()
        self.backbone = image
        self.text = text
        self.image_proj = nn.Linear(image.embed_dim, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.embed_dim, config.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image.embed_dim ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text.embed_dim ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.tokenize = Tokenize(tokenizer, config.context_length)
        self.captions_truncated = 0  # on this process, since this session started
        self.locked: list[nn.Module] = []
        if config.lock_image:
            self._lock(config.unlocked_blocks)

    def _lock(self, unlocked_blocks: int) -> None:
        """Freeze the image tower but its last ``unlocked_blocks`` blocks (and its norm then). A locked
        module is bit-identical after training: no gradient, and kept in eval mode (a conv stem's
        BatchNorm statistics would move in train mode; drop-path would not be the locked function)."""
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        trainable = list(self.backbone.blocks[len(self.backbone.blocks) - unlocked_blocks:]) if unlocked_blocks else []
        for module in trainable + ([self.backbone.norm] if unlocked_blocks else []):
            module.requires_grad_(True)
        self.locked = [m for m in self.backbone.modules() if not any(p.requires_grad for p in m.parameters())]
        self.train(self.training)

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        for module in self.locked:
            module.train(False)
        return self

    def encoder(self) -> VisionTransformer:
        return self.backbone

    def batch_hook(self) -> Tokenize:
        return self.tokenize

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | {"text.pos_embed", "logit_scale"}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, E], unit length."""
        return F.normalize(self.image_proj(self.backbone(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, E], unit length."""
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def forward_loss(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric cross-entropy over the global batch (every process's pairs are negatives for
        every other's); returns (loss, image-to-text top-1 accuracy)."""
        return contrastive_loss(gather_with_grad(image), gather_with_grad(text), self.logit_scale)

    def forward(self, batch: dict[str, Any]) -> Output:
        loss, accuracy = self.forward_loss(self.encode_image(batch["image"]), self.encode_text(batch["tokens"]))
        return Output(loss, {"logit_scale": self.logit_scale.exp().item(), "batch_i2t_top1": accuracy,
                             "captions_truncated": self._count_truncated([batch])})

    def accumulate(self, batches: list[dict[str, Any]], backward) -> Output:
        """Gradient accumulation that keeps the whole step's batch as negatives (open_clip's
        accum_freq): features of every micro-batch without gradient (and every other process's), then
        each micro-batch again with gradient against the cached rest. The loss of each pass is the
        global batch's; the gradients each process gets are its own samples' share, to be summed
        over processes (``distributed.sum_gradients``). ``backward(loss)`` is called once per
        micro-batch; nothing is called for a non-finite loss."""
        with torch.no_grad():
            cached = [(self.encode_image(b["image"]), self.encode_text(b["tokens"])) for b in batches]
            others = [gather_others(torch.cat([c[i] for c in cached])) for i in (0, 1)]
            loss, accuracy = self._pairs_loss(cached, others)
        if torch.isfinite(loss):
            for index, batch in enumerate(batches):
                own = (self.encode_image(batch["image"]), self.encode_text(batch["tokens"]))
                mixed = [own if i == index else c for i, c in enumerate(cached)]
                # every pass computes the same global loss: the temperature's gradient is taken once
                backward(self._pairs_loss(mixed, others, scale_grad=index == 0 and is_first_process())[0])
        return Output(loss, {"logit_scale": self.logit_scale.exp().item(), "batch_i2t_top1": accuracy,
                             "captions_truncated": self._count_truncated(batches)})

    def _count_truncated(self, batches: list[dict[str, Any]]) -> float:
        """The running total of captions cut at the context length (this process, this session)."""
        self.captions_truncated += sum(int(b.get("captions_truncated", 0)) for b in batches)
        return float(self.captions_truncated)

    def _pairs_loss(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], others: list[torch.Tensor],
                    scale_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """forward_loss over this process's (image, text) micro-batches and the other processes'
        cached features, on this process alone (the loss does not depend on the order of pairs)."""
        image = torch.cat([p[0] for p in pairs] + [others[0]])
        text = torch.cat([p[1] for p in pairs] + [others[1]])
        scale = self.logit_scale if scale_grad else self.logit_scale.detach()
        return contrastive_loss(image, text, scale)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)  # exp(t) <= 100, as in the paper


def fit_artifacts(config: PretrainConfig, read) -> dict[str, bytes]:
    """The BPE tokenizer fitted on the training captions (the engine adds LiT's image tower: ``encoder_init``)."""
    captions = (text for batch in read(("text",), config.clip.tokenizer_samples) for text in batch["text"])
    files = {TOKENIZER: fit_bpe(captions, config.clip.vocab_size, config.clip.lowercase)}
    return files


def _image_init(config: PretrainConfig) -> str:
    return config.clip.image_init


def build(config: PretrainConfig, artifacts: dict[str, bytes]) -> CLIP:
    from safetensors.torch import load

    clip = config.clip
    image = VisionTransformer(config.model, config.data.image_size, config.data.channels)
    init = artifacts.get(ENCODER_INIT, artifacts.get(IMAGE_INIT))  # the engine's name, or older runs'
    if init is not None:
        image.load_state_dict(load(init))
    text = TextTransformer(clip.vocab_size, clip.context_length, clip.text_width, clip.text_depth, clip.text_heads)
    return CLIP(image, text, clip, artifacts[TOKENIZER])


SPEC = ObjectiveSpec(
    name="clip", build=build, section="clip", section_type=CLIPConfig, fit_artifacts=fit_artifacts,
    encoder_init=_image_init,
    # the paper's optimizer (AdamW betas 0.9/0.98, eps 1e-6, wd 0.2), crops that keep most of the
    # image and no flips (captions say "left"), gap pooling of the image tower
    defaults={"optim": {"betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2, "base_lr": 1e-3,
                        "warmup_fraction": 0.1},
              "data": {"crop_scale_min": 0.9, "hflip": False}, "model": {"pool": "gap"}},
    summary="CLIP: contrastive image-text pretraining (tokenizer fitted on the captions; LiT with clip.image_init)",
    towers=("image", "text"), needs=("text",),
    commands=(ObjectiveCommand("zero-shot", commands.eval_zero_shot),),
    figures=(figures.zero_shot_confusion, figures.text_query_grid),
)

