"""The EMA teacher several objectives keep (I-JEPA's target encoder, DINO's teacher)."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, for parameters and floating buffers alike (a
    conv stem's BatchNorm statistics are the teacher's too: eval and export use it); integer
    buffers (batch counts) are copied. Both modules must have the same names."""
    online = dict(student.named_parameters()) | dict(student.named_buffers())
    for name, target in [*teacher.named_parameters(), *teacher.named_buffers()]:
        if target.is_floating_point():
            target.mul_(momentum).add_(online[name].detach(), alpha=1 - momentum)
        else:
            target.copy_(online[name])


def cosine_momentum(step: int, max_steps: int, start: float, end: float) -> float:
    """DINO's schedule: ``start`` at step 0 rising along a half cosine to ``end`` at ``max_steps``."""
    progress = min(step / max(max_steps, 1), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2
