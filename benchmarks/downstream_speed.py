"""Downstream speed: probe sweep vs one head, feature extraction, FAISS search vs numpy brute force.

    python benchmarks/downstream_speed.py --shards runs/quickstart/shards

--shards is an ingest of Fashion-MNIST (`vitpipe ingest fashion-mnist --out ...`); its test split
(10,000 images) is what the encoders read. Prints Markdown tables; nothing is cached between rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from vitpipe.ssl import registry
from vitpipe.downstream.features import EncoderSource, extract
from vitpipe.downstream.probe import train_heads
from vitpipe.downstream.retrieval import IndexSettings, build_index, normalize, search


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def probe_sweep(count: int, dim: int, epochs: int) -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((count, dim)).astype(np.float32)
    labels = rng.integers(0, 10, count)
    print(f"\n### Linear-probe sweep ({count:,} x {dim} features, 10 classes, {epochs} epochs, batch 256)\n")
    print("| heads | seconds | x one head |\n|---:|---:|---:|")
    one = None
    for lrs in ([0.1], [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]):
        for wds in ([0.0], [0.0, 1e-4, 1e-3]):
            grid = [(lr, wd) for lr in lrs for wd in wds]
            seconds, _ = timed(lambda: train_heads(features, labels, 10, [g[0] for g in grid], [g[1] for g in grid],
                                                   epochs, 256, 0), repeats=2)
            one = one or seconds
            print(f"| {len(grid)} ({len(lrs)} lr x {len(wds)} wd) | {seconds:.2f} | {seconds / one:.2f} |")


def extraction(shards: Path, config_path: str, batch_size: int) -> None:
    config = registry.pretrain_config("mae", config_path)
    test = str(shards / "test")
    print(f"\n### Feature extraction ({test}, batch {batch_size}, 2 loader workers)\n")
    print("| encoder | images | seconds | features/s |\n|---|---:|---:|---:|")
    for kind, label, layers in (("pixels", "raw pixels", None),
                                ("random", f"ViT-{config.model.size}/{config.model.patch_size}, last layer", None),
                                ("random", "same, blocks 3,7,11 (0-based) in one pass", [3, 7, 11]),
                                ("random", "same, blocks 3,5 only (stops after block 5)", [3, 5])):
        source = EncoderSource(kind, config, shards)
        seconds, result = timed(lambda: extract(source, test, layers=layers, batch_size=batch_size))
        count = len(result.keys)
        print(f"| {label} | {count:,} | {seconds:.1f} | {count / seconds:,.0f} |")


def numpy_search(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by inner product in blocks of queries (what one writes without FAISS)."""
    found = []
    for start in range(0, len(queries), 1024):
        scores = queries[start:start + 1024] @ database.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        found.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(found)


def index_search(count: int, queries: int, dim: int, k: int) -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((100, dim)).astype(np.float32)  # clustered, like real embeddings
    database = centers[rng.integers(0, 100, count)] + 0.5 * rng.standard_normal((count, dim)).astype(np.float32)
    query = centers[rng.integers(0, 100, queries)] + 0.5 * rng.standard_normal((queries, dim)).astype(np.float32)
    db_n, q_n = normalize(database), normalize(query)
    seconds, exact = timed(lambda: numpy_search(db_n, q_n, k), repeats=2)
    print(f"\n### Search ({count:,} x {dim} database, {queries:,} queries, top-{k}, cosine)\n")
    print("| method | build s | queries/s | x numpy | recall@{k} vs exact |\n|---|---:|---:|---:|---:|"
          .replace("{k}", str(k)))
    print(f"| numpy brute force (blocked matmul + argpartition) | 0 | {queries / seconds:,.0f} | 1.00 | 1.000 |")
    base = queries / seconds
    for settings in (IndexSettings("flat"), IndexSettings("ivf", nlist=256, nprobe=8),
                     IndexSettings("hnsw", hnsw_m=32, ef_search=64)):
        build_seconds, index = timed(lambda: build_index(database, settings))
        search_seconds, (_, ids) = timed(lambda: search(index, query, k), repeats=2)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact)])
        name = {"flat": "faiss flat (exact)", "ivf": "faiss IVF nlist 256, nprobe 8",
                "hnsw": "faiss HNSW M 32, efSearch 64"}[settings.kind]
        rate = queries / search_seconds
        print(f"| {name} | {build_seconds:.2f} | {rate:,.0f} | {rate / base:.2f} | {recall:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True, help="Fashion-MNIST ingest directory")
    parser.add_argument("--config", default="configs/mae_fashion_mnist.yaml")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe_sweep(54_000, 192, 10)
    extraction(args.shards, args.config, 256)
    index_search(60_000, 10_000, 192, 10)


if __name__ == "__main__":
    main()
