"""ONNX (onnxruntime, CPU) against eager PyTorch for the same encoder's pooled features, in one
process, interleaved, fastest of --rounds; and their largest difference.

    python benchmarks/onnx_speed.py --sizes tiny,small --image-size 32 --patch 4 --batch 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vitpipe.onnx_export import PooledFeatures, onnx_model
from vitpipe.ssl import registry
from vitpipe.ssl.registry import build_objective


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    import onnxruntime as ort

    print(f"torch threads {torch.get_num_threads()}; batch {args.batch}, {args.image_size} px, patch {args.patch}")
    print("| encoder | eager fp32 (ms) | onnxruntime (ms) | speed-up | max abs difference |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        config = registry.pretrain_config("mae", None, [f"model.size={size}", f"data.image_size={args.image_size}",
                                                        f"model.patch_size={args.patch}"])
        encoder = build_objective(config, {}).encoder().eval()
        module = PooledFeatures(encoder, config.model.pool)
        session = ort.InferenceSession(onnx_model(encoder, config.data))
        pixels = torch.randn(args.batch, 3, args.image_size, args.image_size)
        times = {"eager": [], "onnx": []}
        with torch.no_grad():
            expected = module(pixels).numpy()
            got = session.run(["features"], {"pixels": pixels.numpy()})[0]
            for _ in range(args.rounds):
                start = time.perf_counter()
                module(pixels)
                times["eager"].append(time.perf_counter() - start)
                start = time.perf_counter()
                session.run(["features"], {"pixels": pixels.numpy()})
                times["onnx"].append(time.perf_counter() - start)
        eager, onnx = min(times["eager"]), min(times["onnx"])
        print(f"| ViT-{size}/{args.patch} | {1000 * eager:.1f} | {1000 * onnx:.1f} | {eager / onnx:.2f}x | "
              f"{np.abs(got - expected).max():.2e} |")


if __name__ == "__main__":
    main()
