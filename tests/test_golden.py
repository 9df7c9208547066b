"""MAE's per-step losses are pinned: a refactor of the platform must not change what MAE computes.

The losses were recorded by tests/data/golden/record.py (before the objective-platform refactor)
on the shards committed beside it.
"""

import json
from pathlib import Path

import pytest

from vitpipe.cli import main

GOLDEN = Path(__file__).parent / "data" / "golden"


ARGS = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
        "mae.decoder_depth=1", "train.batch_size=8", "train.log_every=1", "data.num_workers=0",
        "data.shuffle_buffer=10", "train.tensorboard=false", "train.max_steps=12", "train.seed=5"]


def test_mae_losses_match_the_recorded_run(tmp_path):
    expected = json.loads((GOLDEN / "mae_losses.json").read_text())
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(GOLDEN / "shards"), "--out", str(run), *ARGS]) == 0
    got = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(expected, abs=1e-5)
