"""The demo's ingest alone: its web folder served as the demo serves it, one URL list with a split
column, `vitpipe ingest` as the demo runs it plus any key=value (e.g. processes=2); prints seconds.

    python benchmarks/demo_ingest.py DEMO_OUT OUT [key=value ...]

DEMO_OUT: a finished `vitpipe demo --out DEMO_OUT` (its web/ folder is reused; labels are not
needed for timing; it rewrites DEMO_OUT/web/images.csv with this run's port). OUT must not exist.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from vitpipe.cli import main
from vitpipe.demo import serve, write_url_list


def run(demo: Path, out: Path, overrides: list[str]) -> float:
    web = demo / "web"
    counts = {split: len(list((web / split).glob("*.png"))) for split in ("train", "test")}
    with serve(web) as base_url:
        url_list = write_url_list(web, {split: np.zeros(n, dtype=int) for split, n in counts.items()}, base_url)
        start = time.monotonic()
        code = main(["ingest", str(url_list), "--out", str(out), "--caption-col", "caption", "--split-col", "split",
                     "--shard-size", "2000", "--threads", "16", "encode_format=png", "timeout=20",
                     "allow_networks=127.0.0.1/32", *overrides])
        seconds = time.monotonic() - start
    if code != 0:
        raise SystemExit(code)
    return seconds


if __name__ == "__main__":
    print(f"ingest {run(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]):.1f} s")
