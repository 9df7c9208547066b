"""Per-step schedules (learning rate, weight decay, EMA momentum, probe heads): one formula."""

from __future__ import annotations

import math


def warmup_cosine(step: int, max_steps: int, warmup: int = 0, start: float = 1.0, end: float = 0.0) -> float:
    """Linear warmup to ``start`` over ``warmup`` steps (step i gives start * (i + 1) / warmup), then
    a cosine from ``start`` to ``end`` at ``max_steps``. Step counts are 0-based optimizer steps."""
    if step < warmup:
        return start * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def linear(step: int, max_steps: int, start: float, end: float) -> float:
    """From ``start`` at step 0 to ``end`` at ``max_steps`` (held there after)."""
    return start + (end - start) * min(1.0, step / max(1, max_steps))
