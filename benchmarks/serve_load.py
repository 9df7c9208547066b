"""Load test of `vitpipe serve`'s API on this machine: a server process over a 100k-vector index
(as wide as the run's encoder: 128-d for the demo's ViT-mini) answers GET /api/search?key=... from 1 and 16 concurrent clients (bounded
requests, 127.0.0.1 only); then POST image queries, which also run the encoder.

The index is the real SearchIndex of a tiny MAE run over --images Fashion-MNIST images, with its
vectors replaced by --size random unit vectors (keys k0..kN) so that the search is at full size.

    python benchmarks/serve_load.py --size 100000 --requests 400
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def server(run: Path, shards: Path, size: int, port: int) -> None:
    import faiss
    import uvicorn

    from vitpipe.downstream.features import EncoderSource
    from vitpipe.serve.app import create_app
    from vitpipe.serve.index import SearchIndex

    index = SearchIndex(EncoderSource.resolve(run), str(shards), workers=0)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(size, index.vectors.shape[1])).astype(np.float32)
    index.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index.keys = [f"k{i}" for i in range(size)]
    index.rows = {key: row for row, key in enumerate(index.keys)}
    index.index = faiss.IndexFlatIP(vectors.shape[1])
    index.index.add(index.vectors)
    uvicorn.run(create_app(index), host="127.0.0.1", port=port, log_level="warning")


def load(url: str, clients: int, requests: int, make) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of ``requests`` calls spread over ``clients`` threads."""
    import httpx

    def client(n: int) -> list[float]:
        times = []
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(n):
                start = time.perf_counter()
                response = make(http, i)
                response.raise_for_status()
                times.append(time.perf_counter() - start)
        return times

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = [t for part in pool.map(client, [requests // clients] * clients) for t in part]
    wall = time.perf_counter() - start
    times.sort()
    return len(times) / wall, 1000 * statistics.median(times), 1000 * times[int(0.99 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        server(Path(args.server[0]), Path(args.server[1]), args.size, args.port)
        return
    from PIL import Image

    from vitpipe.cli import main as vitpipe

    work = Path(tempfile.mkdtemp(prefix="vitpipe-serve-load-"))
    assert vitpipe(["demo", "--out", str(work / "demo"), "--train-images", str(args.images), "--test-images", "100",
                    "train.max_steps=2"]) == 0
    run, shards = work / "demo" / "mae", work / "demo" / "shards" / "test"
    proc = subprocess.Popen([sys.executable, __file__, "--server", str(run), str(shards), "--size", str(args.size),
                             "--port", str(args.port)])
    url = f"http://127.0.0.1:{args.port}"
    try:
        import httpx

        for _ in range(600):
            try:
                httpx.get(url + "/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
        png = buffer.getvalue()
        queries = {
            "key query (index search)": lambda http, i: http.get("/api/search", params={"key": f"k{i % args.size}", "k": 10}),
            "image upload (encoder + search)": lambda http, i: http.post("/api/search", params={"k": 10},
                                                                         files={"image": ("q.png", png, "image/png")}),
        }
        print(f"| query | clients | requests/s | p50 (ms) | p99 (ms) |  ({args.size:,}-vector index)")
        print("|---|---|---|---|---|")
        for name, make in queries.items():
            for clients in (1, 16):
                rate, p50, p99 = load(url, clients, args.requests, make)
                print(f"| {name} | {clients} | {rate:.0f} | {p50:.1f} | {p99:.1f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
