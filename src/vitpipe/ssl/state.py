"""What a training run carries from step to step (checkpointed) and what it reports at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Samples consumed by all processes together."""
    epoch: int = 0
    """Data epoch (drives shard order and shuffles)."""
    batches_in_epoch: int = 0
    """Micro-batches of this epoch already consumed (per process): the data position."""
    wall_seconds: float = 0.0
    """Training time accumulated over all sessions of this run."""


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    final_loss: float | None
    seconds: float
    images_per_second: float
    checkpoint: Path | None
    resumed_from: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    is_main: bool = True
