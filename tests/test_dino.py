"""DINO: multi-crop views from the loader (deterministic per data position, with workers), the
loss's pairs, centring, the frozen last layer, the EMA teacher and temperature schedules, collapse
monitors, and the whole CLI path (pretrain -> resume -> knn -> export of the teacher)."""

from __future__ import annotations

import json

import pytest
import torch

from test_models import SMALL_SECTIONS
from vitpipe.cli import main
from vitpipe.config import ConfigError
from vitpipe.pipeline.loader import LoaderSpec, make_loader
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.pipeline.transforms import TransformSpec
from vitpipe.ssl import registry
from vitpipe.ssl.objectives.dino.objective import DINOConfig, dino_loss, local_size
from vitpipe.ssl.engine.precision import synthetic_batch

SMALL = ["model.size=micro", "data.image_size=16", "model.patch_size=4", *SMALL_SECTIONS["dino"]]
RUN = [*SMALL, "train.batch_size=8", "train.log_every=1", "data.num_workers=0", "data.shuffle_buffer=10",
       "train.tensorboard=false"]


def build(*extra: str):
    config = registry.pretrain_config("dino", None, [*SMALL, *extra])
    torch.manual_seed(0)
    return registry.build_objective(config, {}), config


def test_views_come_from_the_loader_per_data_position_with_workers(labelled_shards):
    objective, config = build("dino.local_crops=3")
    views = objective.views(config.data)
    spec = LoaderSpec(resolve_shards(str(labelled_shards / "train")), 4, TransformSpec("mae", 16), train=True,
                      seed=1, shuffle_buffer=4, views=views)
    batches = []
    for _ in range(2):
        _, loader = make_loader(spec, 2)
        batches.append([b["image"] for b, _ in zip(loader, range(2))])
    first = batches[0][0]
    assert [tuple(v.shape) for v in first] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert all(torch.equal(a, b) for x, y in zip(*batches) for a, b in zip(x, y))  # same position, same views
    assert not torch.equal(first[0], first[1])  # two different global crops of one image
    assert local_size(DINOConfig(), 224, 16) == 96 and local_size(DINOConfig(), 32, 4) == 12


def test_augmentations_are_keys_of_the_dino_section():
    """Every random step off (and whole-image crops): both global views are the resized image itself;
    solarisation certain: view 2 is the first view solarised (bright pixels inverted)."""
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    off = ["dino.color_jitter=0", "dino.grayscale=0", "dino.blur=[0,0,0]", "dino.solarize=0", "dino.hflip=false",
           "dino.global_scale=[1,1]", "dino.local_crops=1"]
    objective, config = build(*off)
    plain = objective.views(config.data)(image)
    assert torch.allclose(plain[0], plain[1]) and [tuple(v.shape) for v in plain] == [(3, 16, 16)] * 2 + [(3, 8, 8)]
    objective, config = build(*off[:3], "dino.solarize=1", *off[4:])
    views = objective.views(config.data)(image)
    mean, std = torch.tensor(config.data.mean)[:, None, None], torch.tensor(config.data.std)[:, None, None]
    pixels = [(v * std + mean) * 255 for v in views[:2]]
    bright = image >= 128
    assert torch.allclose(pixels[0], image.float(), atol=1e-3)
    assert torch.allclose(pixels[1][bright], 255 - image[bright].float(), atol=1e-3)
    assert torch.allclose(pixels[1][~bright], image[~bright].float(), atol=1e-3)
    with pytest.raises(ConfigError, match="dino.blur"):
        build("dino.blur=[1,0.1]")


def test_loss_pairs_every_teacher_view_with_every_other_student_view():
    torch.manual_seed(0)
    student = [torch.randn(3, 5) for _ in range(4)]
    teacher = [torch.softmax(torch.randn(3, 5), dim=-1) for _ in range(2)]
    expected = [-(t * torch.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()
                for i, t in enumerate(teacher) for j, s in enumerate(student) if i != j]
    assert dino_loss(student, teacher, 0.1).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    assert len(expected) == 6  # 2 teacher views x 3 other student views


def test_centre_frozen_last_layer_and_schedules():
    objective, config = build("dino.freeze_last_layer_fraction=0.5", "dino.center_momentum=0.9")
    batch = synthetic_batch(objective, config.data, 4)
    output = objective(batch)
    teacher = objective.teacher_head(objective.teacher(torch.cat(batch["image"][:2])))
    assert torch.allclose(objective.center, 0.1 * teacher.mean(dim=0, keepdim=True), atol=1e-6)
    output.loss.backward()
    objective.after_backward(step=5, max_steps=10)  # within the first half: no update of the last layer
    assert objective.head.last_layer.grad is None and objective.head.mlp[0].weight.grad is not None
    objective.after_backward(step=6, max_steps=10)  # after it: kept
    assert objective.head.mlp[0].weight.grad is not None
    before = objective.teacher.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        objective.backbone.blocks[0].attn.qkv.weight.add_(1.0)
    objective.on_step_end(0, 100)
    assert float(objective.momentum) == pytest.approx(0.996)
    assert torch.allclose(objective.teacher.blocks[0].attn.qkv.weight, before + 0.004, atol=1e-5)
    objective.on_step_end(100, 100)
    assert float(objective.momentum) == pytest.approx(1.0) and float(objective.teacher_temp) == pytest.approx(0.07)
    objective.on_step_end(15, 100)  # halfway through the 30% warm-up
    assert float(objective.teacher_temp) == pytest.approx(0.055)


def test_collapse_monitors_read_uniform_and_one_hot_teachers():
    objective, _ = build()
    k = objective.config.out_dim
    uniform = objective.health(torch.full((4, k), 1 / k))
    assert uniform["teacher_entropy"].item() == pytest.approx(torch.log(torch.tensor(float(k))).item(), rel=1e-4)
    assert uniform["teacher_kl_to_uniform"].item() == pytest.approx(0, abs=1e-4)
    one_hot = objective.health(torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), k).float())
    assert one_hot["teacher_entropy"].item() == pytest.approx(0, abs=1e-4)
    assert one_hot["teacher_kl_to_uniform"].item() == pytest.approx(torch.log(torch.tensor(float(k))).item(), rel=1e-4)


def test_koleo_is_an_option_that_reaches_the_loss():
    plain, config = build()
    spread, _ = build("dino.koleo=0.1")
    batch = synthetic_batch(plain, config.data, 4)
    assert "koleo" not in plain(batch).metrics
    output = spread(batch)
    assert output.metrics["koleo"].item() != 0 and torch.isfinite(output.loss)


def test_dino_through_the_cli(labelled_shards, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "dino", "--data", str(labelled_shards / "train"), "--out", str(run), *RUN,
            "train.ckpt_every_steps=2"]
    assert main([*args, "train.max_steps=3", "data.num_workers=1"]) == 0
    assert main([*args, "train.max_steps=5", "--resume", "auto"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(0 <= r["teacher_entropy"] and 0 <= r["teacher_kl_to_uniform"] for r in steps)
    assert steps[0]["teacher_temp"] == pytest.approx(0.04) and steps[-1]["teacher_temp"] > 0.04
    common = ["--test", str(labelled_shards / "val"), "--workers", "0", "--max-contamination", "1"]
    assert main(["eval", "knn", str(run), "--train", str(labelled_shards / "train"), *common]) == 0
    assert main(["compare", str(run), "--train", str(labelled_shards / "train"), *common, "--out", str(tmp_path / "cmp"),
                 "--suite", "knn"]) == 0  # its cost is counted on a step of its own views
    row = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"][0]
    assert row["objective"] == "dino" and row["cost"]["flops_per_sample"] > 0
    assert main(["export", str(run), "--format", "timm", "--out", str(tmp_path / "export")]) == 0
    from safetensors.torch import load_file

    from vitpipe.ssl.runs import load_run_objective

    exported = load_file(tmp_path / "export" / "model.safetensors")
    teacher = load_run_objective(run).teacher.state_dict()
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])  # the teacher


def test_collapse_is_warned_after_the_warm_up(capsys):
    from vitpipe.ssl.objectives.dino.objective import COLLAPSE_EVERY, collapse_warning

    objective, _ = build()
    k = objective.config.out_dim
    assert "near uniform" in collapse_warning(objective.health(torch.full((4, k), 1 / k)), k)
    one_hot = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), k).float()
    assert "same prototype" in collapse_warning(objective.health(one_hot), k)
    spread = torch.nn.functional.one_hot(torch.arange(4), k).float() * 0.9 + 0.1 / k
    assert collapse_warning(objective.health(spread), k) is None
    object.__setattr__(objective, "last_health", objective.health(torch.full((4, k), 1 / k)))
    objective.on_step_end(COLLAPSE_EVERY, 10 * COLLAPSE_EVERY)  # still warming the teacher temperature up
    assert "near uniform" not in capsys.readouterr().err
    objective.on_step_end(4 * COLLAPSE_EVERY, 10 * COLLAPSE_EVERY)
    assert f"warning: step {4 * COLLAPSE_EVERY}: DINO's teacher output is near uniform" in capsys.readouterr().err


def test_a_local_size_off_the_patch_grid_is_refused_at_build():
    from vitpipe.config import ConfigError

    with pytest.raises(ConfigError, match="dino.local_size=10 must be a multiple of model.patch_size=4"):
        build("dino.local_size=10")


def test_one_prototype_is_refused():
    """dino.out_dim=1 trained with a loss of exactly 0 at every step (a softmax over one value)."""
    from vitpipe.config import ConfigError

    with pytest.raises(ConfigError, match="dino.out_dim must be >= 2"):
        build("dino.out_dim=1")
