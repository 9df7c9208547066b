"""`train.compile=auto`: torch.compile where it pays for this objective, size and run length, measured.

A compile costs tens of seconds (35-40 s for ViT-Ti/S on a 2-core CPU) and gave 7-9% there
(benchmarks/RESULTS.md), so a short run never wins it back: a run estimated (eager step time x
remaining steps, measured on a synthetic batch) under MIN_SECONDS is left eager without compiling
anything. A longer one compiles a throwaway copy of the objective, times its steps against eager
ones, and compiles for real only when the time saved over the rest of the run exceeds the measured
compile cost and the gain is at least MIN_GAIN. The choice and its numbers go into run.json.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

MIN_SECONDS = 900.0
"""Runs estimated shorter than this are not measured (the measurement itself includes a compile)."""
MIN_GAIN = 1.03
"""Compiled steps must be at least this much faster (below it: within the measurement's noise)."""
ROUNDS = 3


def step_seconds(objective: torch.nn.Module, batch: dict, autocast: Callable[[], Any], rounds: int = ROUNDS) -> float:
    """The fastest of ``rounds`` forward + backward steps (after one warm-up step, which for a
    compiled module is the compile)."""
    def step() -> None:
        with autocast():
            loss = objective(batch).loss
        loss.backward()

    step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def decide(setting: bool | str, build: Callable[[], torch.nn.Module], batch: Callable[[torch.nn.Module], dict],
           samples_per_step: int, remaining_steps: int, autocast: Callable[[], Any]) -> tuple[bool, str]:
    """(compile?, reason) for ``train.compile``: ``build`` makes a throwaway objective on the run's
    device, ``batch(objective)`` a synthetic batch for it (on that device)."""
    if setting != "auto":
        return bool(setting), "set by train.compile"
    objective = build().train()
    sample = batch(objective)
    scale = samples_per_step / len(sample["key"])
    eager = step_seconds(objective, sample, autocast) * scale
    estimate = eager * remaining_steps
    if estimate < MIN_SECONDS:
        return False, (f"auto: the run is estimated at {estimate:.0f} s eager ({eager * 1000:.0f} ms a step), under "
                       f"{MIN_SECONDS:.0f} s: a compile could not pay back; not measured")
    compiled = torch.compile(objective)
    start = time.perf_counter()
    fast = step_seconds(compiled, sample, autocast) * scale
    cost = time.perf_counter() - start - fast / scale * ROUNDS
    saved = (eager - fast) * remaining_steps
    chosen = eager / fast >= MIN_GAIN and saved > cost
    return chosen, (f"auto: compiled steps {eager / fast:.2f}x eager ({fast * 1000:.0f} vs {eager * 1000:.0f} ms), "
                    f"saving {saved:.0f} s over {remaining_steps} steps against a {cost:.0f} s compile "
                    f"(needs {MIN_GAIN}x and a saving above the cost)")


def for_run(config: Any, build_objective: Callable, fitted: dict[str, bytes], accelerator,
            remaining_steps: int) -> tuple[bool, str]:
    """``decide`` for a run: throwaway copies of its objective and synthetic batches on its device."""
    from accelerate.utils import send_to_device

    from vitpipe.ssl.engine.precision import synthetic_batch

    train = config.train

    def build() -> torch.nn.Module:
        return build_objective(config, fitted).to(accelerator.device)

    def batch(objective: torch.nn.Module) -> dict[str, Any]:
        return send_to_device(synthetic_batch(objective, config.data, train.batch_size), accelerator.device)

    return decide(train.compile, build, batch, train.batch_size * train.grad_accum, remaining_steps,
                  accelerator.autocast)
