"""Peak memory of `vitpipe ingest hf:...` at two dataset sizes: streamed sources stay flat.

    python benchmarks/hf_ingest_memory.py [--sizes 2000,8000] [--out /tmp/hf_mem]

Writes a hub-layout parquet dataset (64x64 noise PNGs, which do not compress: ~12 KiB each, a
label and a caption column) at each size, ingests it with the public command in a fresh process
and reports that process's peak RSS (ru_maxrss of the child) beside the dataset's size on disk.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")


def write_parquet(folder: Path, count: int, per_file: int = 1000) -> int:
    import datasets

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]),
                                  "caption": datasets.Value("string")})
    files = (count + per_file - 1) // per_file
    for part in range(files):
        rows = range(part * per_file, min(count, (part + 1) * per_file))
        images = []
        for _ in rows:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in rows],
                                    "caption": [f"noise {i}" for i in rows]}, features=features).to_parquet(
            str(data / f"train-{part:05d}-of-{files:05d}.parquet"))
    return sum(p.stat().st_size for p in data.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,8000")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hf_mem"))
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="a shard is assembled in memory before it is written: the other bound on memory")
    args = parser.parse_args()
    rows = []
    for count in [int(s) for s in args.sizes.split(",")]:
        source = args.out / f"ds{count}"
        disk = write_parquet(source, count) if not (source / "data").is_dir() else sum(
            p.stat().st_size for p in (source / "data").iterdir())
        command = [sys.executable, "-m", "vitpipe", "ingest", f"hf:{source}", "--out", str(args.out / f"shards{count}"),
                   "--overwrite", "--shard-size", str(args.shard_size), "text_col=caption"]
        peak = int(subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True,
                                  check=True).stdout.strip())
        manifest = json.loads((args.out / f"shards{count}" / "manifest.json").read_text())
        rows.append((count, disk, peak, manifest["written"]))
    print("| images | parquet on disk (MiB) | shard size | written | peak RSS of the ingest (MiB) |\n|---:|---:|---:|---:|---:|")
    for count, disk, peak, written in rows:
        print(f"| {count} | {disk / 2**20:.0f} | {args.shard_size} | {written} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()
