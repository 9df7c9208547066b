"""I-JEPA train-step throughput against this machine's matmul roofline, in one process.

    python benchmarks/jepa_step.py [--batch 64] [--steps 10] [--threads 2]

ViT-Ti/4 at 32 px (8x8 patches), predictor 96 wide x 4 blocks, the default masks (4 targets of
15-20%, context 85-100% minus the targets), drawn beforehand as the loader workers would. A step is
the target encoder's no-grad forward on all patches, the context encoder and predictor forward +
backward (3x their forward), AdamW and the EMA update; FLOPs are counted from the masks actually
drawn (multiply-adds count 2).
"""

from __future__ import annotations

import argparse
import time

import torch

from train_step import block_flops, matmul_gflops
from vitpipe.ssl import registry


def step_flops(jepa, batch: dict) -> float:
    """FLOPs of one training step over the batch, from its mask sizes."""
    enc, pred = jepa.backbone, jepa.predictor
    d, n, depth = enc.embed_dim, enc.num_patches, enc.depth
    p2c = enc.patch_size ** 2 * enc.in_chans
    p, pred_depth = pred.embed.out_features, len(pred.blocks)
    images, kc = batch["context_idx"].shape
    targets, kt = batch["target_idx"].shape[1:]
    embed = 2 * n * p2c * d  # the encoders embed every patch (the context encoder then gathers)
    target_fwd = embed + depth * block_flops(n, d)
    context_fwd = embed + depth * block_flops(kc, d)
    predictor_fwd = 2 * kc * d * p + targets * (pred_depth * block_flops(kc + kt, p) + 2 * kt * p * d)
    return images * (target_fwd + 3 * (context_fwd + predictor_fwd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    roofline = matmul_gflops()
    config = registry.pretrain_config("jepa", None, ["model.size=tiny", "model.patch_size=4", "data.image_size=32",
                                                     "train.max_steps=1000"])
    jepa = registry.build_objective(config)
    optimizer = torch.optim.AdamW([p for p in jepa.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [jepa.batch_hook()({"image": torch.randn(args.batch, 3, 32, 32)}, generator)
               for _ in range(args.steps + 2)]
    seconds, flops = 0.0, 0.0
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        jepa(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        jepa.on_step_end(index + 1, 1000)
        if index >= 2:  # two warm-up steps
            seconds += time.perf_counter() - start
            flops += step_flops(jepa, batch)
    images_per_second = args.batch * args.steps / seconds
    gflops = flops / seconds / 1e9
    context = sum(b["context_idx"].shape[1] for b in batches[2:]) / args.steps
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.steps} timed steps, "
          f"mean context {context:.1f} of 64 patches")
    print(f"fp32 matmul (2048^3): {roofline:.1f} GFLOP/s\n")
    print("| step | img/s | model GFLOP/s | of matmul |\n|---|---:|---:|---:|")
    print(f"| I-JEPA ViT-Ti/4 32 px, predictor 96 x 4 | {images_per_second:.0f} | {gflops:.1f} | {gflops / roofline:.0%} |")


if __name__ == "__main__":
    main()
