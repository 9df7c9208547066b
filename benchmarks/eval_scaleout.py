"""Evaluation past one process: feature-extraction speed and memory, and k-NN index trade-offs.

    python benchmarks/eval_scaleout.py extract [--work /tmp/scaleout] [--sizes 10000,60000]
    python benchmarks/eval_scaleout.py knn [--sizes 100000,1000000] [--dim 192] [--queries 1000]

extract: Fashion-MNIST train ingested once (10,000 per shard), a ViT-Ti/4 at 32 px (a real run
directory; throughput does not depend on the weights), then `extract()` as `vitpipe eval` calls
it, in a fresh process tree per row: 1 process (2 threads) and 2 processes under torchrun (1
thread each), each with 1 loader worker. Reports images/s (wall clock of the extraction, merge
included) and the peak RSS of the largest process, at two dataset sizes.

knn: random Gaussian vectors (the issue's setting; real features are clustered, which favours IVF),
an exact flat index vs IVF vs IVF-PQ (faiss defaults otherwise), queries/s for 10 neighbours and
recall@10 of each against the exact neighbours. The machine's fp32 matmul rate is measured first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stderr.write(r.stderr[-2000:]); print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 else 'FAILED'); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")


def matmul_gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def prepare(work: Path) -> tuple[Path, Path]:
    shards, run = work / "fm_train", work / "run"
    vitpipe = [sys.executable, "-m", "vitpipe"]
    if not (shards / "manifest.json").exists():
        subprocess.run([*vitpipe, "ingest", "fashion-mnist:train", "--out", str(shards), "--shard-size", "10000"],
                       check=True, stdout=subprocess.DEVNULL)
    if not (run / "checkpoints").exists():
        subprocess.run([*vitpipe, "pretrain", "mae", "--data", str(shards), "--out", str(run), "model.size=tiny",
                        "model.patch_size=4", "data.image_size=32", "data.channels=1", "train.max_steps=1",
                        "train.batch_size=8", "data.num_workers=0", "train.tensorboard=false"],
                       check=True, stdout=subprocess.DEVNULL)
    return shards, run


def child(run: str, spec: str, cache: str) -> None:
    """One extraction as `vitpipe eval` runs it; the first process prints its images/s."""
    from vitpipe.downstream.features import EncoderSource, extract
    from vitpipe.downstream.featurestore import Processes

    processes = Processes.from_env()
    start = time.perf_counter()
    result = extract(EncoderSource.resolve(Path(run)), spec, num_workers=1, cache_dir=Path(cache), processes=processes)
    if result is not None:
        print(json.dumps({"images": len(result.keys), "seconds": time.perf_counter() - start,
                          "self_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def bench_extract(args: argparse.Namespace) -> None:
    shards, run = prepare(args.work)
    print(f"fp32 matmul: {matmul_gflops():.0f} GFLOP/s (2 threads, this process)")
    files = sorted(shards.glob("*.tar"))
    print("| images | processes | images/s | peak RSS, first extraction process (MiB) | peak RSS, largest process "
          "incl. loader workers (MiB) |\n|---:|---:|---:|---:|---:|")
    for size in [int(s) for s in args.sizes.split(",")]:
        count = max(1, size // 10000)
        spec = str(files[0]) if count == 1 else "{" + ",".join(str(f) for f in files[:count]) + "}"
        spec = str(shards) if count == len(files) else spec
        for processes in (1, 2):
            cache = args.work / f"cache_{size}_{processes}"
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            me = [os.path.abspath(__file__), "_child", str(run), spec, str(cache)]
            if processes == 1:
                command, env = [sys.executable, *me], {**os.environ, "OMP_NUM_THREADS": "2"}
            else:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *me]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True)
            lines = out.stdout.strip().splitlines()
            if len(lines) < 2 or lines[0] == "FAILED":
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit("extraction failed")
            measured = json.loads(lines[0])
            print(f"| {measured['images']} | {processes} | {measured['images'] / measured['seconds']:.0f} | "
                  f"{measured['self_rss'] / 2**20:.0f} | {int(lines[1]) / 2**20:.0f} |", flush=True)


def bench_knn(args: argparse.Namespace) -> None:
    import faiss

    print(f"fp32 matmul: {matmul_gflops():.0f} GFLOP/s (2 threads, this process); faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")
    rng = np.random.default_rng(0)
    print("| vectors | index | build s | queries/s | recall@10 vs exact | bytes/vector |\n|---:|---|---:|---:|---:|---:|")
    for size in [int(s) for s in args.sizes.split(",")]:
        base = rng.standard_normal((size, args.dim), dtype=np.float32)
        faiss.normalize_L2(base)
        queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        faiss.normalize_L2(queries)
        nlist = int(4 * np.sqrt(size))
        indexes = {"flat": (lambda: faiss.IndexFlatIP(args.dim), 0)}
        for nprobe in [int(n) for n in args.nprobe.split(",")]:
            indexes[f"IVF{nlist}, nprobe {nprobe}"] = (lambda: faiss.IndexIVFFlat(
                faiss.IndexFlatIP(args.dim), args.dim, nlist, faiss.METRIC_INNER_PRODUCT), nprobe)
            indexes[f"IVF{nlist}-PQ{args.pq_m}, nprobe {nprobe}"] = (lambda: faiss.IndexIVFPQ(
                faiss.IndexFlatIP(args.dim), args.dim, nlist, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT), nprobe)
        trained: dict[str, object] = {}
        exact = None
        for name, (make, nprobe) in indexes.items():
            kind = name.split(",")[0]
            start = time.perf_counter()
            if kind not in trained:  # one trained index per kind; nprobe is a search-time setting
                index = make()
                if not index.is_trained:
                    index.train(base)
                index.add(base)
                trained[kind] = (index, time.perf_counter() - start)
            index, built = trained[kind]
            if nprobe:
                index.nprobe = nprobe
            start = time.perf_counter()
            _, found = index.search(queries, 10)
            rate = args.queries / (time.perf_counter() - start)
            if exact is None:
                exact = found
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
            per_vector = index.sa_code_size() if hasattr(index, "sa_code_size") and name != "flat" else args.dim * 4
            print(f"| {size:,} | {name} | {built:.1f} | {rate:,.0f} | {recall:.3f} | {per_vector} |", flush=True)
        del base


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    extract = sub.add_parser("extract")
    extract.add_argument("--work", type=Path, default=Path("/tmp/scaleout"))
    extract.add_argument("--sizes", default="10000,60000")
    knn = sub.add_parser("knn")
    knn.add_argument("--sizes", default="100000,1000000")
    knn.add_argument("--dim", type=int, default=192)
    knn.add_argument("--queries", type=int, default=1000)
    knn.add_argument("--nprobe", default="16,128", help="IVF cells searched: one row per value")
    knn.add_argument("--pq-m", type=int, default=24)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True) if args.what == "extract" else None
    {"extract": bench_extract, "knn": bench_knn}[args.what](args)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
