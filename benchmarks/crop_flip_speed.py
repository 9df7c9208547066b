"""The training crop + flip per sample: torchvision's v2 chain against vitpipe's RandomCropFlip
(the same draws and kernels called directly), both followed by ToNormalized, one thread.

    python benchmarks/crop_flip_speed.py SHARD.tar [--samples 2000] [--rounds 3] [--size 28]

SHARD.tar: any ingested shard (the demo's: DEMO_OUT/shards/train/00000.tar). Alternating rounds;
prints microseconds a sample per round and checks the outputs are identical.
"""

from __future__ import annotations

import argparse
import io
import time

import torch
from PIL import Image
from torchvision.transforms import v2

from vitpipe.pipeline.tario import iter_tar_samples
from vitpipe.pipeline.transforms import ToNormalized, TransformSpec, build_transform


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shard")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=28)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = []
    with open(args.shard, "rb") as handle:
        for sample in iter_tar_samples(handle):
            data = next(sample[ext] for ext in ("png", "jpg", "webp") if ext in sample)
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            if len(images) == args.samples:
                break
    chain = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(args.size, scale=(0.5, 1.0),
                                                           interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                        v2.RandomHorizontalFlip(), ToNormalized(3, (0.5,), (0.5,))])
    ours = build_transform(TransformSpec("mae", args.size, 3, 0.5, True, (0.5,) * 3, (0.5,) * 3))
    for round_ in range(args.rounds):
        outputs = {}
        for name, transform in (("v2 chain", chain), ("RandomCropFlip", ours)):
            torch.manual_seed(round_)
            start = time.perf_counter()
            outputs[name] = [transform(image) for image in images]
            print(f"round {round_}: {name:14s} {(time.perf_counter() - start) / len(images) * 1e6:6.0f} us a sample")
        same = all(torch.equal(a, b) for a, b in zip(*outputs.values()))
        print(f"round {round_}: identical outputs on {len(images)} images: {same}")


if __name__ == "__main__":
    main()
