"""Evals score a test set in the train set's classes, by name, when the two were ingested apart."""

import json

import numpy as np

from test_downstream import tiny_labelled_shards, tiny_run  # noqa: F401 (fixtures)
from vitpipe.cli import main


def test_a_test_set_ingested_apart_is_scored_in_the_train_sets_classes(tiny_run, tmp_path, capsys):  # noqa: F811
    """A test folder with a subset of the classes numbers them from 0 ({dog: 0} against train's
    {cat: 0, dog: 1}): k-NN scored 0.0 on raw pixels where every answer was right. Labels now go
    by class name; a class the train set lacks is refused before any extraction."""
    from PIL import Image

    from vitpipe.config import IngestConfig
    from vitpipe.pipeline.ingest import ingest

    def folder(root, classes, count):
        for name, shade in classes.items():
            (root / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((16, 16, 3), shade, np.uint8)
                pixels[i % 16, :, :] = 255 - shade  # distinct images, one row flipped
                Image.fromarray(pixels).save(root / name / f"{i}.png")
        return str(root)

    def shards(root, classes, count):
        ingest(folder(tmp_path / root, classes, count), tmp_path / f"{root}_shards",
               IngestConfig(image_size=16, dedup=False), progress=False)
        return str(tmp_path / f"{root}_shards")

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
