"""What every objective is to the trainer: an nn.Module with ``forward(batch) -> Output``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from vitpipe.ssl.vit import VisionTransformer


@dataclass
class Output:
    loss: torch.Tensor
    """Scalar to minimise."""
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    """Extra scalars to log (detached by the trainer)."""


class Objective(nn.Module):
    """Base class. Subclasses set the class attributes and implement ``forward``.

    They never touch devices, files, loggers or distributed state: the trainer does.
    """

    transform_preset: str = "mae"
    """Loader augmentation preset (see vitpipe.pipeline.transforms)."""
    batch_fields: tuple[str, ...] = ("image",)
    """Fields the loader must put in each batch."""

    def forward(self, batch: dict[str, Any]) -> Output:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called after every optimizer step (e.g. EMA updates)."""

    def batch_hook(self) -> Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None:
        """Picklable function run in loader workers to add fields to a batch (e.g. masks)."""
        return None

    def encoder(self) -> VisionTransformer:
        """The backbone kept after pretraining (exported, evaluated)."""
        raise NotImplementedError

    def lr_scale(self, name: str) -> float:
        """Multiplier of the learning rate for parameter ``name`` (layer-wise decay)."""
        return 1.0

    def no_weight_decay(self) -> set[str]:
        """Parameter names (full dotted names) excluded from weight decay besides norms and biases."""
        return set()
