"""MAE train-step throughput against this machine's matmul roofline, in one process.

    python benchmarks/train_step.py [--batch 256] [--steps 10] [--threads 2]

Prints a Markdown table: fp32 matmul GFLOP/s, then for ViT-Tiny/4 at 32 px the MAE step (75% masked)
and the same model encoding all patches: images/s, analytically counted GFLOP/s, ratio to matmul,
peak RSS. FLOPs count multiply-adds as 2 and a training step as 3x the forward pass.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from vitpipe.config import PretrainConfig
from vitpipe.ssl import registry
from vitpipe.ssl.objectives.mae.objective import MAE
from vitpipe.ssl.registry import build_objective


def matmul_gflops(n: int = 2048, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one pre-norm block over ``tokens`` tokens (one sample)."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)
    attention = 2 * 2 * tokens * tokens * dim
    return linear + attention


def mae_forward_flops(mae: MAE, visible: int) -> float:
    enc = mae.backbone
    d, n, p2c = enc.embed_dim, enc.num_patches, enc.patch_size**2 * enc.in_chans
    prefix = enc.num_prefix_tokens
    dd = mae.config.decoder_dim
    flops = 2 * n * p2c * d  # patch embedding of every patch (MAE embeds, then drops)
    flops += len(enc.blocks) * block_flops(prefix + visible, d)
    flops += 2 * (prefix + visible) * d * dd  # decoder embed
    flops += len(mae.decoder_blocks) * block_flops(prefix + n, dd)
    flops += 2 * n * dd * p2c  # prediction head
    return flops


def full_encoder_step(mae: MAE, images: torch.Tensor) -> torch.Tensor:
    """The same model with no masking: every patch through the encoder, loss on all patches."""
    n = mae.backbone.num_patches
    keep_idx = torch.arange(n).expand(images.shape[0], n)
    restore_idx = keep_idx
    pred = mae.forward_decoder(mae.forward_encoder(images, keep_idx), restore_idx)
    return mae.forward_loss(images, pred, torch.ones(images.shape[0], n))


def time_steps(step_fn, params, steps: int) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    for _ in range(2):  # warm-up
        step_fn().backward()
        optimizer.step()
        optimizer.zero_grad()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    roofline = matmul_gflops()
    config: PretrainConfig = registry.pretrain_config("mae", None, ["model.size=tiny", "model.patch_size=4",
                                                                   "data.image_size=32"])
    mae = build_objective(config)
    images = torch.randn(args.batch, 3, 32, 32)
    n = mae.backbone.num_patches
    visible = int(n * (1 - config.mae.mask_ratio))
    params = [p for p in mae.parameters() if p.requires_grad]

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    masked_seconds = time_steps(lambda: mae({"image": images}).loss, params, args.steps)
    rss_masked = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    full_seconds = time_steps(lambda: full_encoder_step(mae, images), params, args.steps)
    rss_full = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    rows = []
    for name, seconds, tokens, rss in (("MAE step, 75% masked", masked_seconds, visible, rss_masked),
                                       ("same model, all patches", full_seconds, n, rss_full)):
        gflops = 3 * mae_forward_flops(mae, tokens) * args.batch / seconds / 1e9
        rows.append((name, args.batch / seconds, gflops, gflops / roofline, rss / 1024))
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.steps} timed steps")
    print(f"fp32 matmul (2048^3): {roofline:.1f} GFLOP/s  (peak RSS before training: {rss_before / 1024:.0f} MiB)\n")
    print("| step | img/s | model GFLOP/s | of matmul | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, ips, gflops, ratio, rss in rows:
        print(f"| {name} | {ips:.0f} | {gflops:.1f} | {ratio:.0%} | {rss:.0f} |")
    print(f"\nspeed-up of masking: {full_seconds / masked_seconds:.2f}x")


if __name__ == "__main__":
    main()
