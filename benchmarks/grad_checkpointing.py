"""Activation memory and step time of an MAE step with and without train.grad_checkpointing,
measured in one process: bytes the autograd graph keeps (saved_tensors_hooks) and the median of
timed steps (forward + backward + AdamW).

    python benchmarks/grad_checkpointing.py --size small --image-size 32 --batch 64 --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.autograd.graph import saved_tensors_hooks

from vitpipe.ssl import registry
from vitpipe.ssl.vit import set_grad_checkpointing


def measure(args, checkpointing: bool) -> tuple[float, float]:
    config = registry.pretrain_config("mae", None, [f"model.size={args.size}", f"data.image_size={args.image_size}",
                                                    "model.patch_size=4"])
    torch.manual_seed(0)
    objective = registry.build_objective(config, {}).train()
    set_grad_checkpointing(objective, checkpointing)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    saved, times = [0], []

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    for step in range(args.steps):
        saved[0] = 0
        start = time.perf_counter()
        with saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = objective({"image": images}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return saved[0] / 2**20, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MAE ViT-{args.size}/4 "
          f"{args.image_size} px, batch {args.batch}")
    plain, ckpt = measure(args, False), measure(args, True)
    print("| grad_checkpointing | activations kept (MiB) | step (s) |\n|---|---|---|")
    for name, (mib, seconds) in (("false", plain), ("true", ckpt)):
        print(f"| {name} | {mib:.1f} | {seconds:.3f} |")
    print(f"activations x{ckpt[0] / plain[0]:.2f}, step time x{ckpt[1] / plain[1]:.2f}")


if __name__ == "__main__":
    main()
