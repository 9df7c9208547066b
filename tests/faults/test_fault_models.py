"""What "locked" and "EMA" promise of a tower, health checked early, running totals
(issue: faults in the new features, items 3, 12, 14)."""

from __future__ import annotations

import json

import pytest
import torch

from vitpipe.ssl import registry
from vitpipe.ssl.objectives.clip.objective import fit_artifacts

CLIP_ARGS = ["model.size=micro", "data.image_size=16", "clip.vocab_size=300", "clip.text_width=32",
             "clip.text_depth=1", "clip.text_heads=2", "clip.embed_dim=32", "clip.context_length=4"]


def _clip(*overrides: str):
    config = registry.pretrain_config("clip", None, [*CLIP_ARGS, *overrides])
    read = lambda fields, limit: iter([{"text": ["red square", "green square", "blue square"] * 20}])  # noqa: E731
    torch.manual_seed(0)
    return registry.build_objective(config, fit_artifacts(config, read))


def _train_steps(objective, steps: int = 3) -> None:
    objective.train()
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        batch = objective.tokenize({"image": torch.randn(4, 3, 16, 16) * 3 + step,
                                    "text": ["red square", "a blue square on green", "green", "blue"]}, None)
        objective(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("stem,pool,extra", [
    ("true", "gap", []), ("true", "cls", []), ("true", "map", []), ("false", "cls", []),
    ("true", "gap", ["model.drop_path=0.3"]),
])
def test_a_locked_image_tower_is_bit_identical_after_training(stem, pool, extra):
    objective = _clip("clip.lock_image=true", f"model.conv_stem={stem}", f"model.pool={pool}", *extra)
    before = {k: v.clone() for k, v in objective.backbone.state_dict().items()}
    _train_steps(objective)
    after = objective.backbone.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"locked tower moved: {name}"
    assert not objective.backbone.training and objective.text.training


def test_partly_unlocked_tower_trains_its_last_blocks_only_and_keeps_the_stem_still():
    objective = _clip("clip.lock_image=true", "clip.unlocked_blocks=1", "model.conv_stem=true")
    before = {k: v.clone() for k, v in objective.backbone.state_dict().items()}
    _train_steps(objective)
    after = objective.backbone.state_dict()
    last = f"blocks.{len(objective.backbone.blocks) - 1}."
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.startswith((last, "norm.")) for name in moved), moved
    assert objective.backbone.blocks[-1].training and not objective.backbone.patch_embed.training


def test_jepa_ema_covers_the_target_encoders_batchnorm_statistics():
    config = registry.pretrain_config("jepa", None, ["model.size=micro", "data.image_size=16", "model.conv_stem=true",
                                                     "jepa.predictor_depth=1"])
    objective = registry.build_objective(config, {})
    stats = {name: buffer for name, buffer in objective.backbone.named_buffers() if "running_" in name}
    assert stats, "the conv stem has BatchNorm statistics"
    objective.backbone.train()
    objective.backbone(torch.randn(8, 3, 16, 16) * 4 + 2)  # moves the online encoder's statistics
    target = dict(objective.target_encoder.named_buffers())
    initial = {name: target[name].clone() for name in stats}
    objective.on_step_end(1, 2)
    momentum = objective.momentum.item()
    for name, online in stats.items():
        expected = momentum * initial[name] + (1 - momentum) * online
        assert not torch.equal(target[name], initial[name]), name
        assert torch.allclose(target[name], expected.to(target[name].dtype), atol=1e-6), name


def test_captions_truncated_is_a_running_total():
    objective = _clip()
    _train_steps(objective, steps=3)  # one caption of four is longer than 4 tokens, every step
    batch = objective.tokenize({"image": torch.randn(2, 3, 16, 16), "text": ["red", "blue"]}, None)
    assert objective(batch).metrics["captions_truncated"] == 3.0


def test_health_is_logged_at_step_one_of_a_short_run(tmp_path, tiny_shards):
    from vitpipe.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), "model.size=micro",
                 "data.image_size=16", "train.batch_size=8", "train.max_steps=3", "train.log_every=10",
                 "data.num_workers=0", "train.tensorboard=false", "mae.decoder_dim=32", "mae.decoder_heads=2",
                 "mae.decoder_depth=1"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    assert first["step"] == 1 and "feature_std" in first, first
