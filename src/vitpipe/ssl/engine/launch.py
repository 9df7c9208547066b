"""Before and around the loop: launch checks, the one-writer run lock, the stop-signal flag."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from vitpipe.config import ConfigError
from vitpipe.locks import DirLock


def _parent_cmdline() -> list[str]:
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def check_launch(num_processes: int) -> None:
    """Refuse the launches that silently train the wrong thing (both measured on CPU machines)."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected != num_processes:
        raise ConfigError(
            f"the launcher started {expected} processes but Accelerate sees {num_processes}: each would train "
            "its own copy. On CPU use `torchrun --nproc_per_node N -m vitpipe ...` or `accelerate launch "
            "--multi_gpu --num_processes N` with ACCELERATE_USE_CPU=true")
    if expected == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        args = _parent_cmdline()
        for index, arg in enumerate(args):
            value = None
            if arg in ("--num_processes", "--num-processes") and index + 1 < len(args):
                value = args[index + 1]
            elif arg.startswith(("--num_processes=", "--num-processes=")):
                value = arg.split("=", 1)[1]
            if value and value.isdigit() and int(value) > 1 and "--multi_gpu" not in args:
                raise ConfigError(
                    f"`accelerate launch --cpu --num_processes {value}` starts only ONE process. Use "
                    f"`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {value} -m vitpipe ...` "
                    f"or `torchrun --nproc_per_node {value} -m vitpipe ...`")


class RunLock(DirLock):
    """One writer per run directory: a second job on the same run gets a clear error."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir / ".lock", run_dir, "one job per run directory")


class StopFlag:
    """SIGTERM/SIGUSR1 set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_accelerator(train: Any, run_dir: Path, precision: str):
    """The Accelerator of a run at ``precision`` (fp32 | bf16 | fp16, ssl/engine/precision.py chose it
    for auto): CPU forced without CUDA (a plain Accelerator() on a GPU-less --multi_gpu launch
    trains N unlinked copies); trackers under RUN/tb; launches that train the wrong thing refused."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    # accelerate keeps one mixed-precision setting per process; a second run in the same process
    # (the tests, a fine-tune after a probe) may choose another: start its state afresh, keeping
    # the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    from vitpipe.ssl.engine import trackers as tracking

    trackers = tracking.names(train)
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_steps=train.grad_accum, log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        step_scheduler_with_optimizer=False,
    )
    check_launch(accelerator.num_processes)
    return accelerator
