"""Vision Transformer backbone.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``attn_pool``) so an exported encoder loads into ``timm.create_model`` with a strict state dict.
The one difference is the patch projection: a Linear over einops patches here, a Conv2d in timm
(same numbers, reshaped at export).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import AttentionPoolLatent, DropPath
from torch import nn

from vitpipe.config import ModelConfig

LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch*patch*C], patches in raster order."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, patch*patch*C] -> [B, C, H, W]; the inverse of ``patchify``."""
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid[0], w=grid[1], p1=patch, p2=patch,
                     c=channels)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [1, prefix + H*W, dim]; prefix positions are zeros."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)  # width first, as in MAE
    table = torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), table], dim=0)
    return table.float().unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """[B, T, D] -> [B, T, D] with fused attention."""
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, heads, T, T] softmax weights (for pictures, not for training)."""
        q, k, _ = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    checkpointing = False
    """Recompute this block's activations in the backward pass instead of keeping them (set by
    ``set_grad_checkpointing``); only while training with gradients on. Same gradients: the RNG
    state (drop path) is restored for the recomputation."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, attn_mask, is_causal, use_reentrant=False)
        return self._forward(x, attn_mask, is_causal)

    def _forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(last: float, depth: int) -> list[float]:
    """Stochastic depth per block, rising linearly from 0 to ``last``: plain numbers computed on the
    CPU, so a model built on the meta device (FSDP's other processes) gets them too."""
    return torch.linspace(0, last, depth, device="cpu").tolist()


def set_grad_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Activation checkpointing for every transformer block of ``model``: each objective's encoder,
    decoder, predictor and text tower are built of ``Block``. Returns how many blocks it set."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.checkpointing = enabled
    return len(blocks)


def init_weights(module: nn.Module) -> None:
    """MAE/timm init: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PatchEmbed(nn.Module):
    """einops patchify + Linear; or, with ``conv_stem``, stride-2 3x3 convs then a 1x1 projection."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, conv_stem: bool = False) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv_stem = conv_stem
        if conv_stem:
            if patch_size & (patch_size - 1):
                raise ValueError("a convolutional stem needs a power-of-two patch size")
            layers, channels = [], in_chans
            for index in range(int(math.log2(patch_size))):
                width = max(dim // 2 ** (int(math.log2(patch_size)) - index), 16)
                layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
            self.stem = nn.Sequential(*layers)
            self.proj = nn.Linear(channels, dim)
        else:
            self.proj = nn.Linear(patch_size * patch_size * in_chans, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, D]."""
        if self.conv_stem:
            return self.proj(rearrange(self.stem(images), "b c h w -> b (h w) c"))
        return self.proj(patchify(images, self.patch_size))


class VisionTransformer(nn.Module):
    """The shape comes from ``ModelConfig`` (the one place it is described) plus the input size."""

    def __init__(self, config: ModelConfig, image_size: int, in_chans: int = 3) -> None:
        super().__init__()
        if image_size % config.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {config.patch_size}")
        self.config, self.image_size, self.in_chans = config, image_size, in_chans
        self.embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        self.grid = (image_size // config.patch_size,) * 2
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_prefix_tokens = 1 if config.class_token else 0
        self.patch_embed = PatchEmbed(config.patch_size, in_chans, config.embed_dim, config.conv_stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim)) if config.class_token else None
        learned = config.pos_embed == "learned"
        table = (torch.randn(1, self.num_prefix_tokens + self.num_patches, config.embed_dim) * 0.02 if learned
                 else sincos_pos_embed_2d(config.embed_dim, self.grid, self.num_prefix_tokens))
        if learned:
            self.pos_embed = nn.Parameter(table)
        else:  # a constant: a buffer, never in the optimizer (same state-dict key as a learned table)
            self.register_buffer("pos_embed", table)
        rates = drop_path_rates(config.drop_path, config.depth)
        self.norm_pre = nn.LayerNorm(config.embed_dim, eps=LN_EPS) if config.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(config.embed_dim, config.num_heads, config.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(config.embed_dim, eps=LN_EPS)
        self.attn_pool = (AttentionPoolLatent(config.embed_dim, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                                              norm_layer=partial(nn.LayerNorm, eps=LN_EPS)) if config.pool == "map" else None)
        self.apply(init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        if not config.conv_stem:  # MAE: init the patch projection like a conv (xavier on the flattened kernel)
            nn.init.xavier_uniform_(self.patch_embed.proj.weight)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> patch tokens with positions [B, N, D] (no prefix token yet).

        Another input resolution gets the position table interpolated on the fly (bicubic)."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return self.patch_embed(images) + self._patch_positions(grid)

    def _patch_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        table = self.pos_embed[:, self.num_prefix_tokens:]
        if grid == self.grid:
            return table
        table = rearrange(table, "1 (h w) d -> 1 d h w", h=self.grid[0], w=self.grid[1])
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return rearrange(table, "1 d h w -> 1 (h w) d")

    def add_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, D] -> the first block's input [B, prefix + N, D]: the CLS token
        prepended (if any), then ``norm_pre`` (an identity unless model.pre_norm)."""
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        return self.norm_pre(tokens)

    def forward_features(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] (+ keep_idx [B, K]) -> normed tokens [B, prefix + (K or N), D]."""
        tokens = self.embed(images)
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        x = self.add_prefix(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def intermediate_layers(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Tokens [B, T, D] after each block in ``layers`` (0-based; -1 = last), final norm applied."""
        wanted = {layer % len(self.blocks) for layer in layers}
        x = self.add_prefix(self.embed(images))
        outputs = {}
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in wanted:
                outputs[index] = self.norm(x)
                if len(outputs) == len(wanted):
                    break  # later blocks would only cost time
        return [outputs[layer % len(self.blocks)] for layer in layers]

    def pool(self, tokens: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """[B, T, D] -> [B, D] by the configured pooling (or ``pool`` when given)."""
        pool = pool or self.config.pool
        if pool == "cls":
            return tokens[:, 0]
        if pool == "gap":
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return self.attn_pool(tokens[:, self.num_prefix_tokens:])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> pooled features [B, D]."""
        return self.pool(self.forward_features(images))

    def resize_pos_embed(self, image_size: int) -> None:
        """Make ``image_size`` the native resolution: store the interpolated position table."""
        grid = (image_size // self.patch_size,) * 2
        if grid == self.grid:
            return
        table = torch.cat([self.pos_embed[:, : self.num_prefix_tokens], self._patch_positions(grid)], dim=1)
        if isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed = nn.Parameter(table.detach())
        else:
            self.pos_embed = table.detach()  # assigning a tensor to a buffer's name keeps it a buffer
        self.grid, self.num_patches = grid, grid[0] * grid[1]
        self.image_size = image_size
