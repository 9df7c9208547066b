"""Export a run's encoder: safetensors + a timm hub-style config.json.

``timm.create_model(cfg["architecture"], **cfg["model_args"])`` followed by a strict
``load_state_dict(safetensors.torch.load_file("model.safetensors"))`` gives the same features as
vitpipe's own forward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from vitpipe.config import ConfigError
from vitpipe.ssl.runs import load_run_encoder
from vitpipe.ssl.vit import VisionTransformer

TIMM_NAMES = {"micro": "vit_tiny", "mini": "vit_tiny", "tiny": "vit_tiny", "small": "vit_small", "base": "vit_base",
              "large": "vit_large"}
TIMM_POOL = {"cls": "token", "gap": "avg", "map": "map"}


def timm_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    if encoder.args.conv_stem:
        raise ConfigError("a convolutional-stem encoder has no timm VisionTransformer equivalent; "
                          "export it with --format vitpipe")
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    patch = encoder.patch_size
    weight = state["patch_embed.proj.weight"]  # [D, p*p*C] over (p1 p2 c) -> conv kernel [D, C, p, p]
    state["patch_embed.proj.weight"] = rearrange(weight, "d (p1 p2 c) -> d c p1 p2", p1=patch, p2=patch).contiguous()
    return state


def timm_config(encoder: VisionTransformer, size: str) -> dict[str, Any]:
    args = encoder.args
    architecture = f"{TIMM_NAMES[size]}_patch16_224"
    return {
        "architecture": architecture,
        "model_args": {
            "img_size": args.image_size, "patch_size": args.patch_size, "in_chans": args.in_chans,
            "embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads,
            "mlp_ratio": args.mlp_ratio, "class_token": args.class_token, "global_pool": TIMM_POOL[args.pool],
            "fc_norm": False, "num_classes": 0,
        },
        "num_features": args.embed_dim,
        "pretrained_cfg": {"input_size": [args.in_chans, args.image_size, args.image_size]},
    }


def export(run: Path, out: Path, fmt: str = "timm") -> Path:
    from safetensors.torch import save_file

    if fmt not in ("timm", "vitpipe"):
        raise ConfigError(f"unknown export format {fmt!r}; choose timm or vitpipe")
    encoder, config, source = load_run_encoder(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "timm":
        state, cfg = timm_state_dict(encoder), timm_config(encoder, config.model.size)
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        cfg = {"architecture": "vitpipe.VisionTransformer", "model_args": dict(encoder.args.__dict__)}
    cfg["vitpipe"] = {"objective": config.objective, "source": str(source), "mean": config.data.mean,
                      "std": config.data.std}
    save_file(state, out / "model.safetensors.tmp")
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
