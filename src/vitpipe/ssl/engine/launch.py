"""Before and around the loop: launch checks, the one-writer run lock, the stop-signal flag."""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

from vitpipe.config import ConfigError


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


_HELD_LOCKS: list = []
"""Open lock files of this process. A forked child (a DataLoader worker) closes its copies at once:
a flock belongs to the open file, which a child shares, so a worker outliving its killed trainer
by a few seconds kept the run locked and a prompt rerun was refused."""


def _drop_inherited_locks() -> None:
    for handle in _HELD_LOCKS:
        handle.close()  # the child's descriptor only; the parent keeps its lock
    _HELD_LOCKS.clear()


@functools.cache
def _register_fork_hook() -> None:
    """Once, on first use (not at import)."""
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _hold(handle) -> None:
    _register_fork_hook()
    _HELD_LOCKS.append(handle)


def _dead_here(holder: str) -> bool:
    """Whether the lock file names a process of this machine that no longer exists."""
    parts = holder.replace(",", " ").split()
    if len(parts) < 4 or parts[0] != "pid" or not parts[1].isdigit() or parts[3] != os.uname().nodename:
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunLock:
    """One writer per run directory: a second job on the same run gets a clear error."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.handle = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 10
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                if _dead_here(holder) and time.monotonic() < deadline:
                    time.sleep(0.1)  # a killed holder's forked child has not yet closed its copy
                    continue
                raise ConfigError(f"{self.path.parent} is being written by {holder}; one job per run directory") from None
            try:  # the holder we waited for may have removed the file meanwhile: lock the one on disk
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        self.handle = handle
        _hold(handle)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {os.uname().nodename}"
                          + (f", SLURM job {os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else ""))
        self.handle.flush()

    def release(self) -> None:
        """Remove the file while still holding the lock (a process killed before this leaves the
        file, but the kernel drops its lock: a stale file never blocks a rerun)."""
        if self.handle is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            if self.handle in _HELD_LOCKS:
                _HELD_LOCKS.remove(self.handle)
            self.handle.close()
            self.handle = None


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
