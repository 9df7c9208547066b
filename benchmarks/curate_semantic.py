"""Semantic dedup (`vitpipe curate`'s semantic_dedup step) on synthetic embeddings: --n random unit
vectors plus --n clustered ones (groups of --group near-copies, cosine ~0.995 to each other), 192-d like ViT-Ti. Reports
seconds and peak memory (ru_maxrss) of the k-means and of the step, and how many of the clustered
near-copies it removed.

    python benchmarks/curate_semantic.py --n 100000
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from vitpipe.curate.embedded import kmeans, run_semantic_dedup
from vitpipe.curate.recipe import SemanticDedupStep
from vitpipe.curate.steps import Item


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--group", type=int, default=5)
    parser.add_argument("--eps", type=float, default=0.05)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    random = unit(rng.normal(size=(args.n, args.dim)))
    centres = unit(rng.normal(size=(args.n // args.group, args.dim)))
    clustered = unit(np.repeat(centres, args.group, axis=0) + 0.005 * rng.normal(size=(args.n, args.dim)))
    matrix = np.concatenate([random, clustered])
    keys = [f"k{i}" for i in range(len(matrix))]
    items = [Item(i, key, 8, 8, 0) for i, key in enumerate(keys)]
    start = time.monotonic()
    kmeans(matrix, round(len(matrix) ** 0.5), 0)
    kmeans_seconds = time.monotonic() - start
    start = time.monotonic()
    removed = run_semantic_dedup(items, SemanticDedupStep(encoder="x", eps=args.eps), dict(zip(keys, matrix)))
    seconds = time.monotonic() - start
    from_random = sum(p < args.n for p in removed)
    expected = args.n - args.n // args.group  # all but one of each group of near-copies
    print(f"{len(matrix):,} embeddings ({args.dim}-d): k-means alone {kmeans_seconds:.1f} s; semantic_dedup "
          f"{seconds:.1f} s; removed {len(removed):,} ({len(removed) - from_random:,} of the {expected:,} near-copies, "
          f"{from_random:,} random); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
