"""Calibrates the contamination figure's rule (downstream/contamination.py) on Fashion-MNIST, the
hard case (28 px grey products: two 64-bit hashes match most distinct images).

For each (radius, min_cosine): the fraction of the real test split with a match in the real
training split (Fashion-MNIST's own near-duplicates plus false matches), and the fraction of
transformed copies of --copies test images that the rule finds against their original.

    python benchmarks/contamination_rule.py --copies 200
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import time

import numpy as np
from PIL import Image, ImageEnhance

from vitpipe.downstream.contamination import MIN_COSINE, RADIUS
from vitpipe.pipeline.fingerprints import near_pairs, of_image

ROOT = "/usr/share/datasets/fashion-mnist/"


def idx_images(name: str) -> np.ndarray:
    data = gzip.open(ROOT + name).read()
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)


def prints(images) -> tuple[np.ndarray, np.ndarray]:
    pairs = [of_image(image) for image in images]
    return np.stack([h for h, _ in pairs]), np.stack([t for _, t in pairs])


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def transforms(rng: random.Random):
    return {
        "exact": lambda im: im.copy(),
        "jpeg q30-70": lambda im: jpeg(im, rng.randint(30, 70)),
        "brightness +-10%": lambda im: ImageEnhance.Brightness(im).enhance(rng.choice([0.9, 1.1])),
        "resize 0.5-2x": lambda im: im.resize((s := round(28 * rng.uniform(0.5, 2)), s), Image.BICUBIC),
        "rotate +-5 deg": lambda im: im.rotate(rng.uniform(-5, 5), resample=Image.BICUBIC),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=200)
    args = parser.parse_args()
    start = time.monotonic()
    train = prints(Image.fromarray(a).convert("RGB") for a in idx_images("train-images-idx3-ubyte.gz"))
    test_images = [Image.fromarray(a).convert("RGB") for a in idx_images("t10k-images-idx3-ubyte.gz")]
    test = prints(test_images)
    print(f"fingerprints of 70,000 images: {time.monotonic() - start:.1f} s")
    rng = random.Random(0)
    copies = {name: prints(make(test_images[i]) for i in range(args.copies)) for name, make in transforms(rng).items()}
    originals = (test[0][: args.copies], test[1][: args.copies])
    print("| radius | min cosine | test images matching a training image | " + " | ".join(copies) + " |")
    print("|---|---|---|" + "---|" * len(copies))
    for radius in (6, 8, 12):
        for cosine in (0.99, 0.995, 0.997):
            rows, _, _ = near_pairs(test, train, radius, cosine)
            found = []
            for copy in copies.values():
                hit_rows, hit_cols, _ = near_pairs(copy, originals, radius, cosine)
                found.append(len(set(hit_rows[hit_rows == hit_cols].tolist())) / args.copies)
            mark = " (default)" if (radius, cosine) == (RADIUS, MIN_COSINE) else ""
            print(f"| {radius}{mark} | {cosine} | {len(set(rows.tolist())) / len(test[0]):.2%} | "
                  + " | ".join(f"{f:.1%}" for f in found) + " |")


if __name__ == "__main__":
    main()
