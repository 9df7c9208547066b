"""`vitpipe demo`: real images served over loopback as a URL list -> shards -> MAE -> evals -> report.

Every step is a public command (printed before it runs), so the demo doubles as a walkthrough.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import http.server
import json
import shlex
import shutil
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError
from vitpipe.ssl import registry
from vitpipe.pipeline.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx

def default_config() -> Path:
    """configs/demo.yaml of the working directory, else of the source checkout vitpipe runs from."""
    for candidate in (Path("configs/demo.yaml"), Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError("configs/demo.yaml not found: run from the vitpipe checkout or pass --config")


def fashion_mnist(train_count: int, test_count: int) -> tuple[dict[str, np.ndarray], str]:
    """(arrays, origin): the Debian package when installed, else the subset shipped with vitpipe."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        arrays = {
            "train_images": read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[:train_count],
            "train_labels": read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:train_count],
            "test_images": read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:test_count],
            "test_labels": read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:test_count],
        }
        return arrays, str(FASHION_MNIST_DIR)
    with resources.as_file(resources.files("vitpipe") / "data" / "fashion_mnist_subset.npz") as path:
        with np.load(path) as data:
            arrays = {"train_images": data["train_images"][:train_count], "train_labels": data["train_labels"][:train_count],
                      "test_images": data["test_images"][:test_count], "test_labels": data["test_labels"][:test_count]}
    return arrays, "subset shipped with vitpipe"


def write_web_folder(web: Path, arrays: dict[str, np.ndarray]) -> None:
    """The PNG files, per split in its own folder."""
    for split in ("train", "test"):
        folder = web / split
        folder.mkdir(parents=True, exist_ok=True)
        for index, pixels in enumerate(arrays[f"{split}_images"]):
            path = folder / f"{index:05d}.png"
            if not path.exists():
                Image.fromarray(pixels, "L").save(path)


def write_url_list(web: Path, labels: dict[str, np.ndarray], base_url: str) -> Path:
    """One CSV URL list of every split's images, with caption, label and split columns."""
    path = web / "images.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "label", "split"])
        for split, split_labels in labels.items():
            for index, label in enumerate(split_labels):
                writer.writerow([f"{base_url}/{split}/{index:05d}.png",
                                 f"a photo of a {FASHION_MNIST_CLASSES[label].lower()}", int(label), split])
    return path


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A static file server on 127.0.0.1 (a free port) for the duration of the block."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


DEMO_ENTRIES = frozenset({"web", "shards", "mae", "demo.json"})


def clear_earlier_demo(out: Path) -> None:
    """Start from nothing: an earlier demo in ``out`` (finished or not, any version: only the
    demo's own entries) is removed; a folder holding anything else is refused, never emptied. A
    rerun cannot resume the old one: its URL list names another port, so its shards' source changed."""
    entries = {entry.name for entry in out.iterdir()} if out.is_dir() else set()
    if entries - DEMO_ENTRIES:
        raise ConfigError(f"--out {out} holds other files ({', '.join(sorted(entries - DEMO_ENTRIES)[:3])}); "
                          "the demo writes to an empty folder or to an earlier demo's, which it replaces")
    for name in entries:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_demo(out: Path, run_command: Callable[[list[str]], int], config: Path | None = None,
             train_images: int = 6000, test_images: int = 1000, overrides: list[str] | None = None,
             echo: Callable[[str], None] = print) -> dict:
    out = Path(out).resolve()
    config = Path(config) if config else default_config()
    if not config.is_file():
        raise ConfigError(f"demo config not found: {config}")
    start = time.monotonic()
    clear_earlier_demo(out)
    arrays, origin = fashion_mnist(train_images, test_images)
    web, shards, run = out / "web", out / "shards", out / "mae"
    write_web_folder(web, arrays)
    echo(f"demo: {len(arrays['train_images'])} train + {len(arrays['test_images'])} test Fashion-MNIST images "
         f"({origin}), served from {web}")

    steps: list[dict] = []

    def step(args: list[str]) -> None:
        echo("$ vitpipe " + " ".join(shlex.quote(a) for a in args))
        began = time.monotonic()
        code = run_command(args)
        if code != 0:
            raise RuntimeError(f"demo step failed with exit code {code}: vitpipe {' '.join(args)}")
        seconds = round(time.monotonic() - began, 1)
        steps.append({"command": " ".join(args[:2]), "seconds": seconds})
        echo(f"  ({seconds} s)")

    with serve(web) as base_url:
        # one list, one ingest (img2dataset's processes start once): shards/train and shards/test
        url_list = write_url_list(web, {split: arrays[f"{split}_labels"] for split in ("train", "test")}, base_url)
        step(["ingest", str(url_list), "--out", str(shards), "--caption-col", "caption", "--split-col", "split",
              "--shard-size", "2000", "--threads", "16", "encode_format=png", "timeout=20",
              "allow_networks=127.0.0.1/32"])
    step(["shards", "verify", str(shards)])
    step(["pretrain", "mae", "--config", str(config), "--data", str(shards / "train"), "--out", str(run),
          "--resume", "auto", *(overrides or [])])
    common = ["--train", str(shards / "train"), "--test", str(shards / "test")]
    blocks = probe_blocks(run)
    for baseline in ([], ["--init", "random"]):
        # blocks side by side: what made MAE beat raw pixels in benchmarks/RESULTS.md
        step(["eval", "linear-probe", str(run), *common, *baseline, "--layers", blocks, "--concat"])
        step(["eval", "knn", str(run), *common, *baseline])
        step(["eval", "retrieval", str(run), "--index", str(shards / "test"), *baseline])
    step(["report", str(run)])

    headline = {**headline_numbers(run), "seconds": round(time.monotonic() - start, 1), "steps": steps,
                "report": str(RunLayout(run).report / "index.html"), "run": str(run), "shards": str(shards)}
    (out / "demo.json").write_text(json.dumps(headline, indent=2) + "\n")
    return headline


def probe_blocks(run: Path) -> str:
    """The blocks the demo probes (and benchmarks/demo_rescore.sh): every block after the first, as
    --layers takes them ("1,2,3" for 4 blocks; "0" for one)."""
    depth = registry.run_config(RunLayout(run).config).model.depth
    return ",".join(str(block) for block in range(1, depth)) or "0"


def headline_numbers(run: Path) -> dict[str, float | int | None]:
    """Each headline number of the run's evals beside the same eval of a random-init encoder, and
    what they were measured on: the probe's test and train images and how many of those test images
    have a near-copy in the pretraining or train data (counted in the numbers; None: not checked)."""
    results = {path.name: json.loads(path.read_text()) for path in RunLayout(run).results()}
    probe = results["linear-probe.json"]
    return {
        "test_images": probe["test_samples"],
        "train_images": probe["train_samples"],
        "test_images_with_a_near_copy": (probe.get("contamination") or {}).get("contaminated"),
        "linear_probe_top1": probe["top1"],
        "linear_probe_top1_random_init": results["linear-probe.random.json"]["top1"],
        "knn_top1": results["knn.json"]["top1"],
        "knn_top1_random_init": results["knn.random.json"]["top1"],
        "retrieval_recall_at_1": results["retrieval.json"]["recall"].get("1"),
        "retrieval_recall_at_1_random_init": results["retrieval.random.json"]["recall"].get("1"),
    }
