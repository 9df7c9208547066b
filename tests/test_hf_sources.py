"""Hugging Face datasets in the forms users hold them: splits kept, hub-format parquet folders,
imagefolder, label names, missing columns; all read offline."""

from __future__ import annotations

import io
import json

import pytest

from conftest import encode_image, make_image
from test_ingest import assert_accounting, read_all
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest

datasets = pytest.importorskip("datasets")



def make_dataset(count: int, start: int = 0):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"]),
                                  "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": encode_image(make_image(start + i)), "path": f"{start + i}.png"} for i in range(count)],
         "label": [(start + i) % 2 for i in range(count)], "caption": [f"picture {start + i}" for i in range(count)]},
        features=features)


def test_a_dataset_dict_keeps_its_splits_and_label_names(tmp_path):
    datasets.DatasetDict({"train": make_dataset(50), "test": make_dataset(10, start=100)}).save_to_disk(tmp_path / "dd")
    manifest = ingest(f"hf:{tmp_path / 'dd'}", tmp_path / "out", IngestConfig(text_col="caption", shard_size=20),
                      progress=False)
    assert_accounting(manifest)
    assert {name: split["written"] for name, split in manifest["splits"].items()} == {"train": 50, "test": 10}
    assert manifest["label_map"] == {"cat": 0, "dog": 1}
    test = read_all(tmp_path / "out" / "test")
    assert len(test) == 10 and {s["txt"] for s in test.values()} == {f"picture {100 + i}".encode() for i in range(10)}


def test_val_fraction_carves_from_train_only_and_split_takes_one(tmp_path):
    datasets.DatasetDict({"train": make_dataset(40), "test": make_dataset(10, start=100)}).save_to_disk(tmp_path / "dd")
    manifest = ingest(f"hf:{tmp_path / 'dd'}", tmp_path / "out", IngestConfig(val_fraction=0.25), progress=False)
    written = {name: split["written"] for name, split in manifest["splits"].items()}
    assert written["test"] == 10 and written["train"] + written["val"] == 40 and written["val"] > 0
    assert main(["ingest", f"hf:{tmp_path / 'dd'}", "--out", str(tmp_path / "only"), "--split", "test"]) == 0
    only = json.loads((tmp_path / "only" / "manifest.json").read_text())
    assert only["written"] == 10 and list(only["splits"]) == ["train"] and only["splits"]["train"]["dir"] == "."


def test_hub_layout_parquet_folder_and_files(tmp_path):
    """data/train-0000X-of-00002.parquet + data/test-...: as `huggingface-cli download` leaves them."""
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    make_dataset(12).select(range(6)).to_parquet(str(data / "train-00000-of-00002.parquet"))
    make_dataset(12).select(range(6, 12)).to_parquet(str(data / "train-00001-of-00002.parquet"))
    make_dataset(4, start=50).to_parquet(str(data / "test-00000-of-00001.parquet"))
    manifest = ingest(f"hf:{tmp_path / 'repo'}", tmp_path / "out", IngestConfig(text_col="caption"), progress=False)
    assert {name: split["written"] for name, split in manifest["splits"].items()} == {"train": 12, "test": 4}
    assert manifest["label_map"] == {"cat": 0, "dog": 1}
    manifest = ingest(f"hf:{data}/train-*.parquet", tmp_path / "files", IngestConfig(), progress=False)
    assert manifest["written"] == 12 and manifest["splits"]["train"]["dir"] == "."


def test_imagefolder_layout(tmp_path):
    for index in range(6):
        folder = tmp_path / "images" / "train" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        make_image(index).save(folder / f"{index}.png")
    manifest = ingest(f"hf:{tmp_path / 'images'}", tmp_path / "out", IngestConfig(), progress=False)
    assert manifest["written"] == 6 and manifest["label_map"] == {"cat": 0, "dog": 1}
    samples = read_all(tmp_path / "out")
    from PIL import Image

    assert all(Image.open(io.BytesIO(s["png"])).size == (24, 24) for s in samples.values())


@pytest.mark.parametrize("args,message", [
    (["text_col=title"], "no column 'title'; columns: image, label, caption"),
    (["image_col=img"], "no column 'img'; columns: image, label, caption"),
    (["--split", "validation"], "no split 'validation'; splits: train, test"),
])
def test_bad_columns_and_splits_are_one_line(tmp_path, capsys, args, message):
    datasets.DatasetDict({"train": make_dataset(4), "test": make_dataset(2)}).save_to_disk(tmp_path / "dd")
    capsys.readouterr()
    assert main(["ingest", f"hf:{tmp_path / 'dd'}", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_streamed_ingest_resumes_after_a_crash(tmp_path):
    """A parquet dataset is streamed; a rerun after losing the last shards writes only those."""
    make_dataset(30).to_parquet(str(tmp_path / "d.parquet"))
    config = IngestConfig(shard_size=10)
    ingest(f"hf:{tmp_path / 'd.parquet'}", tmp_path / "out", config, progress=False)
    (tmp_path / "out" / "manifest.json").unlink()  # as if killed before the manifest
    (tmp_path / "out" / "00002.tar").unlink()
    manifest = ingest(f"hf:{tmp_path / 'd.parquet'}", tmp_path / "out", config, progress=False)
    assert manifest["written"] == 30 and manifest["splits"]["train"]["shards_reused"] == 2
