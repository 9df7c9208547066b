"""train.grad_checkpointing: every objective's blocks recompute their activations, the gradients
stay those of the plain step (issue: past fp32 and one GPU's memory, item 3)."""

from __future__ import annotations

import json

import pytest
import torch

from test_models import SMALL_SECTIONS, synthetic_read, through_views
from vitpipe.ssl import registry
from vitpipe.ssl.registry import OBJECTIVES
from vitpipe.ssl.vit import Block, set_grad_checkpointing


def _gradients(name: str, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    spec = registry.get(name)
    config = registry.pretrain_config(name, None, ["model.size=micro", "data.image_size=16", "model.patch_size=4",
                                                   "model.drop_path=0.2", *SMALL_SECTIONS.get(name, [])])
    artifacts = spec.fit_artifacts(config, synthetic_read) if spec.fit_artifacts else {}
    torch.manual_seed(0)
    objective = registry.build_objective(config, artifacts).train()
    blocks = set_grad_checkpointing(objective, checkpointing)
    batch = {"image": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
             "label": torch.tensor([0, 1, 0, 1]), "text": ["a red", "b", "c blue", "d"], "key": ["k0", "k1", "k2", "k3"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # the same views for the plain and the checkpointed run
        batch = through_views(objective, config.data, batch)
    hook = objective.batch_hook()
    if hook is not None:
        batch = hook(batch, torch.Generator().manual_seed(0))
    torch.manual_seed(2)  # drop path draws
    loss = objective(batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}, blocks


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_checkpointed_blocks_give_the_same_loss_and_gradients(name):
    plain_loss, plain, blocks = _gradients(name, False)
    loss, grads, _ = _gradients(name, True)
    assert blocks >= 1
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain.keys()
    for key, grad in grads.items():
        assert torch.allclose(grad, plain[key], atol=1e-6), key


def test_checkpointing_keeps_fewer_activations():
    """Saved tensors of the autograd graph, counted with saved_tensors_hooks: the checkpointed
    step keeps only each block's input."""
    from torch.autograd.graph import saved_tensors_hooks

    def saved_bytes(checkpointing: bool) -> int:
        config = registry.pretrain_config("mae", None, ["model.size=micro", "data.image_size=32", "model.patch_size=4",
                                                        *SMALL_SECTIONS["mae"]])
        objective = registry.build_objective(config, {}).train()
        set_grad_checkpointing(objective, checkpointing)
        batch = objective.batch_hook()({"image": torch.randn(8, 3, 32, 32)}, torch.Generator().manual_seed(0)) \
            if objective.batch_hook() is not None else {"image": torch.randn(8, 3, 32, 32)}
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with saved_tensors_hooks(pack, lambda tensor: tensor):
            objective(batch).loss.backward()
        return total[0]

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_the_setting_reaches_a_real_run_and_may_change_on_resume(tiny_shards, tmp_path):
    from vitpipe.cli import main

    args = ["pretrain", "mae", "--data", str(tiny_shards), "--out", str(tmp_path / "run"), "model.size=micro",
            "data.image_size=16", "train.batch_size=8", "data.num_workers=0", "train.tensorboard=false",
            *SMALL_SECTIONS["mae"]]
    assert main([*args, "train.max_steps=2", "train.grad_checkpointing=true"]) == 0
    assert main([*args, "train.max_steps=3", "--resume", "auto"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert Block.checkpointing is False  # a class default never switched on for everyone
