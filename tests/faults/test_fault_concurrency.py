"""Two evals of one run at once, and an eval of a run that is still training
(issue: faults in the new features, items 5 and 6)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import write_image_folder
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest
from vitpipe.ssl.engine import checkpoints

RUN_ARGS = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
            "mae.decoder_depth=1", "train.batch_size=8", "data.num_workers=0", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    folder = write_image_folder(root / "imgs", per_class=150, classes=("a", "b"))
    ingest(str(folder), root / "shards", IngestConfig(shard_size=50, val_fraction=0.3, image_size=16), progress=False)
    assert main(["pretrain", "mae", "--data", str(root / "shards" / "train"), "--out", str(root / "run"), *RUN_ARGS,
                 "train.max_steps=4", "train.ckpt_every_steps=1", "train.keep_checkpoints=2"]) == 0
    return root


SLOW_WRITER = """
import time
from vitpipe.downstream import featurestore
add = featurestore.PartWriter.add
def slow_add(self, *args, **kwargs):
    time.sleep(2)
    add(self, *args, **kwargs)
featurestore.PartWriter.add = slow_add
"""


def _eval_knn(world, run, patch: str = "") -> subprocess.Popen:
    code = (patch + "\nimport sys\nfrom vitpipe.cli import main\nsys.exit(main(['eval', 'knn', %r, '--train', %r,"
            " '--test', %r, '--workers', '1']))" % (str(run), str(world / "shards" / "train"), str(world / "shards" / "val")))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_evals_of_one_run_at_once_both_report_the_same_number(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)  # its own feature cache, empty
    first = _eval_knn(world, run, SLOW_WRITER)  # still writing its parts when the second one is done reading
    time.sleep(4)
    second = _eval_knn(world, run)
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    for process, (out, err) in zip((first, second), outputs):
        assert process.returncode == 0, err
        assert "Traceback" not in err
    numbers = [re.findall(r"top1 k=\d+\s+\S+\s+([0-9.]+)", out) or re.findall(r"([0-9]\.[0-9]{4})", out)
               for out, _ in outputs]
    assert numbers[0] and numbers[0] == numbers[1], outputs
    assert not list((run / "eval" / "cache").glob("*.parts/*")), "parts left behind"


def test_a_run_still_training_is_scored_at_a_step_that_is_said(world, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    (run / "encoder.safetensors").unlink()  # as a run looks before its end
    assert main(["eval", "knn", str(run), "--train", str(world / "shards" / "train"),
                 "--test", str(world / "shards" / "val"), "--workers", "0"]) == 0
    assert "scoring the checkpoint of step 4 of 4" in capsys.readouterr().err
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert result["provenance"]["step"] == 4


def test_pruning_never_deletes_a_checkpoint_an_eval_is_reading(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    (run / "encoder.safetensors").unlink()
    newest = checkpoints.list_checkpoints(run)[-1]
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom vitpipe.downstream.features import EncoderSource\n"
        f"source = EncoderSource.resolve({str(run)!r})\nprint(source.step, flush=True)\ntime.sleep(60)")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "4"
        assert checkpoints.prune(newest) is False and (newest / "model.safetensors").is_file()
        older = checkpoints.list_checkpoints(run)[0]
        assert checkpoints.prune(older) is True and not older.exists()  # unpinned ones still go
    finally:
        reader.kill()
        reader.wait()
    deadline = time.monotonic() + 10
    while not checkpoints.prune(newest):  # the reader's lock died with it
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not newest.exists()
