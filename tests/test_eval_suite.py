"""`vitpipe eval suite`: several datasets and evals over several runs in one table, each beside its
baselines, averaged over datasets, with each dataset's contamination; reruns read every finished
eval back (per dataset, though RUN/eval/ keeps only the latest of each task); bad suite files and
contaminated datasets are one line or one marked cell."""

from __future__ import annotations

import json

import pytest

import test_clip
from conftest import write_image_folder
from test_trainer import RUN_ARGS
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest

caption_shards = test_clip.caption_shards  # coloured squares titled by their file names (a fixture)


@pytest.fixture
def runs_and_data(caption_shards, tmp_path):
    """A CLIP run pretrained on the squares, an MAE run on other images, and two labelled datasets."""
    folder = write_image_folder(tmp_path / "ab-images", per_class=12, classes=("circle", "stripe"))
    ingest(str(folder), tmp_path / "ab", IngestConfig(shard_size=8, val_fraction=0.25, image_size=16), progress=False)
    clip, mae = tmp_path / "clip-run", tmp_path / "mae-run"
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(clip), *test_clip.ARGS,
                 "train.max_steps=3"]) == 0
    assert main(["pretrain", "mae", "--data", str(tmp_path / "ab" / "train"), "--out", str(mae), *RUN_ARGS,
                 "train.max_steps=3"]) == 0
    return clip, mae, caption_shards, tmp_path / "ab"


def write_suite(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


SUITE = """datasets:
  - name: squares
    train: ../shards/train
    test: ../shards/val
    evals: [linear-probe, knn, zero-shot, retrieval]
  - name: ab
    train: ../ab/train
    test: ../ab/val
    evals: [knn, zero-shot]
"""


def test_suite_table_baselines_averages_and_a_free_rerun(runs_and_data, tmp_path, monkeypatch):
    clip, mae, _, _ = runs_and_data
    suite = write_suite(tmp_path / "suites" / "suite.yaml", SUITE)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "ab-images")  # relative paths are the suite file's, not the working directory's
    args = ["eval", "suite", str(suite), str(clip), str(mae), "--out", str(out), "--workers", "0",
            "--probe-epochs", "5", "--max-contamination", "1"]
    assert main(args) == 0
    result = json.loads((out / "suite.json").read_text())
    squares, ab = result["datasets"]
    cell = squares["runs"]["clip-run"]
    assert set(cell["evals"]) == {"linear-probe", "knn", "zero-shot", "retrieval"}
    assert set(cell["evals"]["knn"]) == {"trained", "random", "pixels", "delta_vs_random"}
    assert set(cell["evals"]["zero-shot"]) == {"trained", "random", "delta_vs_random"}  # pixels have no text side
    retrieval = cell["evals"]["retrieval"]["trained"]
    assert set(retrieval["image_to_text"]) == {"1", "5", "10"} and retrieval["pairs"] == cell["contamination"]["test_images"]
    assert retrieval["score"] == pytest.approx((retrieval["image_to_text"]["1"] + retrieval["text_to_image"]["1"]) / 2)
    assert 0 < cell["contamination"]["fraction"] <= 1  # the squares' test repeats the CLIP's pretraining images
    assert "needs an image-text run" in squares["runs"]["mae-run"]["evals"]["zero-shot"]["skipped"]
    knn = [row["runs"]["mae-run"]["evals"]["knn"]["trained"]["score"] for row in (squares, ab)]
    assert result["average"]["mae-run"]["knn"]["trained"] == {"mean": pytest.approx(sum(knn) / 2), "datasets": 2}
    assert "zero-shot" not in result["average"]["mae-run"]
    page = (out / "index.html").read_text()
    assert "average" in page and "clip-run" in page and "contamination" in page
    # RUN/eval/knn.json now holds the ab dataset's; the suite kept both and reads both back
    assert json.loads((clip / "eval" / "knn.json").read_text())["provenance"]["data"]["test"]["shards"].endswith("ab/val")
    for name in ("eval_linear_probe", "eval_knn"):
        monkeypatch.setattr(f"vitpipe.downstream.evaluate.{name}", _must_not_run)
    monkeypatch.setattr("vitpipe.downstream.imagetext.eval_zero_shot", _must_not_run)
    monkeypatch.setattr("vitpipe.downstream.imagetext.eval_text_retrieval", _must_not_run)
    assert main(args) == 0
    again = json.loads((out / "suite.json").read_text())
    assert again["datasets"] == result["datasets"] and again["average"] == result["average"]


def _must_not_run(*args, **kwargs):
    raise AssertionError("a finished eval was run again")


def test_a_contaminated_dataset_is_a_refused_cell_not_a_number(runs_and_data, tmp_path):
    clip, mae, squares, _ = runs_and_data
    suite = write_suite(tmp_path / "s.yaml", f"datasets:\n  - name: seen\n    test: {squares / 'train'}\n"
                                             "    evals: [zero-shot]\n")
    assert main(["eval", "suite", str(suite), str(clip), str(mae), "--out", str(tmp_path / "out"),
                 "--workers", "0"]) == 0
    row = json.loads((tmp_path / "out" / "suite.json").read_text())["datasets"][0]["runs"]
    assert row["clip-run"]["contamination"]["fraction"] == 1.0 and "above --max-contamination" in row["clip-run"]["refused"]
    assert row["clip-run"]["evals"] == {}
    assert "refused" not in row["mae-run"]  # pretrained elsewhere: measured, then not applicable
    assert "refused: 100.00% contaminated" in (tmp_path / "out" / "index.html").read_text()


@pytest.mark.parametrize("text,message", [
    ("datasets:\n  - name: a\n    test: t\n    evals: [knn]\n", "need train shards"),
    ("datasets:\n  - name: a\n    train: t\n    test: t\n    evals: [knn, top5]\n", "got top5"),
    ("datasets:\n  - name: a\n    test: t\n    evals: [zero-shot]\n    prompts: p\n", "unknown key(s) prompts"),
    ("datasets:\n  - {name: a, test: t, evals: [zero-shot]}\n  - {name: a, test: u, evals: [zero-shot]}\n", "repeat"),
    ("datasets: []\n", "non-empty"),
    ("datasets: [\n", "not a readable suite file"),
])
def test_a_bad_suite_file_is_one_line(tmp_path, capsys, text, message):
    suite = write_suite(tmp_path / "bad.yaml", text)
    assert main(["eval", "suite", str(suite), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()
