"""`vitpipe plan OBJECTIVE [key=value ...] --gpus N --gpu h100`: what a run of this config needs per
GPU before any is rented, from one real training step of the objective on this CPU:

- parameters (trainable and all), and the bytes of weights, gradients and AdamW state (fp32 master
  weights: 4 + 4 + 8 bytes per trainable parameter; FSDP shards all three over the GPUs);
- activations kept for backward, counted on real steps at two batch sizes (autograd's saved
  tensors, parameters and repeats left out): per sample, and per step whatever the batch; with
  and without activation checkpointing, under the precision the run would use on a GPU (bf16);
- the largest per-GPU batch that fits the GPU's memory (10% kept for the allocator and buffers);
- FLOPs per sample (FlopCounterMode, forward + backward) and the step time at a stated MFU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.autograd.graph import saved_tensors_hooks

GPUS = {  # memory (GB), dense bf16 peak (TFLOP/s; V100: fp16, it has no bf16) from the vendors' data sheets
    "h100": (80, 989.0), "a100-80": (80, 312.0), "a100-40": (40, 312.0), "l40s": (48, 362.0),
    "l4": (24, 121.0), "a10g": (24, 125.0), "v100": (32, 125.0),
}
RESERVE = 0.10
BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments
MEASURE_BATCH = (4, 8)


@dataclass
class Plan:
    objective: str
    parameters: int
    trainable: int
    gpus: int
    gpu_memory_gb: float
    state_gb_per_gpu: dict[str, float]
    """weights + gradients + optimizer per GPU: {"ddp": ..., "fsdp": ...}."""
    activations_mb_per_sample: dict[str, float]
    """{"plain": ..., "checkpointed": ...} at the precision below: what grows with the batch."""
    activations_mb_per_step: dict[str, float]
    """What a step keeps whatever its batch (autocast's bf16 weight copies, index tables)."""
    precision: str
    max_batch_per_gpu: dict[str, int]
    """{"ddp": ..., "ddp+checkpointing": ..., "fsdp": ..., "fsdp+checkpointing": ...}."""
    flops_per_sample: float
    step_seconds: float | None
    """For the run's global batch at ``mfu`` of the GPUs' peak (None: peak unknown)."""
    mfu: float
    global_batch: int
    batch_per_gpu: int
    """The config's train.batch_size: what one GPU holds in a micro-step."""

    def fits(self) -> list[str]:
        """The modes of ``max_batch_per_gpu`` that hold the config's batch per GPU."""
        return [mode for mode, largest in self.max_batch_per_gpu.items() if largest >= self.batch_per_gpu]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def saved_bytes(objective: torch.nn.Module, batch: dict, precision: str) -> tuple[int, float]:
    """(activation bytes kept for backward, FLOPs) of one forward + backward on ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    params = {p.data_ptr() for p in objective.parameters()}
    seen: set[tuple] = set()
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ident = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.data_ptr() not in params and ident not in seen:
            seen.add(ident)
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with FlopCounterMode(display=False) as counter, saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = objective(batch).loss
        loss.backward()
    objective.zero_grad(set_to_none=True)
    return total[0], counter.get_total_flops()


def make_plan(config: Any, build: Callable[[], torch.nn.Module], batch: Callable[[torch.nn.Module, int], dict],
              gpus: int, memory_gb: float, peak_tflops: float | None, mfu: float) -> Plan:
    from vitpipe.ssl.vit import set_grad_checkpointing

    objective = build().train()
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    total = sum(p.numel() for p in objective.parameters())
    precision = "bf16"  # what train.precision=auto takes on a GPU with bf16
    activations, fixed, flops = {}, {}, 0.0
    small, large = MEASURE_BATCH
    for name, on in (("plain", False), ("checkpointed", True)):
        set_grad_checkpointing(objective, on)
        saved_small, counted = saved_bytes(objective, batch(objective, small), precision)
        saved_large, _ = saved_bytes(objective, batch(objective, large), precision)
        # two batch sizes: what grows with the batch, and what a step keeps whatever its size
        # (autocast's bf16 copies of the weights, masks' index tables)
        activations[name] = (saved_large - saved_small) / (large - small)
        fixed[name] = max(0.0, saved_small - small * activations[name])
        flops = counted / small if not on else flops  # checkpointing recomputes forwards: count the plain step
    set_grad_checkpointing(objective, False)
    state = {"ddp": trainable * BYTES_PER_PARAM, "fsdp": trainable * BYTES_PER_PARAM / gpus}
    budget = memory_gb * 1e9 * (1 - RESERVE)
    largest = {f"{mode}{'+checkpointing' if kind == 'checkpointed' else ''}":
               max(0, int((budget - state[mode] - fixed[kind]) // max(activations[kind], 1)))
               for mode in ("ddp", "fsdp") for kind in ("plain", "checkpointed")}
    global_batch = config.train.batch_size * config.train.grad_accum * gpus
    per_sample = flops
    seconds = per_sample * global_batch / (gpus * peak_tflops * 1e12 * mfu) if peak_tflops else None
    return Plan(config.objective, total, trainable, gpus, memory_gb,
                {k: round(v / 1e9, 3) for k, v in state.items()},
                {k: round(v / 1e6, 3) for k, v in activations.items()}, {k: round(v / 1e6, 3) for k, v in fixed.items()},
                precision, largest, per_sample, seconds, mfu, global_batch, config.train.batch_size)


def random_read(data: Any):
    """Stands in for the training shards when an objective fits artefacts (palette, tokenizer)
    before it can be built: its shapes, not its data, are what a plan needs."""
    def read(fields, limit):
        generator = torch.Generator().manual_seed(0)
        for start in range(0, limit, 32):
            yield {"image": torch.rand(32, data.channels, data.image_size, data.image_size, generator=generator) * 2 - 1,
                   "text": [f"a photo of thing {i}" for i in range(start, start + 32)],
                   "label": torch.zeros(32, dtype=torch.long), "key": [f"k{i}" for i in range(start, start + 32)]}
    return read


def plan_for(objective: str, config_file, overrides: list[str], gpus: int, gpu: str | None,
             memory_gb: float | None, mfu: float) -> Plan:
    from vitpipe.config import ConfigError
    from vitpipe.ssl import registry
    from vitpipe.ssl.engine.precision import synthetic_batch

    if gpus < 1 or not 0 < mfu <= 1:
        raise ConfigError("--gpus must be >= 1 and --mfu in (0, 1]")
    if gpu is not None and gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; known: {', '.join(GPUS)} (or give --memory-gb)")
    if memory_gb is None and gpu is None:
        raise ConfigError("give --gpu NAME or --memory-gb N")
    if memory_gb is not None and not memory_gb > 0:
        raise ConfigError(f"--memory-gb must be > 0, got {memory_gb:g}")
    config = registry.pretrain_config(objective, config_file, overrides)
    spec = registry.get(objective)
    memory = memory_gb if memory_gb is not None else GPUS[gpu][0]
    peak = GPUS[gpu][1] if gpu is not None else None

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        fitted = spec.fit_artifacts(config, random_read(config.data)) if spec.fit_artifacts else {}
        return registry.build_objective(config, fitted)

    return make_plan(config, build, lambda model, n: synthetic_batch(model, config.data, n), gpus, memory, peak, mfu)
