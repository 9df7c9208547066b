"""How well `vitpipe curate`'s decontaminate step finds transformed copies of evaluation images,
and how many genuine training images it wrongly removes, on real data: clip art (openclipart-png,
split by a hash of each path, rendered at --size px on white as ingest does) or Fashion-MNIST
(its own test split against its own train split, 28 px).

From --copies evaluation images, each transform makes one copy; the step's own functions decide
(hashes: run_decontaminate with the radius swept; embeddings, with --encoder RUN: the same rule as
decontaminate.encoder, run_embedding_decontaminate, with the cosine swept). Reported per
transform: the fraction of copies found; and the genuine training images removed.

    python benchmarks/curate_decontam.py --train 3000 --test 1000 --copies 200 --size 64
    python benchmarks/curate_decontam.py --dataset fashion-mnist --train 10000 --test 1000 --encoder RUN
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from vitpipe.curate.embedded import run_embedding_decontaminate
from vitpipe.curate.recipe import DecontaminateStep
from vitpipe.curate.steps import Item, run_decontaminate
from vitpipe.pipeline.fingerprints import Fingerprints, of_crops, of_image
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


def transforms(rng: random.Random, fill: str = "white"):
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
        "rotate +-5 deg": lambda im: im.rotate(rng.uniform(-5, 5), resample=Image.BICUBIC, fillcolor=fill),
        "hflip": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
    }


def dataset(name: str, train: int, test: int, size: int) -> tuple[list[Image.Image], list[Image.Image]]:
    if name == "fashion-mnist":
        def idx(file: str, n: int):
            raw = np.frombuffer(gzip.open(f"/usr/share/datasets/fashion-mnist/{file}").read()[16:], np.uint8)
            return [Image.fromarray(a).convert("RGB") for a in raw.reshape(-1, 28, 28)[:n]]
        return idx("train-images-idx3-ubyte.gz", train), idx("t10k-images-idx3-ubyte.gz", test)
    paths = sorted(ROOT.rglob("*.png"))
    test_paths = [p for p in paths if hashlib.sha256(str(p).encode()).digest()[0] < 64][:test]
    train_paths = [p for p in paths if hashlib.sha256(str(p).encode()).digest()[0] >= 64][:train]
    return ([im for im in (load(p, size) for p in train_paths) if im is not None],
            [im for im in (load(p, size) for p in test_paths) if im is not None])


def embedder(run: str):
    """Image -> L2-normalised output embedding of the run's encoder, through its eval transform."""
    from vitpipe.downstream.features import EncoderSource
    from vitpipe.pipeline.transforms import TransformSpec, build_transform

    source = EncoderSource.resolve(Path(run))
    encoder, transform = source.build(), build_transform(TransformSpec.for_eval(source.config.data))

    @torch.no_grad()
    def embed(images: list[Image.Image]) -> np.ndarray:
        rows = []
        for start in range(0, len(images), 256):
            batch = torch.stack([transform(im) for im in images[start:start + 256]])
            rows.append(encoder.pool(encoder.forward_features(batch), None).numpy())
        vectors = np.concatenate(rows)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return embed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=("openclipart", "fashion-mnist"), default="openclipart")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--radii", default="6,8,10,12")
    parser.add_argument("--flips", action="store_true", help="hash the mirrored evaluation images too")
    parser.add_argument("--encoder", help="a vitpipe run: also report embedding decontamination")
    parser.add_argument("--cosines", default="0.9,0.95,0.98")
    args = parser.parse_args()
    train_images, test_images = dataset(args.dataset, args.train, args.test, args.size)
    crops = [of_crops(im, args.flips) for im in test_images]
    evaluation = {"test": ([str(i) for i in range(len(test_images))],
                           Fingerprints.of([f"{i}#{c}" for i in range(len(crops)) for c in range(len(crops[0]))],
                                           [p for image in crops for p in image]))}
    genuine = [Item(i, f"train{i}", im.width, im.height, 0, *of_image(im)) for i, im in enumerate(train_images)]
    pixels = [hashlib.sha256(im.tobytes()).hexdigest() for im in test_images]
    twins = [hashlib.sha256(im.tobytes()).hexdigest() in set(pixels) for im in train_images]
    rng = random.Random(0)
    copied = {name: [make(test_images[j]) for j in range(min(args.copies, len(test_images)))]
              for name, make in transforms(rng, "black" if args.dataset == "fashion-mnist" else "white").items()}
    copies = {name: [Item(10**6 + j, f"{name}{j}", im.width, im.height, 0, *of_image(im)) for j, im in enumerate(images)]
              for name, images in copied.items()}
    print(f"{args.dataset}: {len(test_images)} evaluation images, {len(genuine)} training images, "
          f"{sum(twins)} of them pixel-identical to an evaluation image")
    print("| rule | " + " | ".join(copies) + " | training images removed | removed, not pixel twins |")
    print("|---" * (len(copies) + 3) + "|")
    rows = [(f"hashes, radius {r}" + (f", thumbnail cosine >= {c}" if c else ""),
             DecontaminateStep(against=["test"], radius=r, flips=args.flips, min_cosine=c))
            for r in map(int, args.radii.split(",")) for c in (0.0, 0.995)]
    for label, step in rows:
        report(label, {n: run_decontaminate(items, step, evaluation) for n, items in copies.items()},
               run_decontaminate(genuine, step, evaluation), copies, pixels, twins)
    if args.encoder:
        embed = embedder(args.encoder)
        keyed = {"test": dict(zip(map(str, range(len(test_images))), embed(test_images)))}
        vectors = {item.key: v for item, v in zip(genuine, embed(train_images))}
        for name, images in copied.items():
            vectors.update({item.key: v for item, v in zip(copies[name], embed(images))})
        for cosine in map(float, args.cosines.split(",")):
            step = DecontaminateStep(against=["test"], encoder=args.encoder, min_embedding_cosine=cosine)
            report(f"embedding, cosine {cosine}",
                   {n: run_embedding_decontaminate(items, step, vectors, keyed) for n, items in copies.items()},
                   run_embedding_decontaminate(genuine, step, vectors, keyed), copies, pixels, twins)


def report(label: str, found: dict, removed: dict, copies: dict, pixels: list[str], twins: list[bool]) -> None:
    """One table row: per transform, the copies matched to their own original (or an identical twin:
    openclipart repeats drawings across folders); then the genuine training images removed."""
    cells = []
    for name, items in copies.items():
        right = sum(1 for item in items if item.position in found[name]
                    and pixels[int(found[name][item.position].duplicate_of.split("#")[0])] == pixels[item.position - 10**6])
        cells.append(f"{100 * right / len(items):.1f}%")
    rest = [i for i in range(len(twins)) if not twins[i]]
    wrong = sum(1 for i in rest if i in removed)
    print(f"| {label} | " + " | ".join(cells) + f" | {len(removed)} of {len(twins)} ({100 * len(removed) / len(twins):.1f}%) "
          f"| {wrong} of {len(rest)} ({100 * wrong / max(len(rest), 1):.1f}%) |")


if __name__ == "__main__":
    main()
