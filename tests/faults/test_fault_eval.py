"""Evaluation under damaged data: no eval scores the wrong split, drops samples silently, or reuses
features of shards that changed (issue: faults and hostile input)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from conftest import encode_image, make_image, write_image_folder
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest
from vitpipe.pipeline.tario import write_tar_atomic

RUN_ARGS = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
            "mae.decoder_depth=1", "train.batch_size=8", "train.max_steps=2", "data.num_workers=0",
            "train.tensorboard=false"]


@pytest.fixture
def shards(tmp_path) -> Path:
    """60 labelled images; train and val each land in ONE shard named 00000.tar."""
    folder = write_image_folder(tmp_path / "imgs", per_class=20, classes=("a", "b", "c"))
    ingest(str(folder), tmp_path / "shards", IngestConfig(shard_size=100, val_fraction=0.3, image_size=16),
           progress=False)
    return tmp_path / "shards"


@pytest.fixture
def run(tmp_path, shards) -> Path:
    out = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(shards / "train"), "--out", str(out), *RUN_ARGS]) == 0
    return out


def sizes(directory: Path) -> int:
    return sum(json.loads((directory / "sizes.json").read_text()).values())


def knn(run: Path, train: Path, test: Path, *extra: str) -> int:
    # the swapped direction tests on the pretraining split: contamination is not what these tests are about
    return main(["eval", "knn", str(run), "--train", str(train), "--test", str(test), "--workers", "0",
                 "--max-contamination", "1", *extra])


def result(run: Path, name: str = "knn") -> dict:
    return json.loads((run / "eval" / f"{name}.json").read_text())


def test_two_splits_with_the_same_shard_names_are_not_confused(run, shards):
    assert (shards / "train" / "00000.tar").is_file() and (shards / "val" / "00000.tar").is_file()
    assert knn(run, shards / "train", shards / "val") == 0
    first = result(run)
    assert first["test_samples"] == sizes(shards / "val") != sizes(shards / "train")
    assert first["train_samples"] == sizes(shards / "train")
    # and the other way round, from the same cache directory
    assert knn(run, shards / "val", shards / "train") == 0
    assert result(run)["test_samples"] == sizes(shards / "train")
    assert main(["eval", "linear-probe", str(run), "--train", str(shards / "train"), "--test", str(shards / "val"),
                 "--workers", "0", "--epochs", "2", "--max-contamination", "1"]) == 0
    assert result(run, "linear-probe")["test_samples"] == sizes(shards / "val")
    assert main(["eval", "retrieval", str(run), "--index", str(shards / "val"), "--workers", "0"]) == 0
    assert result(run, "retrieval")["size"] == sizes(shards / "val")


def test_truncated_shard_fails_the_eval_or_is_counted(tmp_path, run, shards, capsys):
    folder = write_image_folder(tmp_path / "more", per_class=16, classes=("a", "b", "c"))
    many = tmp_path / "many"
    ingest(str(folder), many, IngestConfig(shard_size=12, image_size=16), progress=False)  # 48 in 4 shards
    shard = many / "00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    assert knn(run, many, shards / "val") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing" in err[0] and "Traceback" not in err[0]
    assert knn(run, many, shards / "val", "--max-skipped", "0.5") == 0
    assert "warning:" in capsys.readouterr().err
    counts = result(run)["samples"]["train"]
    assert counts["expected"] == 48 and 36 <= counts["read"] < 48
    assert counts["read"] + counts["missing"] == 48 and counts["shard_errors"]
    assert result(run)["train_samples"] == counts["read"]


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    data = bytearray(encode_image(make_image(0, size=1)))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_bombs_and_corrupt_images_inside_shards_are_counted_by_reason(tmp_path, run, shards, capsys):
    directory = tmp_path / "damaged"
    directory.mkdir()
    samples = [{"__key__": f"k{i}", "png": encode_image(make_image(i, size=16)), "cls": b"0"} for i in range(40)]
    samples[3]["png"] = png_claiming(30_000, 30_000)
    samples[7]["png"] = b"this is not an image"
    samples[9]["png"] = encode_image(make_image(9, size=16))[:70]
    write_tar_atomic(directory / "00000.tar", samples)
    (directory / "sizes.json").write_text(json.dumps({"00000.tar": 40}))
    capsys.readouterr()
    assert knn(run, shards / "train", directory, "--max-skipped", "0.1") == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "Traceback" not in err
    counts = result(run)["samples"]["test"]
    assert counts["read"] == 37 and counts["missing"] == 0
    assert counts["skipped"] == {"not_an_image": 1, "too_many_pixels": 1, "truncated_image": 1}
    assert knn(run, shards / "train", directory) == 1  # 3 of 40 is above the default 1%


def test_changed_shard_is_never_served_from_the_feature_cache(tmp_path, run, shards):
    assert knn(run, shards / "train", shards / "val") == 0
    assert result(run)["samples"]["test"]["read"] == sizes(shards / "val")
    shard = shards / "val" / "00000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # same name, same manifest
    assert knn(run, shards / "train", shards / "val", "--max-skipped", "1") == 0
    counts = result(run)["samples"]["test"]
    assert counts["read"] < sizes(shards / "val") and counts["missing"] > 0
    assert result(run)["test_samples"] == counts["read"]
