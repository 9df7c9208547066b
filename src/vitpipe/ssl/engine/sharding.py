"""FSDP2 (``train.fsdp``): parameters, gradients and optimizer state sharded over the processes.

``shard`` applies ``torch.distributed.fsdp.fully_shard`` to every transformer ``Block`` of the
objective (encoder, decoder, predictor, text tower; a teacher's too), then to the trainable module
and, when a teacher lives outside it, to each of the objective's other children that hold
parameters (the teacher's backbone and head: the objective is no FSDP unit, since its student
shares its attribute names). It must run before the optimizer is built: sharding replaces each
parameter by a DTensor holding this process's slice.

Checkpoints stay consolidated and in DDP's format: ``full_state_dict`` and
``full_optimizer_state`` gather every shard (collectives: all processes call them, in the same
order) into whole CPU tensors, keyed as an unsharded module and optimizer key them; ``load_model``
and ``load_optimizer`` cut this process's slice back out locally. So a checkpoint does not depend
on how it was sharded (the run's world size is still checked: the data position depends on it).
Every process gathers each tensor (all-gather), but only the writing process keeps the whole
copy in host memory; the others keep one finiteness flag per tensor (``keep=False``).

A teacher kept by EMA is sharded like its student (the same slices), so the update stays local.
Buffers (a conv stem's BatchNorm statistics, DINO's centre) are not sharded; ``build_sharded``
sends them from the first process once, not before every forward as DDP does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def refuse_unsupported(objective: nn.Module, config) -> None:
    """ConfigError for what FSDP cannot train here: an objective that sums its micro-batches'
    gradients itself (``accumulate``) with ``train.grad_accum`` > 1."""
    if config.train.grad_accum > 1 and objective.accumulates_step:
        from vitpipe.config import ConfigError

        raise ConfigError(f"train.fsdp with train.grad_accum > 1 is not supported for {config.objective} "
                          "(its accumulate() sums gradients itself); use DDP or grad_accum=1")


def shard(objective: nn.Module, trainable: nn.Module) -> None:
    """Shard ``objective`` in place; scalars (CLIP's temperature), which FSDP cannot shard, stay whole
    (``left_whole``)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from vitpipe.ssl.vit import Block

    scalars = {p for p in objective.parameters() if p.ndim == 0}
    for block in [module for module in objective.modules() if isinstance(module, Block)]:
        fully_shard(block, ignored_params=scalars)
    fully_shard(trainable, ignored_params=scalars)
    student = {id(p) for p in trainable.parameters()}  # after: sharding replaced them
    if trainable is not objective:
        for child in objective.children():
            if any(id(p) not in student for p in child.parameters()):
                # explicitly: a root unit would otherwise stay gathered after its forward for the
                # backward a teacher never has, and its EMA update works on the slices
                fully_shard(child, reshard_after_forward=True, ignored_params=scalars)
                if hasattr(child, "forward_features"):  # I-JEPA's target encoder is called so
                    register_fsdp_forward_method(child, "forward_features")


def left_whole(module: nn.Module) -> set[int]:
    """Ids of ``module``'s parameters sharding left whole: FSDP does not synchronise their gradients,
    they are the caller's to average. Read when needed: ``to_empty`` replaces such a parameter."""
    return {id(p) for p in module.parameters() if not isinstance(p, _dtensor())}


def build_sharded(build: Callable[[], nn.Module], first: bool, device: torch.device | str) -> tuple[nn.Module, set[int]]:
    """``build()`` sharded over the processes with only the first holding the whole model: it builds
    it as usual (its seed, its init), the others on the meta device (no memory), and each then
    receives its slices from the first, one tensor at a time. Every process ends with the values the
    first built, as if each had built it whole (DDP's start). Returns (objective, ``left_whole`` ids)."""
    if first:
        objective = build()
        source = dict(_tensors(objective))  # the whole tensors, before sharding replaces the parameters
    else:
        with torch.device("meta"):
            objective = build()
    shard(objective, objective.trainable_module())
    if not first:
        objective.to_empty(device=device)  # this process's slices (and whole buffers), not yet filled
    _receive_from_first(objective, source if first else None)
    return objective, left_whole(objective)


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers (non-persistent ones too: a meta build holds no sincos table), in the
    module's order, the same on every process."""
    return [*module.named_parameters(), *module.named_buffers()]


@torch.no_grad()
def _receive_from_first(module: nn.Module, source: dict[str, torch.Tensor] | None) -> None:
    """Each tensor of ``module`` set to the first process's (``source``, its whole tensors; None on
    the others): a sharded one scattered (distribute_tensor from rank 0), any other broadcast."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    for name, tensor in _tensors(module):
        if isinstance(tensor, _dtensor()):
            local = tensor.to_local()
            whole = source[name] if source is not None else torch.empty(tensor.shape, dtype=tensor.dtype)
            sliced = distribute_tensor(whole.to(local.device), tensor.device_mesh, tensor.placements, src_data_rank=0)
            if source is None:
                local.copy_(sliced.to_local())
        else:
            dist.broadcast(tensor.data, src=0)


def is_sharded(module: nn.Module) -> bool:
    DTensor = _dtensor()
    return any(isinstance(p, DTensor) for p in module.parameters())


def _whole(value: Any, keep: bool = True) -> Any:
    """A DTensor gathered into one CPU tensor; anything else as it is (a tensor moved to the CPU).
    With ``keep`` False a tensor is reduced, once gathered, to a 0-d float that is non-finite exactly
    when the tensor held a non-finite value: what a process that does not write the checkpoint
    needs to agree on the non-finite check, without holding a second copy of the whole state."""
    if isinstance(value, _dtensor()):
        value = value.full_tensor()
    if not torch.is_tensor(value):
        return value
    if keep:
        return value.detach().cpu()
    finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
    return torch.tensor(0.0 if finite else float("nan"))


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every shard gathered: the tensors an unsharded module would hold
    (a collective; ``keep`` as in ``_whole``)."""
    return {name: _whole(value, keep) for name, value in module.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor (AdamW's moments) gathered whole (``keep`` as in
    ``_whole``)."""
    saved = optimizer.state_dict()
    state = {index: {key: _whole(value, keep) for key, value in entry.items()} for index, entry in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def _like(target: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` cut to ``target``'s slice when ``target`` is a DTensor (every process holds the whole
    tensor, so no data moves: ``src_data_rank=None``)."""
    DTensor = _dtensor()
    if not isinstance(target, DTensor):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(target.device, target.dtype), target.device_mesh, target.placements,
                             src_data_rank=None)


def load_model(module: nn.Module, whole: dict[str, torch.Tensor]) -> None:
    """Load a consolidated state dict into ``module``, sharded or not (strict, as load_state_dict)."""
    if not is_sharded(module):
        module.load_state_dict(whole)
        return
    current = module.state_dict()
    module.load_state_dict({name: _like(current[name], value) if name in current else value
                            for name, value in whole.items()})


def load_optimizer(optimizer: torch.optim.Optimizer, whole: dict[str, Any]) -> None:
    """Load a consolidated optimizer state dict; moments of a sharded parameter are cut to its slice."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state = {}
    for index, entry in whole["state"].items():
        param = params[int(index)] if int(index) < len(params) else None
        state[index] = {key: _like(param, value) if param is not None and torch.is_tensor(value) and value.ndim
                        else value for key, value in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": whole["param_groups"]})


@contextlib.contextmanager
def unsharded(*modules: nn.Module) -> Iterator[None]:
    """Every FSDP unit of ``modules`` gathered whole for the block (a collective): for calls that go
    around the sharded forward, e.g. the health monitor's ``encoder.forward_features``."""
    from torch.distributed.fsdp import FSDPModule

    units = list({id(m): m for module in modules for m in module.modules() if isinstance(m, FSDPModule)}.values())
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
