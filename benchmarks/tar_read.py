"""Reading shards: vitpipe's streaming tar reader vs `tarfile` vs webdataset's own expander.

    python benchmarks/tar_read.py [--shards DIR] [--repeats 3]

Why vitpipe keeps its own reader: it must resume at an exact sample and be fast on every epoch of
every worker. All three read the same shards, group members into samples and touch every byte;
no image is decoded (decoding costs the same whichever reader found the bytes). Prints a
Markdown table; DIR defaults to a fresh Fashion-MNIST-sized set of 32 px PNG shards.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_shards(directory: Path, samples: int = 20000, per_shard: int = 5000) -> list[Path]:
    from vitpipe.pipeline.tario import write_tar_atomic

    rng = np.random.default_rng(0)
    paths = []
    for shard in range(samples // per_shard):
        items = []
        for index in range(per_shard):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
            items.append({"__key__": f"{shard:05d}_{index:05d}", "png": buffer.getvalue(), "cls": b"3",
                          "txt": b"a caption"})
        path = directory / f"{shard:05d}.tar"
        write_tar_atomic(path, items)
        paths.append(path)
    return paths


def read_vitpipe(paths: list[Path]) -> int:
    from vitpipe.pipeline.tario import iter_tar_samples

    count = 0
    for path in paths:
        with open(path, "rb") as handle:
            for sample in iter_tar_samples(handle):
                count += len(sample["png"]) > 0
    return count


def read_tarfile(paths: list[Path]) -> int:
    count, current = 0, None
    for path in paths:
        with tarfile.open(path, mode="r|") as tar:  # streaming, as a loader would
            for member in tar:
                data = tar.extractfile(member).read()
                key = member.name.split(".", 1)[0]
                if key != current:
                    current = key
                    count += len(data) > 0
    return count


def read_webdataset(paths: list[Path]) -> int:
    from webdataset import tariterators

    count = 0
    for path in paths:
        with open(path, "rb") as handle:
            samples = tariterators.group_by_keys(tariterators.tar_file_expander([{"url": str(path), "stream": handle}]))
            for sample in samples:
                count += len(sample["png"]) > 0
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted(args.shards.glob("*.tar")) if args.shards else make_shards(Path(tmp))
        size = sum(p.stat().st_size for p in paths) / 1e6
        readers = {"vitpipe tario (streaming, checksummed headers)": read_vitpipe,
                   "tarfile, streaming mode (r|)": read_tarfile,
                   "webdataset 0.2 tar_file_iterator + group_by_keys": read_webdataset}
        best = {name: float("inf") for name in readers}
        counts = {}
        for _ in range(args.repeats):
            for name, read in readers.items():  # interleaved, so page cache and clocks treat all alike
                start = time.perf_counter()
                counts[name] = read(paths)
                best[name] = min(best[name], time.perf_counter() - start)
    base = best["vitpipe tario (streaming, checksummed headers)"]
    print(f"\n{len(paths)} shards, {size:.1f} MB, {next(iter(counts.values())):,} samples, best of {args.repeats}\n")
    print("| reader | seconds | samples/s | x vitpipe time |\n|---|---:|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {counts[name] / seconds:,.0f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
