"""How well `vitpipe curate`'s decontaminate step finds transformed copies of evaluation images,
and how many genuine training images it wrongly removes, on real clip art (openclipart-png).

The openclipart PNGs are split by a hash of their path into an evaluation set and a training pool,
rendered at --size px on white (as ingest does). From --copies evaluation images, each transform
makes one copy; the step's own functions (crop_hashes, image_hashes, run_decontaminate) decide.
Reported per transform: the fraction of copies found; and the fraction of genuine training images
removed (false positives), with the radius swept.

    python benchmarks/curate_decontam.py --train 3000 --test 1000 --copies 200 --size 64
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from vitpipe.curate.recipe import DecontaminateStep
from vitpipe.curate.steps import Item, crop_hashes, image_hashes, run_decontaminate
from vitpipe.pipeline.images import decode_rgb, resize_to_fit

ROOT = Path("/usr/share/openclipart/png")


def load(path: Path, size: int) -> Image.Image | None:
    """As ingest renders it; None for what ingest refuses (oversized images)."""
    try:
        return resize_to_fit(decode_rgb(path.read_bytes(), 40_000_000), size, "border")
    except Exception:  # noqa: BLE001 - counted as skipped, like ingest's failures
        return None


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def transforms(rng: random.Random):
    def crop(im, low, high):
        f = rng.uniform(low, high)
        w, h = round(im.width * f), round(im.height * f)
        left, top = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
        return im.crop((left, top, left + w, top + h))

    return {
        "exact": lambda im: im.copy(),
        "jpeg q30-70": lambda im: jpeg(im, rng.randint(30, 70)),
        "resize 0.5-2x": lambda im: im.resize((max(8, round(im.width * (s := rng.uniform(0.5, 2)))),
                                               max(8, round(im.height * s))), Image.BICUBIC),
        "crop 85-95%": lambda im: crop(im, 0.85, 0.95),
        "brightness +-10%": lambda im: ImageEnhance.Brightness(im).enhance(rng.choice([0.9, 1.1])),
        "rotate +-5 deg": lambda im: im.rotate(rng.uniform(-5, 5), resample=Image.BICUBIC, fillcolor="white"),
        "hflip": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--radii", default="6,8,10,12")
    parser.add_argument("--flips", action="store_true", help="hash the mirrored evaluation images too")
    args = parser.parse_args()
    paths = sorted(ROOT.rglob("*.png"))
    test_paths = [p for p in paths if hashlib.sha256(str(p).encode()).digest()[0] < 64][:args.test]
    train_paths = [p for p in paths if hashlib.sha256(str(p).encode()).digest()[0] >= 64][:args.train]
    start = time.monotonic()
    test_images = [im for im in (load(p, args.size) for p in test_paths) if im is not None]
    evaluation = {"test": ([str(i) for i in range(len(test_images))], np.stack([crop_hashes(im, args.flips) for im in test_images]))}
    eval_seconds = time.monotonic() - start
    start = time.monotonic()
    train_images = [im for im in (load(p, args.size) for p in train_paths) if im is not None]
    genuine = [Item(i, f"train{i}", args.size, args.size, 0, image_hashes(im)) for i, im in enumerate(train_images)]
    train_seconds = time.monotonic() - start
    pixels = [hashlib.sha256(im.tobytes()).hexdigest() for im in test_images]
    twins = [hashlib.sha256(im.tobytes()).hexdigest() in set(pixels) for im in train_images]
    rng = random.Random(0)
    copies = {name: [Item(10**6 + j, f"{name}{j}", 0, 0, 0, image_hashes(make(test_images[j])))
                     for j in range(min(args.copies, len(test_images)))]
              for name, make in transforms(rng).items()}
    print(f"{len(test_images)} evaluation images hashed whole + 15 crops in {eval_seconds:.1f}s; "
          f"{len(genuine)} training images hashed in {train_seconds:.1f}s "
          f"({len(genuine) / train_seconds:.0f}/s incl. PNG decode and resize)")
    print(f"{sum(twins)} of {len(genuine)} training images are pixel-identical to an evaluation image at {args.size} px")
    print("| radius | " + " | ".join(copies) + " | training images removed | removed, not pixel twins |")
    print("|---" * (len(copies) + 3) + "|")
    for radius in map(int, args.radii.split(",")):
        step = DecontaminateStep(against=["test"], radius=radius)
        found = []
        for name, items in copies.items():
            removed = run_decontaminate(items, step, evaluation)
            # openclipart repeats drawings across its folders: a match to an identical twin is right too
            right = sum(1 for item in items if item.position in removed
                        and pixels[int(removed[item.position].duplicate_of)] == pixels[item.position - 10**6])
            found.append(f"{100 * right / len(items):.1f}%")
        removed = run_decontaminate(genuine, step, evaluation)
        rest = [i for i in range(len(genuine)) if not twins[i]]
        wrong = sum(1 for i in rest if i in removed)
        print(f"| {radius} | " + " | ".join(found) + f" | {len(removed)} of {len(genuine)} "
              f"({100 * len(removed) / len(genuine):.1f}%) | {wrong} of {len(rest)} ({100 * wrong / len(rest):.1f}%) |")


if __name__ == "__main__":
    main()
