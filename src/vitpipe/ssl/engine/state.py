"""What a training run carries from step to step (checkpointed) and what it reports at the end."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitpipe.ssl.engine.launch import StopFlag

if TYPE_CHECKING:
    from vitpipe.pipeline.loader import ShardDataset
    from vitpipe.ssl.objective import Objective
    from vitpipe.ssl.engine.rundir import JsonLines


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


@dataclass
class Session:
    """Everything one process's loop holds, built by ``Trainer._setup`` (ssl/engine/trainer.py)."""

    accelerator: Any
    model: Any
    """What the step calls: the wrapped objective, or the objective whose trainable module is bound."""
    wrapped: Any
    """The trainable module as compiled / wrapped for DDP (gradient sync, clipping)."""
    synced: set[int]
    """Ids of the parameters DDP syncs (trainable when wrapped); others unfrozen later are averaged here."""
    objective: Objective
    """The plain module (state dicts, ``on_step_end``, the encoder)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: ShardDataset
    loader: Any
    state: TrainState
    global_batch: int
    resumed_from: int | None
    metrics: JsonLines | None = None
    audit: JsonLines | None = None
    stop: StopFlag = field(default_factory=StopFlag)
    bar: Any = None
    session_start: float = field(default_factory=time.monotonic)
    wall_before: float = 0.0
    """Training seconds of earlier sessions of this run."""
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    last_log: tuple[float, int] = (0.0, 0)
    last_checkpoint: Path | None = None
    last_loss: float | None = None
    decode_errors: int = 0
    damaged_shards: set[str] = field(default_factory=set)
    sharded: bool = False
    """FSDP2 (``train.fsdp`` on more than one process): the objective's parameters are DTensors."""
    skipped_in_a_row: int = 0
    weight_decay: float | None = None
    images: torch.Tensor | None = None
    """The last micro-batch's images (a reference, for the health monitor)."""
    auto_compile: Any = None
    """`train.compile=auto` still timing this session's steps (ssl/engine/compiling.AutoCompile)."""

    def use(self, module: Any) -> None:
        """Step through ``module`` (the trainable module as wrapped, compiled or not) from now on."""
        if self.model is self.wrapped:
            self.model = module
        else:
            self.objective.bind_trainable(module)
        self.wrapped = module

    def count_losses(self, batch: dict[str, Any]) -> None:
        """Take the loader's bookkeeping off a batch: samples skipped and damaged shards add to
        ``decode_errors``; each damaged shard is said on stderr once a run (every pass counts)."""
        damaged = batch.pop("shard_errors")
        self.decode_errors += sum(batch.pop("skipped").values()) + len(damaged)
        for problem in set(damaged) - self.damaged_shards:
            print(f"warning: damaged shard, its later samples skipped: {problem}", file=sys.stderr)
        self.damaged_shards.update(damaged)
