"""Whatever a DataLoader worker raises, every command exits with one error line (no hang, no
worker traceback), and a shard set that cannot serve a command is told before any work
(issue: faults in the new features). Every test here runs real processes with workers on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_image_folder
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest

RUN_ARGS = ["model.size=micro", "data.image_size=16", "train.batch_size=8", "train.max_steps=2",
            "data.num_workers=2", "train.tensorboard=false"]
MAE_ARGS = ["mae.decoder_dim=32", "mae.decoder_heads=2", "mae.decoder_depth=1"]


def vitpipe(*args: str, patch: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, after ``patch`` (Python run first: the damage a test does).
    A hang fails the test through the timeout instead of hanging the suite."""
    code = f"import sys\n{patch}\nfrom vitpipe.cli import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if not line.startswith(("warning:", "note:"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers")
    ingest(str(write_image_folder(root / "plain", per_class=12, classes=("a", "b"))), root / "plain_shards",
           IngestConfig(shard_size=6, image_size=16), progress=False)
    captioned = write_image_folder(root / "captioned", per_class=12, classes=("red_cat", "blue_dog"))
    ingest(str(captioned), root / "captioned_shards", IngestConfig(shard_size=6, image_size=16, filename_captions=True),
           progress=False)
    assert main(["pretrain", "mae", "--data", str(root / "plain_shards"), "--out", str(root / "mae"),
                 *RUN_ARGS, *MAE_ARGS]) == 0
    assert main(["pretrain", "clip", "--data", str(root / "captioned_shards"), "--out", str(root / "clip"),
                 *RUN_ARGS]) == 0
    return root


DECODE_FAILS = ("import vitpipe.pipeline.loader as L\n"
                "def broken(self, raw):\n    raise KeyError('boom in a worker')\n"
                "L.ShardDataset._decode = broken\n")


@pytest.mark.parametrize("command", ["eval", "pretrain"])
def test_an_error_inside_a_worker_is_one_line_and_the_process_exits(data, command, tmp_path):
    if command == "eval":
        args = ["eval", "knn", str(data / "mae"), "--train", str(data / "plain_shards"),
                "--test", str(data / "plain_shards"), "--workers", "2", "--max-contamination", "1"]
    else:
        args = ["pretrain", "mae", "--data", str(data / "plain_shards"), "--out", str(tmp_path / "run"),
                *RUN_ARGS, *MAE_ARGS]
    done = vitpipe(*args, patch=DECODE_FAILS)
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert "KeyError in a data loader worker" in line and "boom in a worker" in line


def test_an_error_outside_the_loader_with_workers_alive_does_not_hang(data):
    """The encoder fails on the first batch while two workers are prefetching."""
    patch = ("import vitpipe.ssl.vit as V\n"
             "def broken(self, *a, **k):\n    raise RuntimeError('encoder broke')\n"
             "V.VisionTransformer.forward_features = broken\n")
    done = vitpipe("eval", "knn", str(data / "mae"), "--train", str(data / "plain_shards"),
                   "--test", str(data / "plain_shards"), "--workers", "2", "--init", "random",
                   "--max-contamination", "1", patch=patch)
    assert done.returncode == 1 and "encoder broke" in one_error_line(done.stderr)


def test_clip_retrieval_over_caption_less_shards_finishes_and_text_is_refused_first(data):
    done = vitpipe("eval", "retrieval", str(data / "clip"), "--index", str(data / "plain_shards"), "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "24 of 24 samples" in done.stderr and "image-text recall skipped" in done.stderr
    (data / "clip" / "eval" / "retrieval.json").unlink()
    done = vitpipe("eval", "retrieval", str(data / "clip"), "--index", str(data / "plain_shards"), "--workers", "2",
                   "--text", "a red cat")
    assert done.returncode == 2
    assert "24 of 24 samples have no caption (txt)" in one_error_line(done.stderr)
    assert not (data / "clip" / "eval" / "retrieval.json").exists()  # told before any work
    done = vitpipe("eval", "retrieval", str(data / "clip"), "--index", str(data / "captioned_shards"),
                   "--workers", "2", "--text", "  ")
    assert done.returncode == 2 and "--text is empty" in one_error_line(done.stderr)


def test_clip_pretraining_on_partly_captioned_shards_is_one_line(data, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for source in ("plain_shards", "captioned_shards"):
        for shard in sorted((data / source).glob("0000[01].tar")):
            (mixed / f"{source[:3]}{shard.name}").write_bytes(shard.read_bytes())
    done = vitpipe("pretrain", "clip", "--data", str(mixed), "--out", str(tmp_path / "run"), *RUN_ARGS,
                   "data.samples_per_epoch=16")
    assert done.returncode == 2
    assert "12 of 24 samples have no caption (txt)" in one_error_line(done.stderr)
