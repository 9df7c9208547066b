"""vitpipe's MAE train step side by side with the official facebookresearch/mae code, in one process,
alternating rounds, fastest of --rounds each, at three sizes.

    python benchmarks/mae_step.py --peer-dir /work/peers/mae [--sizes tiny,small,base16] [--rounds 4]

Sizes: tiny = ViT-Ti/4 at 32 px, decoder 128 x 2 blocks (vitpipe's CPU recipe), batch 64;
small = ViT-S/4 at 32 px, decoder 512 x 8 (the paper's), batch 32; base16 = ViT-B/16 at 224 px,
decoder 512 x 8, batch 8. Both sides: 75% masking, normalised-pixel loss, AdamW (lr 1e-4, weight
decay 0.05), the same images. The official side runs as it runs on a CPU: fp32 (its training loop
autocasts with torch.cuda.amp only) and torch's default AdamW (a per-parameter loop on a CPU).
vitpipe's side runs its trainer's optimizer (fused AdamW, no decay on norms and biases) at fp32 and
with bf16 autocast, which `train.precision=auto` picks when it measures it >= 1.1x faster on this
CPU; --compile adds bf16 + torch.compile.

The official code is read from --peer-dir (a checkout of facebookresearch/mae), never copied into
vitpipe. Edits it needs on today's libraries, made here at run time and not to its files: timm's
Block no longer takes ``qk_scale`` (a subclass dropping it is put in timm's module before
models_mae is imported), and numpy >= 1.24 has no ``np.float`` (util/pos_embed.py uses it; set
to ``float``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vitpipe.ssl import registry
from vitpipe.ssl.engine import optim
from vitpipe.ssl.engine.precision import native_bf16

SIZES = {  # name: (timm width, depth, heads, patch, image, decoder width, depth, heads, batch)
    "tiny": ("tiny", 192, 12, 3, 4, 32, 128, 2, 4, 64),
    "small": ("small", 384, 12, 6, 4, 32, 512, 8, 16, 32),
    "base16": ("base", 768, 12, 12, 16, 224, 512, 8, 16, 8),
}


def vitpipe_step(size: tuple, images: torch.Tensor, precision: str, compiled: bool = False):
    """vitpipe's step as its trainer runs it: the optimizer from ``engine.optim.build`` (AdamW, fused)."""
    name, _, _, _, patch, image, dec_dim, dec_depth, dec_heads, batch = size
    config = registry.pretrain_config("mae", None, [
        f"model.size={name}", f"model.patch_size={patch}", f"data.image_size={image}", f"mae.decoder_dim={dec_dim}",
        f"mae.decoder_depth={dec_depth}", f"mae.decoder_heads={dec_heads}", "mae.norm_pix_loss=true",
        "optim.lr=1e-4", "optim.weight_decay=0.05"])
    torch.manual_seed(0)
    objective = registry.build_objective(config, {}).train()
    optimizer = optim.build(objective, config, batch)[0]
    forward = torch.compile(objective) if compiled else objective

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward({"image": images}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def official_model(peer_dir: Path, size: tuple):
    import timm.models.vision_transformer as timm_vit

    class Block(timm_vit.Block):  # today's timm: no qk_scale argument
        def __init__(self, *args, qk_scale=None, **kwargs):
            super().__init__(*args, **kwargs)

    timm_vit.Block = Block
    np.float = float  # removed in numpy 1.24; util/pos_embed.py still names it
    sys.path.insert(0, str(peer_dir))
    import models_mae

    _, width, depth, heads, patch, image, dec_dim, dec_depth, dec_heads, _ = size
    torch.manual_seed(0)
    return models_mae.MaskedAutoencoderViT(
        img_size=image, patch_size=patch, in_chans=3, embed_dim=width, depth=depth, num_heads=heads,
        decoder_embed_dim=dec_dim, decoder_depth=dec_depth, decoder_num_heads=dec_heads, mlp_ratio=4,
        norm_layer=torch.nn.LayerNorm, norm_pix_loss=True)


def official_step(peer_dir: Path, size: tuple, images: torch.Tensor):
    model = official_model(peer_dir, size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        loss, _, _ = model(images, mask_ratio=0.75)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def fastest(step, rounds: int, steps: int) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def measure(args, name: str) -> dict[str, float]:
    size = SIZES[name]
    images = torch.rand(size[-1], 3, size[5], size[5]) * 2 - 1
    steps = {"official fp32": official_step(args.peer_dir, size, images), "vitpipe fp32": vitpipe_step(size, images, "fp32")}
    if native_bf16() is not None:  # emulated bf16 (AVX2 only) ran DINO's step ~27x slower than fp32
        steps["vitpipe bf16"] = vitpipe_step(size, images, "bf16")
        if args.compile:
            steps["vitpipe bf16+compile"] = vitpipe_step(size, images, "bf16", compiled=True)
    best = {label: float("inf") for label in steps}
    for _ in range(args.rounds):  # alternating: a slower stretch of the machine hits every side
        for label, step in steps.items():
            best[label] = min(best[label], fastest(step, 1, args.steps))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-dir", type=Path, required=True)
    parser.add_argument("--sizes", default="tiny,small,base16")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add vitpipe bf16 + torch.compile (what "
                        "train.compile=auto turns on for a long run when it pays; compile time not counted)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.sizes.split(","):
        best = measure(args, name)
        base = best.pop("official fp32")
        if name == args.sizes.split(",")[0]:
            print("| size | batch | official fp32 s |" + "".join(f" {label} s (vs official) |" for label in best))
            print("|---|---:|---:|" + "---:|" * len(best))
        print(f"| {name} | {SIZES[name][-1]} | {base:.3f} |"
              + "".join(f" {seconds:.3f} ({base / seconds:.2f}x) |" for seconds in best.values()), flush=True)


if __name__ == "__main__":
    main()
