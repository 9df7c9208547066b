"""Unlabelled rows are counted and left out, never scored; labels that are not integers are one
line naming the column; an ingest that wrote nothing fails (issue: faults in the new features)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import encode_image, make_image
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest

datasets = pytest.importorskip("datasets")

RUN_ARGS = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
            "mae.decoder_depth=1", "train.batch_size=8", "train.max_steps=2", "data.num_workers=0",
            "train.tensorboard=false"]


def hf_dataset(path: Path, labels: list, captions: list | None = None, class_label: bool = False) -> str:
    """A save_to_disk dataset of len(labels) distinct images with these label cells."""
    label_type = datasets.ClassLabel(names=["cat", "dog"]) if class_label else None
    columns = {"image": [{"bytes": encode_image(make_image(i, size=16)), "path": f"{i}.png"} for i in range(len(labels))],
               "label": labels}
    if captions is not None:
        columns["caption"] = captions
    dataset = datasets.Dataset.from_dict(columns)
    if label_type is not None:
        dataset = dataset.cast_column("label", label_type)
    dataset.save_to_disk(path)
    return f"hf:{path}"


def result(run: Path, name: str) -> dict:
    return json.loads((run / "eval" / f"{name}.json").read_text())


@pytest.fixture
def half_unlabelled(tmp_path) -> tuple[Path, Path]:
    """Train: 40 labelled (0/1) + 20 with HF's -1; test: 20 labelled + 10 with -1."""
    train = hf_dataset(tmp_path / "train_ds", [i % 2 for i in range(40)] + [-1] * 20, class_label=True)
    test = hf_dataset(tmp_path / "test_ds", [i % 2 for i in range(20)] + [-1] * 10, class_label=True)
    for name, source in (("train", train), ("test", test)):
        ingest(source, tmp_path / name, IngestConfig(shard_size=16, image_size=16), progress=False)
    return tmp_path / "train", tmp_path / "test"


def test_minus_one_labels_are_counted_at_ingest_and_left_out_of_every_labelled_eval(tmp_path, half_unlabelled):
    train, test = half_unlabelled
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["written"] == 60 and manifest["fields"]["unlabelled"] == 20
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(train), "--out", str(run), *RUN_ARGS]) == 0
    common = ["--train", str(train), "--test", str(test), "--workers", "2", "--max-contamination", "1"]
    assert main(["eval", "knn", str(run), *common]) == 0
    knn = result(run, "knn")
    assert knn["train_samples"] == 40 and knn["test_samples"] == 20
    assert knn["samples"]["test"]["skipped"] == {"unlabelled": 10}
    assert main(["eval", "linear-probe", str(run), *common]) == 0  # crashed on -1 before
    assert result(run, "linear-probe")["test_samples"] == 20


def test_float_and_string_labels_are_one_line_naming_the_column(tmp_path, capsys):
    floats = hf_dataset(tmp_path / "f", [0.7, 1.7, 0.0, 1.0])
    assert main(["ingest", floats, "--out", str(tmp_path / "out_f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'label'" in err[0] and "0.7" in err[0]
    strings = hf_dataset(tmp_path / "s", ["cat", "dog", "cat", "dog"])
    assert main(["ingest", strings, "--out", str(tmp_path / "out_s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'label'" in err[0] and "cat" in err[0]
    whole = hf_dataset(tmp_path / "w", [0.0, 1.0, 1.0, 0.0])  # integral floats are labels as they are
    manifest = ingest(whole, tmp_path / "out_w", IngestConfig(), progress=False)
    assert manifest["written"] == 4 and manifest["fields"]["unlabelled"] == 0


def test_eval_on_shards_without_any_label_is_told_before_any_work(tmp_path, capsys):
    unlabelled = hf_dataset(tmp_path / "u", [-1] * 12)
    ingest(unlabelled, tmp_path / "shards", IngestConfig(image_size=16), progress=False)
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tmp_path / "shards"), "--out", str(run), *RUN_ARGS,
                 "train.batch_size=4"]) == 0
    capsys.readouterr()
    assert main(["eval", "knn", str(run), "--max-contamination", "1", "--train", str(tmp_path / "shards"), "--test", str(tmp_path / "shards"),
                 "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'shards'}: 12 of 12 samples have no label (cls); "
                   "a labelled evaluation needs samples with one"]
    assert not (run / "eval" / "cache").exists() or not any((run / "eval" / "cache").iterdir())


def test_an_ingest_that_writes_nothing_exits_non_zero(tmp_path, capsys):
    path = tmp_path / "junk"
    datasets.Dataset.from_dict({"image": [b"not an image at all"] * 5, "label": [0] * 5}).save_to_disk(path)
    assert main(["ingest", f"hf:{path}", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: nothing written: 5 rows, 5 failed")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["written"] == 0  # the accounting is kept


def test_max_failed_fraction_stops_a_pipeline_and_changes_no_shard(tmp_path, capsys):
    path = tmp_path / "mixed"
    images = [encode_image(make_image(i, size=16)) for i in range(6)] + [b"junk"] * 4
    datasets.Dataset.from_dict({"image": images, "label": [0] * 10}).save_to_disk(path)
    assert main(["ingest", f"hf:{path}", "--out", str(tmp_path / "out"), "max_failed_fraction=0.2"]) == 1
    assert "4 of 10 rows failed" in capsys.readouterr().err
    # the same ingest judged with the default setting: nothing to redo, no --overwrite asked for
    assert main(["ingest", f"hf:{path}", "--out", str(tmp_path / "out")]) == 0


def test_none_labels_captions_and_bad_utf8_are_counted(tmp_path):
    source = hf_dataset(tmp_path / "c", [0, None, 1, 0], captions=[b"ok", b"caf\xe9", None, "fine"])
    manifest = ingest(source, tmp_path / "out", IngestConfig(text_col="caption"), progress=False)
    assert manifest["fields"] == {"unlabelled": 1, "uncaptioned": 1, "captions_utf8_repaired": 1}
