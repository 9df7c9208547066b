"""Hashing cost against decoding, one core: what `vitpipe curate` adds per image on top of
reading it. Images are PNG-encoded as ingest stores them; decode = vitpipe's decode_rgb of those
bytes; hash = of_image (pHash + dHash + 16x16 thumbnail) of the decoded image; crops = of_crops (16 crops,
what each evaluation image costs once).

    python benchmarks/curate_hash_speed.py --n 2000
"""

from __future__ import annotations

import argparse
import gzip
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitpipe.pipeline.fingerprints import of_crops as crop_hashes, of_image as image_hashes
from vitpipe.pipeline.images import decode_rgb, resize_to_fit

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
CLIPART = Path("/usr/share/openclipart/png")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def images(kind: str, n: int) -> list[bytes]:
    if kind == "fashion-mnist 28 px":
        raw = np.frombuffer(gzip.open(FASHION).read()[16:], np.uint8).reshape(-1, 28, 28)[:n]
        return [png(Image.fromarray(a).convert("RGB")) for a in raw]
    out = []
    for path in sorted(CLIPART.rglob("*.png")):
        try:
            out.append(png(resize_to_fit(decode_rgb(path.read_bytes(), 40_000_000), 64, "border")))
        except Exception:  # noqa: BLE001 - oversized sources are skipped, as ingest refuses them
            continue
        if len(out) == n:
            break
    return out


def rate(function, items) -> float:
    start = time.perf_counter()
    for item in items:
        function(item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| images | decode (img/s) | pHash+dHash (img/s) | hashing on top of decoding | crop hashes (img/s) |")
    print("|---|---|---|---|---|")
    for kind in ("fashion-mnist 28 px", "openclipart 64 px"):
        encoded = images(kind, args.n)
        decoded = [decode_rgb(data) for data in encoded]
        decode, hashing = rate(decode_rgb, encoded), rate(image_hashes, decoded)
        crops = rate(crop_hashes, decoded[: max(1, len(decoded) // 10)])
        print(f"| {kind} | {decode:.0f} | {hashing:.0f} | +{100 * decode / hashing:.0f}% | {crops:.0f} |")


if __name__ == "__main__":
    main()
