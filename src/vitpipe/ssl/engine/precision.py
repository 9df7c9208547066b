"""`train.precision=auto`: bf16 autocast where it pays, measured on the model at hand.

On CUDA: bf16 where the GPU has it. On a CPU: bf16 only when the CPU has native bf16 matmul
(AMX or AVX512-BF16 on x86, the BF16 extension on Arm; asked of torch and the kernel, not guessed)
AND a short measurement of this objective's training step (forward + backward on a synthetic
batch of the run's shape) says bf16 autocast is at least MARGIN faster than fp32. Small models
are overhead-bound (1.04x at ViT-Ti on an AVX512-BF16 machine, benchmarks/RESULTS.md), so they
stay fp32; a resumed run keeps its first session's choice, so its numerics do not change midway.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

MARGIN = 1.10
"""bf16 must beat fp32 by this factor (below it the difference is within the measurement's noise)."""
ROUNDS = 6
MAX_BATCH = 64


def native_bf16() -> str | None:
    """The CPU's native bf16 matmul unit, or None."""
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            return name
    if platform.machine() in ("aarch64", "arm64"):
        try:
            features = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        return "Arm BF16" if " bf16" in features else None
    return None


EMULATED = ("this CPU has no native bf16 matmul: bf16 autocast runs emulated, many times slower than fp32 "
            "(a DINO ViT-Ti/4 step took 131 s against 4.9 s at fp32 on an AVX2-only CPU)")


def emulated_bf16(precision: str) -> bool:
    """bf16 asked for on a CPU without a bf16 unit: it runs, emulated, many times slower than fp32."""
    return precision == "bf16" and not torch.cuda.is_available() and native_bf16() is None


@functools.cache
def warn_emulated_bf16(setting: str) -> None:
    """Says once per process, on the first process only, that ``setting``=bf16 runs emulated here."""
    from vitpipe.ssl.engine.distributed import is_first_process

    if is_first_process():
        print(f"warning: {setting}=bf16: {EMULATED}", file=sys.stderr)


def choose(train: Any, build: Callable[[], torch.nn.Module], batch: Callable[[], dict], previous: str | None
           ) -> tuple[str, str]:
    """(precision, reason) for ``train.precision``: ``build`` makes a throwaway objective,
    ``batch`` a synthetic batch for it; ``previous`` is the run's recorded choice when resuming."""
    if train.precision != "auto":
        return train.precision, "set by train.precision"
    if previous is not None:
        return previous, "auto: kept from the run's first session"
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return ("bf16" if bf16 else "fp32"), f"auto: this GPU {'has' if bf16 else 'lacks'} bf16"
    unit = native_bf16()
    if unit is None:
        return "fp32", "auto: this CPU has no native bf16 matmul"
    fp32, bf16 = measure(build(), batch())
    speedup = fp32 / bf16
    chosen = "bf16" if speedup >= MARGIN else "fp32"
    return chosen, (f"auto: bf16 autocast {speedup:.2f}x fp32's speed for this model on this CPU ({unit}; "
                    f"{fp32 * 1000:.0f} vs {bf16 * 1000:.0f} ms a step; bf16 needs {MARGIN}x)")


def measure(objective: torch.nn.Module, batch: dict) -> tuple[float, float]:
    """Seconds of a forward + backward step of ``objective`` on ``batch``: (fp32, bf16)."""
    objective.train()

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective(batch).loss
        loss.backward()
        objective.zero_grad(set_to_none=True)

    return fastest(step)


def fastest(step: Callable[[bool], None], rounds: int = ROUNDS) -> tuple[float, float]:
    """(fp32, bf16): the fastest of ``rounds`` runs of ``step(bf16)`` each, after a warm-up of
    each, fp32 and bf16 interleaved (the machine's drift hits both; the minimum drops its noise:
    medians of 3 separate runs swung 0.3x-14x on a loaded machine)."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for bf16 in (False, True):
        step(bf16)
    for _ in range(rounds):
        for bf16 in (False, True):
            start = time.perf_counter()
            step(bf16)
            times[bf16].append(time.perf_counter() - start)
    return min(times[False]), min(times[True])


def synthetic_batch(objective: torch.nn.Module, data: Any, batch_size: int) -> dict:
    """A batch of the run's shape for timing (random pixels, a short caption, label 0), through the
    objective's own views (multi-crop) and batch hook (masks, palette indices, ...)."""
    size = min(batch_size, MAX_BATCH)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(size, data.channels, data.image_size, data.image_size, generator=generator),
             "text": ["a photo of a thing"] * size, "label": torch.zeros(size, dtype=torch.long),
             "key": [f"k{i}" for i in range(size)]}
    views = objective.views(data)
    if views is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pixels = torch.randint(0, 256, (size, data.channels, data.image_size, data.image_size), dtype=torch.uint8,
                                   generator=generator)
            batch["image"] = views.batch(pixels)
    hook = objective.batch_hook()
    return hook(batch, generator) if hook is not None else batch


def for_run(config: Any, build_objective: Callable, run_dir: Path) -> tuple[str, str]:
    """(precision, reason) of a run about to start: ``build_objective(config, artefacts)`` as the
    trainer builds it; several processes on CPU stay fp32 (each would measure, and could disagree)."""
    from vitpipe.ssl import registry
    from vitpipe.ssl.engine.rundir import read_run_info

    train = config.train
    previous = read_run_info(run_dir).get("precision") if any(run_dir.glob("checkpoints/step_*")) else None
    if train.precision == "auto" and previous is None and not torch.cuda.is_available() \
            and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "fp32", "auto: several CPU processes stay fp32 (a measurement per process could disagree)"

    spec = registry.OBJECTIVES.get(config.objective)
    if train.precision == "auto" and previous is None and spec is not None and spec.fit_artifacts is not None \
            and not torch.cuda.is_available():
        # it cannot be built before its artefacts (palette, tokenizer) are fitted from the data
        return "fp32", "auto: not measured (this objective fits artefacts from the data first); train.precision=bf16 to use it"

    def build() -> torch.nn.Module:
        return build_objective(config, {})

    made: dict = {}

    def objective() -> torch.nn.Module:
        made.setdefault("objective", build())
        return made["objective"]

    chosen = choose(train, objective, lambda: synthetic_batch(objective(), config.data, train.batch_size), previous)
    if emulated_bf16(chosen[0]):  # asked for, or kept from a first session on another machine
        warn_emulated_bf16("train.precision")
        return chosen[0], f"{chosen[1]} ({EMULATED})"
    return chosen


def for_eval(requested: str, build: Callable[[], torch.nn.Module | None], data: Any, memo: Path, key: str) -> str:
    """fp32 | bf16 for evaluating an encoder: ``requested`` unless auto; auto is bf16 on a GPU with
    it, and on a CPU with native bf16 when a forward pass of the encoder (a batch of 64 at the
    run's shape) is at least MARGIN faster in bf16. Features are stored as fp32 either way. An auto
    choice is measured once per encoder (``key``) and CPU and kept in ``memo`` (a JSON file), so
    reruns reuse the same features and results instead of flipping on timing noise."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    unit = native_bf16()
    if unit is None:
        return "fp32"
    import json

    from vitpipe.pipeline.manifest import write_json_atomic

    known = json.loads(memo.read_text()) if memo.is_file() else {}
    if known.get(key, {}).get("cpu") == unit:
        return known[key]["precision"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "fp32"  # each process would measure, and could disagree: features of one precision only
    chosen = _measured(build(), data)
    write_json_atomic(memo, {**known, key: {"precision": chosen, "cpu": unit}})
    return chosen


def _measured(encoder: torch.nn.Module, data: Any) -> str:
    pixels = torch.randn(MAX_BATCH, data.channels, data.image_size, data.image_size, generator=torch.Generator().manual_seed(0))

    def forward(bf16: bool) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            encoder.forward_features(pixels)

    fp32, bf16 = fastest(forward)
    return "bf16" if fp32 / bf16 >= MARGIN else "fp32"
