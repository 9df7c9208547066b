"""AdamW with vitpipe's parameter groups and schedules (learning rate, weight decay)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitpipe.config import PretrainConfig
from vitpipe.ssl.objective import Objective
from vitpipe.ssl.engine.schedules import warmup_cosine


def param_groups(model: Objective, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """Every parameter of the objective's trainable module, frozen ones too (AdamW skips a parameter
    without a gradient, so one unfrozen later trains from then on). No decay for norms, biases (1-D
    parameters), position embeddings and tokens; per-parameter learning-rate scales from the
    objective (layer-wise decay) become separate groups. Names are the objective's own."""
    skip = model.no_weight_decay()
    trainable = {id(p) for p in model.trainable_module().parameters()}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if id(param) not in trainable:
            continue
        decay = not (param.ndim <= 1 or name in skip or name.endswith("token"))
        groups.setdefault((decay, model.lr_scale(name)), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale, "decay": decay}
            for (decay, scale), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))]


def with_frozen(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict written when the groups held only the parameters trainable at build
    time (checkpoints before frozen parameters joined them, 2026-12-04), re-indexed onto today's
    groups: each saved entry goes to its parameter, a frozen one enters with no state. A state dict
    of today's shape, or one this does not describe, is returned unchanged (loading it says why)."""
    old_groups, groups = saved["param_groups"], optimizer.param_groups
    if len(old_groups) != len(groups) or all(len(o["params"]) == len(g["params"]) for o, g in zip(old_groups, groups)):
        return saved
    start, state, new_groups = 0, {}, []
    for old, group in zip(old_groups, groups):
        live = [i for i, param in enumerate(group["params"]) if param.requires_grad]
        if len(live) != len(old["params"]):
            return saved
        ids = list(range(start, start + len(group["params"])))
        state.update({ids[i]: saved["state"][old_id] for i, old_id in zip(live, old["params"]) if old_id in saved["state"]})
        new_groups.append({**old, "params": ids})
        start += len(ids)
    return {"state": state, "param_groups": new_groups}


def peak_lr(config: PretrainConfig, global_batch: int) -> float:
    return config.optim.lr or config.optim.base_lr * global_batch / 256


def warmup_steps(config: PretrainConfig) -> int:
    return config.optim.warmup_steps or int(config.optim.warmup_fraction * config.train.max_steps)


def build(model: Objective, config: PretrainConfig, global_batch: int):
    """(AdamW, its LambdaLR warmup+cosine scheduler, peak lr, warmup steps). AdamW is torch's fused
    kernel: on a CPU torch's default is a per-parameter loop, 4-6x slower on ViT-B/16 MAE's 112M
    parameters (0.32-0.38 vs 0.07 s a step; benchmarks/adamw_step.py). A checkpoint's optimizer state keeps
    the implementation it was written with (torch's load_state_dict restores the group settings),
    so a run resumed from an older, unfused checkpoint steps as it did before."""
    optim, max_steps = config.optim, config.train.max_steps
    lr, warmup = peak_lr(config, global_batch), warmup_steps(config)
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay, lr), lr=lr, betas=tuple(optim.betas),
                                  eps=optim.eps, fused=True)
    min_ratio = optim.min_lr / lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, max_steps, warmup, 1.0, min_ratio))
    return optimizer, scheduler, lr, warmup


def update_weight_decay(optimizer: torch.optim.Optimizer, config: PretrainConfig, step: int) -> float | None:
    """Set the decaying groups' weight decay for ``step`` when it is scheduled; return it."""
    optim = config.optim
    if optim.weight_decay_end is None:
        return None
    value = warmup_cosine(step, config.train.max_steps, 0, optim.weight_decay, optim.weight_decay_end)
    for group in optimizer.param_groups:
        if group.get("decay"):
            group["weight_decay"] = value
    return value
