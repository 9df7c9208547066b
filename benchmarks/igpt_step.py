"""iGPT train step against the matmul roofline, and the peak memory of a step against the estimate
vitpipe refuses oversized runs with.

    python benchmarks/igpt_step.py [--batch 64] [--steps 10] [--threads 2]

Speed: a 192-wide, 8-block, 3-head model over 16x16 = 256 palette indices (palette 16), ar objective,
AdamW; indices drawn beforehand as the loader workers would. FLOPs: 3x the forward (multiply-adds
count 2): the blocks (causal attention counted in full, as the kernel computes it) and the output head.
Memory: each (resolution, batch) runs in a fresh process; the peak RSS growth over one training step
(sampled every millisecond) against ``igpt.step_memory_bytes``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from train_step import block_flops, matmul_gflops
from vitpipe.ssl import registry
from vitpipe.ssl.objectives.igpt.objective import PALETTE, palette_bytes, step_memory_bytes

SHAPE = ["model.embed_dim=192", "model.depth=8", "model.num_heads=3", "igpt.palette_size=16"]


def build(resolution: int, batch: int):
    import numpy as np

    config = registry.pretrain_config("igpt", None, [*SHAPE, f"igpt.resolution={resolution}", f"data.image_size={resolution}",
                                                     f"train.batch_size={batch}"])
    palette = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, axis=1)
    return registry.build_objective(config, {PALETTE: palette_bytes(palette, "benchmark")})


def _rss() -> int:
    import os

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(resolution: int, batch: int) -> None:
    """Runs in its own process: the peak resident-memory growth over one training step (RSS sampled
    every millisecond from another thread; torch kernels release the GIL) and the estimate, as JSON."""
    import threading

    torch.set_num_threads(2)
    model = build(resolution, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randint(0, 16, (batch, resolution**2))
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    before = _rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    model({"pixels": pixels}).loss.backward()
    optimizer.step()
    done.set()
    sampler.join()
    enc = model.backbone
    estimate = step_memory_bytes(batch, resolution**2, enc.embed_dim, enc.depth, 16)
    print(json.dumps({"resolution": resolution, "batch": batch, "measured": peak[0] - before, "estimate": estimate}))


def step_flops(batch: int, tokens: int, width: int, depth: int, vocab: int) -> float:
    return 3 * batch * (depth * block_flops(tokens, width) + 2 * tokens * width * vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-probe", nargs=2, type=int, metavar=("RESOLUTION", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(*args.memory_probe)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    roofline = matmul_gflops()
    model = build(16, args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    batches = [torch.randint(0, 16, (args.batch, 256)) for _ in range(args.steps + 2)]
    seconds = 0.0
    for index, pixels in enumerate(batches):
        start = time.perf_counter()
        model({"pixels": pixels}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= 2:
            seconds += time.perf_counter() - start
    gflops = step_flops(args.batch, 256, 192, 8, 16) * args.steps / seconds / 1e9
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.steps} timed steps")
    print(f"fp32 matmul (2048^3): {roofline:.1f} GFLOP/s\n")
    print("| step | img/s | model GFLOP/s | of matmul |\n|---|---:|---:|---:|")
    print(f"| iGPT ar 192 x 8 blocks, 16x16 = 256 tokens | {args.batch * args.steps / seconds:.0f} | {gflops:.1f} | "
          f"{gflops / roofline:.0%} |\n")
    print("| resolution | batch | peak RSS growth of a step (MiB) | estimate (MiB) | estimate / measured |\n|---|---:|---:|---:|---:|")
    for resolution, batch in ((16, 64), (16, 128), (24, 32), (24, 64)):
        out = subprocess.run([sys.executable, __file__, "--memory-probe", str(resolution), str(batch)],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {resolution}x{resolution} | {batch} | {row['measured'] / 2**20:.0f} | {row['estimate'] / 2**20:.0f} | "
              f"{row['estimate'] / max(row['measured'], 1):.2f} |")


if __name__ == "__main__":
    main()
