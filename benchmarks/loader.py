"""Shard loader throughput (decode + MAE augmentation) at 32 and 224 px, clean and with 5% corrupt samples.

    python benchmarks/loader.py [--samples 4000] [--workers 2]

Writes its own shards to a temp dir (random-texture JPEGs: 40x40 for the 32 px run, 256x256 for
the 224 px run) and prints a Markdown table of samples/s.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vitpipe.pipeline.loader import LoaderSpec, ReadTally, counted, make_loader
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.pipeline.tario import write_tar_atomic
from vitpipe.pipeline.transforms import TransformSpec


def write_shards(directory: Path, count: int, size: int, corrupt_fraction: float, per_shard: int = 500) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    base = rng.integers(0, 256, size=(size // 4, size // 4, 3), dtype=np.uint8)
    samples = []
    for index in range(count):
        image = Image.fromarray(np.roll(base, index, axis=0)).resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        if rng.random() < corrupt_fraction:
            data = data[: len(data) // 3]  # truncated JPEG
        samples.append({"__key__": f"{index:07d}", "jpg": data, "cls": b"0"})
    for shard in range(0, count, per_shard):
        write_tar_atomic(directory / f"{shard // per_shard:05d}.tar", samples[shard:shard + per_shard])
    return directory


def measure(directory: Path, image_size: int, workers: int, batch: int = 64) -> tuple[float, int, int]:
    spec = LoaderSpec(resolve_shards(directory), batch, TransformSpec("mae", image_size), train=False,
                      fields=("image",), max_error_rate=0.2)
    _, loader = make_loader(spec, workers)
    start = time.perf_counter()
    tally = ReadTally(None)
    for _ in counted(loader, tally):
        pass
    return tally.read / (time.perf_counter() - start), tally.read, sum(tally.skipped.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for image_size, stored in ((32, 40), (224, 256)):
            count = args.samples if image_size == 32 else args.samples // 4
            results = {}
            for corrupt in (0.0, 0.05):
                directory = write_shards(Path(tmp) / f"{image_size}_{corrupt}", count, stored, corrupt)
                results[corrupt] = measure(directory, image_size, args.workers)
            clean, dirty = results[0.0][0], results[0.05][0]
            rows.append((image_size, count, clean, dirty, results[0.05][2], dirty / clean))
    print(f"{args.workers} workers, eval-order pass, decode + RandomResizedCrop + flip + normalize\n")
    print("| px | samples | clean samples/s | 5% corrupt samples/s | corrupt skipped | corrupt/clean |")
    print("|---:|---:|---:|---:|---:|---:|")
    for px, count, clean, dirty, errors, ratio in rows:
        print(f"| {px} | {count} | {clean:.0f} | {dirty:.0f} | {errors} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
