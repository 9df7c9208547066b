"""The one distributed helper an objective may call (a contrastive loss needs the global batch)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each process -> [world * B, ...] in rank order, with gradients flowing back to
    every process's own slice (torch.distributed.nn's differentiable all_gather). On one process,
    or without an initialised process group, it returns ``tensor`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)
