"""One optimizer step over MAE's parameters: torch's AdamW as its default per-parameter loop, as
``foreach`` and as the fused kernel vitpipe's trainer builds (engine/optim.py), in one process.

    python benchmarks/adamw_step.py [--steps 5] [--threads 2]

Gradients are random (the step's cost does not depend on them); the mean of --steps steps after one
warm-up step each.
"""

from __future__ import annotations

import argparse
import time

import torch

from vitpipe.ssl import registry

SIZES = {"ViT-Ti/4 + decoder 128 x 2": ["model.size=tiny", "model.patch_size=4", "data.image_size=32",
                                        "mae.decoder_dim=128", "mae.decoder_depth=2", "mae.decoder_heads=4"],
         "ViT-B/16 + decoder 512 x 8": ["model.size=base", "model.patch_size=16", "data.image_size=224",
                                        "mae.decoder_dim=512", "mae.decoder_depth=8", "mae.decoder_heads=16"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | parameters | default loop ms | foreach ms | fused ms |\n|---|---:|---:|---:|---:|")
    for name, overrides in SIZES.items():
        params = list(registry.build_objective(registry.pretrain_config("mae", None, overrides), {}).parameters())
        for param in params:
            param.grad = torch.randn_like(param) * 1e-3
        row = []
        for kind in ({}, {"foreach": True}, {"fused": True}):
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **kind)
            optimizer.step()
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            row.append((time.perf_counter() - start) / args.steps * 1000)
        print(f"| {name} | {sum(p.numel() for p in params) / 1e6:.1f}M | " + " | ".join(f"{ms:.1f}" for ms in row) + " |")


if __name__ == "__main__":
    main()
