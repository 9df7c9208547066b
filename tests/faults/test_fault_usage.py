"""Usage mistakes are one line and exit 2, before any work; quiet outcomes are said
(issue: faults in the new features, items 7, 9, 11, 12)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from test_clip import ARGS as CLIP_ARGS
from test_igpt import ARGS as IGPT_ARGS
from test_trainer import RUN_ARGS
from vitpipe.cli import main
from vitpipe.ssl.objectives.igpt.objective import load_palette, palette_bytes


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("note:", "warning:"))]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    from conftest import write_image_folder
    from vitpipe.config import IngestConfig
    from vitpipe.pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("usage")
    ingest(str(write_image_folder(root / "imgs", per_class=10, classes=("a", "b"))), root / "shards",
           IngestConfig(shard_size=10, image_size=16), progress=False)
    assert main(["pretrain", "mae", "--data", str(root / "shards"), "--out", str(root / "run"), *RUN_ARGS,
                 "train.max_steps=1"]) == 0
    return root


def test_export_never_overwrites_a_users_files_and_writes_ordinary_modes(mae_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own")
    assert main(["export", str(mae_run / "run"), "--out", str(out)]) == 2
    line = one_line(capsys)
    assert "config.json" in line and "--overwrite" in line
    assert (out / "config.json").read_text() == "my own" and not (out / "model.safetensors").exists()
    assert main(["export", str(mae_run / "run"), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["vitpipe"]["objective"] == "mae"
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name
    assert not list(out.glob(".*.tmp"))
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    assert main(["export", str(mae_run / "run"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in one_line(capsys)


def test_hf_export_of_a_conv_stem_suggests_only_what_works(tmp_path, mae_run, capsys):
    run = tmp_path / "stem"
    assert main(["pretrain", "mae", "--data", str(mae_run / "shards"), "--out", str(run), *RUN_ARGS,
                 "train.max_steps=1", "model.conv_stem=true"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    line = one_line(capsys)
    assert "--format vitpipe" in line and "--format timm" not in line
    assert main(["export", str(run), "--out", str(tmp_path / "timm"), "--format", "timm"]) == 2
    assert "--format vitpipe" in one_line(capsys)
    assert main(["export", str(run), "--out", str(tmp_path / "vp"), "--format", "vitpipe"]) == 0


@pytest.mark.parametrize("colours,words", [
    ([[0.1, 0.2, float("nan")], [0.0, 0.0, 0.0]], "NaN or infinite"),
    ([[0.5, 0.5, 0.5]] * 16, "15 of its 16 colours repeat"),
    ([[0.5, 0.5, 0.5]], "1 colours; a palette has 2..4096"),
])
def test_broken_palettes_are_refused_before_training(colours, words, tmp_path, mae_run, capsys):
    with pytest.raises(Exception, match=words):
        load_palette(palette_bytes(np.array(colours, dtype=np.float32), "x"), 3, "p.json")
    path = tmp_path / "p.json"
    path.write_bytes(palette_bytes(np.array(colours, dtype=np.float32), "x"))
    assert main(["pretrain", "igpt", "--data", str(mae_run / "shards"), "--out", str(tmp_path / "r"), *IGPT_ARGS,
                 f"igpt.palette_size={max(len(colours), 2)}", f"igpt.palette={path}", "train.max_steps=1"]) == 2
    assert words.split(";")[0] in one_line(capsys)


def test_a_palette_bigger_than_the_colours_there_are_says_a_size_that_works(tmp_path, capsys):
    from PIL import Image

    from vitpipe.config import IngestConfig
    from vitpipe.pipeline.ingest import ingest

    (tmp_path / "two" / "a").mkdir(parents=True)
    for index in range(8):  # black and white only
        array = np.zeros((16, 16, 3), np.uint8)
        array[:, : 2 * index] = 255
        Image.fromarray(array).save(tmp_path / "two" / "a" / f"{index}.png")
    ingest(str(tmp_path / "two"), tmp_path / "shards", IngestConfig(image_size=16, resize_mode="border"), progress=False)
    args = [a for a in IGPT_ARGS if "palette_size" not in a]
    assert main(["pretrain", "igpt", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "r"), *args,
                 "igpt.palette_size=16", "train.max_steps=1"]) == 2
    line = one_line(capsys)
    advice = int(line.rsplit("igpt.palette_size=", 1)[1].split()[0])
    assert main(["pretrain", "igpt", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "r2"), *args,
                 f"igpt.palette_size={advice}", "train.max_steps=1"]) == 0


@pytest.mark.parametrize("override", ["model.depth=-1", "model.embed_dim=-192", "model.mlp_ratio=0",
                                      "model.num_heads=-3"])
def test_impossible_model_shapes_are_one_line(override, tmp_path, mae_run, capsys):
    assert main(["pretrain", "mae", "--data", str(mae_run / "shards"), "--out", str(tmp_path / "r"), *RUN_ARGS,
                 override]) == 2
    assert override.split("=")[0] in one_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", ["clip.text_heads=0", "clip.text_depth=0", "clip.embed_dim=-4"])
def test_impossible_clip_shapes_are_one_line(override, tmp_path, mae_run, capsys):
    assert main(["pretrain", "clip", "--data", str(mae_run / "shards"), "--out", str(tmp_path / "r"), *CLIP_ARGS,
                 override]) == 2
    assert override.split("=")[0].split(".")[1] in one_line(capsys)


def test_lit_from_a_run_with_other_channels_or_pool_names_them_and_makes_nothing(mae_run, tmp_path, capsys):
    clip_args = [*CLIP_ARGS, "train.max_steps=1", f"clip.image_init={mae_run / 'run'}"]
    for override, words in (("data.channels=1", "data.channels 3 vs 1"), ("model.pool=gap", "model.pool cls vs gap")):
        out = tmp_path / override
        assert main(["pretrain", "clip", "--data", str(mae_run / "shards"), "--out", str(out), *clip_args,
                     override]) == 2
        assert words in one_line(capsys)
        assert not out.exists(), "a half-made run directory"


def test_a_run_without_run_json_is_one_line(tmp_path, mae_run, capsys):
    import shutil

    run = tmp_path / "igpt"
    assert main(["pretrain", "igpt", "--data", str(mae_run / "shards"), "--out", str(run), *IGPT_ARGS,
                 "train.max_steps=1"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "run.json").unlink()
    capsys.readouterr()
    assert main(["eval", "knn", str(copy), "--train", str(mae_run / "shards"), "--test", str(mae_run / "shards"),
                 "--workers", "0", "--max-contamination", "1"]) == 2
    assert "run.json" in one_line(capsys)


def test_sample_checks_out_first_and_says_when_fewer_images_exist(tmp_path, mae_run, capsys):
    run = tmp_path / "igpt"
    assert main(["pretrain", "igpt", "--data", str(mae_run / "shards"), "--out", str(run), *IGPT_ARGS,
                 "train.max_steps=1"]) == 0
    capsys.readouterr()
    for out in (tmp_path, tmp_path / "grid"):
        assert main(["sample", str(run), "--prompt", str(mae_run / "shards"), "--out", str(out), "--workers", "0"]) == 2
        assert "give an image file name" in one_line(capsys)
    assert main(["sample", str(run), "--prompt", str(mae_run / "shards"), "--out", str(tmp_path / "g.png"),
                 "--n", "10000", "--workers", "0"]) == 0
    assert "has 20 readable images" in capsys.readouterr().err


def test_an_empty_split_of_a_saved_dataset_dict_is_left_out_with_a_note(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    images = [Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)) for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0]}, features=features),
                          "test": datasets.Dataset.from_dict({"image": [], "label": []}, features=features)}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert main(["ingest", f"hf:{tmp_path / 'dd'}", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err.count("split 'test' is empty; left out") == 1
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["written"] == 3


def test_a_java_home_without_java_is_one_line(tmp_path, monkeypatch, capsys):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/x.png\n")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nonexistent"))
    assert main(["ingest", str(urls), "--out", str(tmp_path / "out"), "distributor=pyspark"]) == 2
    assert "JAVA_HOME" in one_line(capsys)


def test_a_fine_tune_on_few_labels_sizes_its_batch_to_them(mae_run, capsys):
    from vitpipe.downstream.features import EncoderSource
    from vitpipe.downstream.finetune import finetune, finetune_config

    source = EncoderSource.resolve(mae_run / "run")
    config = finetune_config(source, str(mae_run / "shards"), ["data.subset_fraction=0.5"])
    assert config.train.batch_size == 8  # 10 labelled samples: the recipe's 128 halved to fit
    assert "fine-tune batch 8" in capsys.readouterr().err
    assert finetune_config(source, str(mae_run / "shards"), ["train.batch_size=4"]).train.batch_size == 4
    _, result = finetune(source, str(mae_run / "shards"), str(mae_run / "shards"),
                         ["data.subset_fraction=0.5", "train.max_steps=2", "data.num_workers=0"], max_contamination=1)
    assert 0 <= result["top1"] <= 1


def test_retrieval_with_an_empty_text_query_is_one_line(mae_run, capsys):
    capsys.readouterr()
    assert main(["eval", "retrieval", str(mae_run / "run"), "--index", str(mae_run / "shards"), "--text", "  ",
                 "--workers", "0"]) == 2
    assert "--text is empty" in one_line(capsys)
