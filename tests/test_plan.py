"""`vitpipe plan`: the per-sample activation count is a per-sample fact (measured at batch 4 and 8,
it predicts batch 16 within 15%) for three model sizes; checkpointing keeps less; FSDP divides
the state; the CLI answers in one screen and refuses what it cannot plan."""

from __future__ import annotations

import pytest

from vitpipe.cli import main
from vitpipe.ssl import registry
from vitpipe.ssl.engine.plan import MEASURE_BATCH, plan_for, saved_bytes
from vitpipe.ssl.engine.precision import synthetic_batch


@pytest.mark.parametrize("size", ["micro", "mini", "tiny"])
def test_activations_per_sample_predict_a_larger_batch_within_15_percent(size):
    overrides = [f"model.size={size}", "data.image_size=32", "model.patch_size=4"]
    plan = plan_for("mae", None, overrides, gpus=8, gpu="h100", memory_gb=None, mfu=0.4)
    config = registry.pretrain_config("mae", None, overrides)
    objective = registry.build_objective(config, {}).train()
    measured, _ = saved_bytes(objective, synthetic_batch(objective, config.data, 16), "bf16")
    predicted = (plan.activations_mb_per_sample["plain"] * 16 + plan.activations_mb_per_step["plain"]) * 1e6
    assert abs(predicted - measured) / measured < 0.15, (size, predicted, measured)
    assert plan.activations_mb_per_sample["checkpointed"] < plan.activations_mb_per_sample["plain"]
    assert plan.state_gb_per_gpu["fsdp"] == pytest.approx(plan.state_gb_per_gpu["ddp"] / 8, abs=1e-3)
    assert plan.max_batch_per_gpu["ddp+checkpointing"] > plan.max_batch_per_gpu["ddp"] > 0
    assert max(MEASURE_BATCH) < 16


def test_plan_cli_and_its_refusals(capsys):
    assert main(["plan", "mae", "--gpus", "8", "--gpu", "h100", "model.size=micro", "data.image_size=32"]) == 0
    out = capsys.readouterr().out
    assert "M parameters" in out and "largest batch per GPU" in out and "MFU" in out
    assert "train.batch_size=" in out and "fits with: ddp" in out
    assert main(["plan", "clip", "--memory-gb", "24", "model.size=micro", "data.image_size=32"]) == 0
    capsys.readouterr()
    # 1 MB holds no batch of anything: the user is told, not shown a row of zeros alone
    assert main(["plan", "mae", "--memory-gb", "0.001", "model.size=micro", "data.image_size=32"]) == 0
    assert "fits with none of these" in capsys.readouterr().out
    for args, words in ((["plan", "mae"], "--gpu NAME or --memory-gb"), (["plan", "mae", "--gpu", "tpu"], "unknown --gpu"),
                        (["plan", "mae", "--gpu", "h100", "--gpus", "0"], "--gpus must be"),
                        (["plan", "mae", "--memory-gb", "-3"], "--memory-gb must be > 0"),
                        (["plan", "mae", "--memory-gb", "0"], "--memory-gb must be > 0")):
        capsys.readouterr()
        assert main(args) == 2
        assert words in capsys.readouterr().err
