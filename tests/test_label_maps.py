"""Evals score a test set in the train set's classes, by name, when the two were ingested apart."""

import functools
import json

import numpy as np

from test_downstream import tiny_labelled_shards, tiny_run  # noqa: F401 (fixtures)
from vitpipe.cli import main


def test_a_test_set_ingested_apart_is_scored_in_the_train_sets_classes(tiny_run, tmp_path, capsys):  # noqa: F811
    """A test folder with a subset of the classes numbers them from 0 ({dog: 0} against train's
    {cat: 0, dog: 1}): k-NN scored 0.0 on raw pixels where every answer was right. Labels now go
    by class name; a class the train set lacks is refused before any extraction."""
    shards = functools.partial(_shards, tmp_path)
    train = shards("train", {"cat": 20, "dog": 230}, 12)
    dogs = shards("dogs", {"dog": 228}, 6)
    birds = shards("birds", {"bird": 120, "dog": 228}, 6)
    common = ["--train", train, "--workers", "0", "--max-contamination", "1"]
    assert main(["eval", "knn", str(tiny_run), *common, "--test", dogs, "--pixels"]) == 0
    assert json.loads((tiny_run / "eval" / "knn.pixels.json").read_text())["top1"] == 1.0
    assert main(["eval", "linear-probe", str(tiny_run), *common, "--test", dogs, "--pixels", "--epochs", "5"]) == 0
    assert json.loads((tiny_run / "eval" / "linear-probe.pixels.json").read_text())["top1"] == 1.0
    capsys.readouterr()
    for command in ("knn", "linear-probe", "finetune"):
        extra = [] if command == "finetune" else ["--workers", "0"]
        assert main(["eval", command, str(tiny_run), "--train", train, "--test", birds, "--max-contamination", "1",
                     *extra]) == 2
        assert "has classes train_shards has not (bird)" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


def _shards(tmp_path, root, classes, count):
    """An image folder of flat-colour classes (a row flipped per image) ingested on its own."""
    from PIL import Image

    from vitpipe.config import IngestConfig
    from vitpipe.pipeline.ingest import ingest

    for name, shade in classes.items():
        (tmp_path / root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((16, 16, 3), shade, np.uint8)
            pixels[i % 16, :, :] = 255 - shade
            Image.fromarray(pixels).save(tmp_path / root / name / f"{i}.png")
    ingest(str(tmp_path / root), tmp_path / f"{root}_shards", IngestConfig(image_size=16, dedup=False), progress=False)
    return str(tmp_path / f"{root}_shards")


def test_a_suite_with_such_a_class_is_refused_before_any_dataset_runs(tiny_run, tmp_path, capsys):  # noqa: F811
    train = _shards(tmp_path, "train", {"cat": 20, "dog": 230}, 6)
    birds = _shards(tmp_path, "birds", {"bird": 120}, 4)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"datasets:\n  - {{name: fine, train: {train}, test: {train}, evals: [knn]}}\n"
                     f"  - {{name: birds, train: {train}, test: {birds}, evals: [knn]}}\n")
    assert main(["eval", "suite", str(suite), str(tiny_run), "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "has classes train_shards has not (bird)" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    assert not (tmp_path / "out").exists() and not (tiny_run / "eval").exists()
