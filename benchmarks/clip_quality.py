"""CLIP on real image-text pairs: zero-shot and retrieval against random init and chance.

    python benchmarks/clip_quality.py --data fashion-mnist --out /work/bench/clip_fm --steps 600
    python benchmarks/clip_quality.py --data openclipart --out /work/bench/clip_art --steps 600 --lit

fashion-mnist: the train/test images written as class folders, each with a caption drawn from
several templates ("a photo of a {class}", "a {class} on a plain background", ...), the sanity row
(zero-shot should reach 70%). openclipart: Debian's openclipart-png, titles from file names
(`filename_captions=true`), categories from folders; zero-shot over the categories and recall@k
on held-out titles. Every step is a public `vitpipe` command (printed); writes OUT/clip.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from quality import step  # the same printed, timed `vitpipe` step

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = ["a photo of a {}.", "a {} on a plain background.", "a picture of a {}.", "a product photo of a {}.",
             "a black and white photo of a {}.", "a {}."]


def idx(name: str) -> np.ndarray:
    data = gzip.open(FASHION / name).read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_folders(root: Path, train_images: int) -> None:
    """Class folders of PNGs with one templated caption each (seeded)."""
    rng = random.Random(0)
    for split, prefix, count in (("train", "train", train_images), ("test", "t10k", 10_000)):
        images, labels = idx(f"{prefix}-images-idx3-ubyte.gz"), idx(f"{prefix}-labels-idx1-ubyte.gz")
        for index in range(min(count, len(images))):
            folder = root / split / CLASSES[labels[index]].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], "L").save(folder / f"{index:05d}.png")
            (folder / f"{index:05d}.txt").write_text(rng.choice(TEMPLATES).format(CLASSES[labels[index]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("fashion-mnist", "openclipart"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--lit", action="store_true", help="add the LiT row: an MAE run, then CLIP on its locked encoder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the clip config")
    args = parser.parse_args()
    out, rows = args.out, []
    out.mkdir(parents=True, exist_ok=True)
    shards = out / "shards"
    if not (shards / "manifest.json").exists() and not (shards / "train" / "manifest.json").exists():
        if args.data == "fashion-mnist":
            fashion_folders(out / "folders", args.train_images)
            for split in ("train", "test"):
                step(["ingest", str(out / "folders" / split), "--out", str(shards / split), "--shard-size", "5000",
                      "image_size=32", "resize_mode=border"])
        else:
            step(["ingest", "/usr/share/openclipart/png", "--out", str(shards), "--shard-size", "2000",
                  "filename_captions=true", "image_size=32", "resize_mode=border", "val_fraction=0.15"])
    train = shards / "train"
    test = shards / ("test" if args.data == "fashion-mnist" else "val")
    shape = ["model.size=tiny", "model.patch_size=4", "data.image_size=32", "train.batch_size=128",
             f"train.max_steps={args.steps}", "train.log_every=20", "data.num_workers=1", *args.overrides]
    runs = {"clip": (out / "clip", [])}
    if args.lit:  # LiT: an MAE on the same images (no captions), then only the text side learns
        mae = out / "mae"
        seconds = step(["pretrain", "mae", "--data", str(train), "--out", str(mae), "--resume", "auto", *shape])
        rows.append({"row": "mae pretraining (for LiT)", "steps": args.steps, "seconds": round(seconds)})
        runs["lit (mae encoder, locked)"] = (out / "lit", [f"clip.image_init={mae}", "clip.lock_image=true"])
    for name, (run, extra) in runs.items():
        seconds = step(["pretrain", "clip", "--data", str(train), "--out", str(run), "--resume", "auto", *shape, *extra])
        rows.append({"row": f"{name} pretraining", "steps": args.steps, "seconds": round(seconds)})
    for name, run, flags in [(name, run, []) for name, (run, _) in runs.items()] + [
            ("random init", out / "clip", ["--init", "random"])]:
        step(["eval", "zero-shot", str(run), "--test", str(test), *flags])
        step(["eval", "retrieval", str(run), "--index", str(test), *flags])
        suffix = ".random" if flags else ""
        zero = json.loads((run / "eval" / f"zero-shot{suffix}.json").read_text())
        text = json.loads((run / "eval" / f"retrieval-text{suffix}.json").read_text())
        rows.append({"row": name, "zero_shot_top1": zero["top1"], "zero_shot_top5": zero["top5"],
                     "chance": zero["chance"], "i2t_recall": text["image_to_text"], "t2i_recall": text["text_to_image"],
                     "pairs": text["size"]})
        (out / "clip.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
