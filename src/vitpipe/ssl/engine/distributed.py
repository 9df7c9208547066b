"""Collectives. An objective may call ``gather_with_grad``, ``gather_others``,
``is_first_process`` (a contrastive loss needs the global batch) and ``all_reduce_mean`` (DINO's
centre); ``sum_gradients`` is the trainer's. Each is the identity (or empty) on one process."""

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


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_first_process() -> bool:
    return _world() == 1 or dist.get_rank() == 0


@torch.no_grad()
def gather_others(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each process -> the other processes' [(world - 1) * B, ...], without gradient
    (a contrastive step's cached negatives); empty on one process."""
    if _world() == 1:
        return tensor[:0]
    parts = [torch.empty_like(tensor) for _ in range(_world())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([part for rank, part in enumerate(parts) if rank != dist.get_rank()], dim=0)


@torch.no_grad()
def sum_gradients(parameters) -> None:
    """All-reduce (sum) the gradients every process computed from its own samples' features, in one
    flat buffer; for losses whose gradient is the sum of the processes' parts (contrastive
    accumulation), where DDP's mean would be wrong by the world size. A parameter with a gradient
    on some processes only (the temperature, taken once) gets zeros on the others first."""
    trainable = [p for p in parameters if p.requires_grad]
    if _world() == 1 or not trainable:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    anywhere = torch.tensor([float(p.grad is not None) for p in trainable], device=trainable[0].device)
    dist.all_reduce(anywhere)
    grads = []
    for param, count in zip(trainable, anywhere.tolist()):
        if count and param.grad is None:
            param.grad = torch.zeros_like(param)
        if count:
            grads.append(param.grad)
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(summed)


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over processes (a new tensor; the same on every process), e.g. DINO's
    batch centre of the teacher outputs; ``tensor`` itself on one process."""
    if _world() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / _world()



@torch.no_grad()
def average_late_gradients(trainable: torch.nn.Module, synced: set[int]) -> None:
    """Average over processes the gradients DDP does not: of parameters not in ``synced`` (the ids
    DDP registered, those trainable when it wrapped the module) that have been unfrozen since. No
    collective on one process or when none was unfrozen (the same on every rank: freezing is the
    objective's deterministic choice)."""
    late = [p for p in trainable.parameters() if p.requires_grad and id(p) not in synced]
    if _world() == 1 or not late:
        return
    sum_gradients(late)
    for param in late:
        if param.grad is not None:
            param.grad.div_(_world())
