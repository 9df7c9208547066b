"""I-JEPA: multi-block masks, the EMA target encoder, resume with masks, collapse monitors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vitpipe.cli import main
from vitpipe.ssl import registry
from vitpipe.ssl.engine.checkpoints import list_checkpoints
from vitpipe.ssl.masking import MultiBlockMasks
from vitpipe.ssl.engine.optim import build as build_optimizer
from vitpipe.ssl.engine.trainer import Trainer

ARGS = ["model.size=micro", "data.image_size=32", "train.batch_size=8", "train.log_every=1", "data.num_workers=0",
        "data.shuffle_buffer=10", "train.tensorboard=false", "jepa.predictor_dim=32", "jepa.predictor_depth=1",
        "jepa.predictor_heads=2"]


@pytest.mark.parametrize("grid", [8, 14])
def test_masks_keep_targets_out_of_the_context_and_sizes_in_bounds(grid):
    masks = MultiBlockMasks((grid, grid))
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch = masks({"image": torch.zeros(6, 3, 1, 1)}, generator)
        context, targets = batch["context_idx"], batch["target_idx"]
        assert context.shape[0] == targets.shape[0] == 6 and targets.shape[1] == 4
        for image in range(6):
            chosen = set(context[image].tolist())
            assert len(chosen) == context.shape[1] >= masks.min_keep  # no duplicates, a common length
            for block in targets[image]:
                assert not chosen & set(block.tolist())
                rows = {i // grid for i in block.tolist()}
                cols = {i % grid for i in block.tolist()}
                assert len(rows) * len(cols) == len(block)  # a rectangle
                # rounding a block to whole patches moves its scale by at most one row or column
                assert 0.15 * grid * grid - grid <= len(block) <= 0.2 * grid * grid + grid


def test_context_block_positions_cover_the_whole_grid_on_small_grids():
    """The official sampler's randint(0, grid - size) never reaches the last row or column."""
    masks = MultiBlockMasks((8, 8), num_targets=1, target_scale=(0.05, 0.05))
    generator = torch.Generator().manual_seed(1)
    corners = set()
    seen = torch.zeros(64, dtype=torch.bool)
    for _ in range(200):
        size = masks.block_size(masks.context_scale, (1.0, 1.0), generator)
        block = masks.place(size, generator)
        seen |= block.flatten()
        rows, cols = block.nonzero().min(dim=0).values.tolist()
        corners.add((rows, cols))
    assert seen.all() and len(corners) > 1 and (0, 0) in corners


@pytest.mark.parametrize("override", [["jepa.target_scale=[0.5,0.5]"], ["jepa.min_keep=40"]])
def test_settings_the_grid_cannot_meet_are_a_config_error(override, tiny_shards, tmp_path, capsys):
    start = time.monotonic()
    code = main(["pretrain", "jepa", "--data", str(tiny_shards), "--out", str(tmp_path / "run"), *ARGS,
                 "data.image_size=16", *override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "jepa" in err[0] and time.monotonic() - start < 30


def test_target_encoder_is_an_ema_with_no_gradient():
    config = registry.pretrain_config("jepa", None, [*ARGS, "train.max_steps=10"])
    torch.manual_seed(0)
    jepa = registry.build_objective(config)
    optimizer, *_ = build_optimizer(jepa, config, 8)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in jepa.target_encoder.parameters())
    batch = jepa.batch_hook()({"image": torch.randn(8, 3, 32, 32)}, torch.Generator().manual_seed(0))
    old = {n: p.clone() for n, p in jepa.target_encoder.named_parameters()}
    jepa(batch).loss.backward()
    assert all(p.grad is None for p in jepa.target_encoder.parameters())
    optimizer.step()
    jepa.on_step_end(3, 10)
    m = 0.996 + (1.0 - 0.996) * 3 / 10
    online = dict(jepa.backbone.named_parameters())
    for name, param in jepa.target_encoder.named_parameters():
        assert torch.allclose(param, m * old[name] + (1 - m) * online[name], atol=1e-6), name
    assert jepa.momentum.item() == pytest.approx(m)
    assert jepa.encoder() is jepa.target_encoder


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_sigterm_and_resume_give_the_same_losses_masks_included(tiny_shards, tmp_path):
    extra = ["train.max_steps=40", "train.ckpt_every_steps=5", "train.seed=4"]
    reference = tmp_path / "reference"
    assert main(["pretrain", "jepa", "--data", str(tiny_shards), "--out", str(reference), *ARGS, *extra]) == 0
    run = tmp_path / "run"
    command = [sys.executable, "-m", "vitpipe", "pretrain", "jepa", "--data", str(tiny_shards), "--out", str(run),
               "--resume", "auto", *ARGS, *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 8):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    assert len(losses(run)) < 40
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == pytest.approx(losses(reference), abs=1e-6)
    state = load_file(list_checkpoints(run)[-1] / "model.safetensors")
    encoder = load_file(run / "encoder.safetensors")
    assert all(torch.equal(encoder[k], state[f"target_encoder.{k}"]) for k in encoder)  # eval = the EMA encoder
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the momentum a step's forward saw (set after step 39), and the weight decay after the last step
    assert records[-1]["ema_momentum"] == pytest.approx(0.996 + 0.004 * 39 / 40)
    assert records[-1]["weight_decay"] == pytest.approx(0.4)


def test_collapse_is_visible_in_the_logs(tiny_shards, tmp_path, capsys):
    """A target encoder whose output is constant: the loss is happy, the monitor is not."""
    def collapsed(config, artifacts):
        jepa = registry.build_objective(config, artifacts)
        for encoder in (jepa.backbone, jepa.target_encoder):
            torch.nn.init.zeros_(encoder.norm.weight)
        return jepa

    config = registry.pretrain_config("jepa", None, [*ARGS, f"data.shards={tiny_shards}", "train.max_steps=4",
                                                     "train.health_every=2"])
    Trainer(config, tmp_path / "run", collapsed, progress=False).run()
    assert "may be collapsing" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "collapse"]
    assert [e["step"] for e in events] == [1, 2, 4] and events[0]["feature_std"] < 1e-6  # step 1: checked early
    healthy = tmp_path / "healthy"
    assert main(["pretrain", "jepa", "--data", str(tiny_shards), "--out", str(healthy), *ARGS, "train.max_steps=4",
                 "train.health_every=2"]) == 0
    logged = [json.loads(line) for line in (healthy / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in logged if r.get("event")] and logged[1]["effective_rank"] > 1.5
