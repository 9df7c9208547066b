"""DataLoader workers: their errors reach the main process as one line, and they never outlive
the iteration or the command that started them."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Iterator

from torch.utils.data import DataLoader

from vitpipe.config import ConfigError


class DataError(RuntimeError):
    """Too many samples failed to decode."""


class WorkerError(RuntimeError):
    """An unexpected error inside a DataLoader worker, re-raised in the main process."""


WORKER_FAILURE = "worker_failure"


@dataclass(frozen=True)
class WorkerFailure:
    """What a worker raised, sent to the main process as a batch instead of torch's re-raise:
    torch's copy carries the worker's whole traceback in its message, and an exception left to
    the exit-time clean-up leaves workers (which ignore SIGTERM) that the process then waits for
    forever."""

    kind: str
    """usage (a ConfigError: exit 2), data (DataError) or runtime (anything else)."""
    type_name: str
    message: str

    @classmethod
    def of(cls, err: BaseException) -> "WorkerFailure":
        kind = "usage" if isinstance(err, ConfigError) else "data" if isinstance(err, DataError) else "runtime"
        return cls(kind, type(err).__name__, str(err))

    def exception(self) -> Exception:
        if self.kind == "usage":
            return ConfigError(self.message)
        if self.kind == "data":
            return DataError(self.message)
        return WorkerError(f"{self.type_name} in a data loader worker: {self.message}")


def leave_stop_signals_to_main(worker_id: int) -> None:
    """SLURM, `kill -- -PGID` and container runtimes signal the whole process group: a worker that
    died of that SIGTERM would take the run down before the main process could checkpoint. Workers
    still exit when the main process closes the loader, or dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardLoader(DataLoader):
    """A DataLoader whose workers' errors reach the caller as the error they were (one line), and
    whose workers are stopped, killed if need be, whenever iteration ends: they ignore SIGTERM
    (see ``leave_stop_signals_to_main``), so nothing at exit would stop them."""

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        try:
            for batch in iterator:
                if isinstance(batch, dict) and WORKER_FAILURE in batch:
                    raise batch[WORKER_FAILURE].exception()
                yield batch
        finally:
            stop_workers(iterator)


def stop_workers(iterator: Any) -> None:
    """Shut a DataLoader iterator's workers down; SIGKILL any still alive."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def kill_leftover_workers() -> None:
    """SIGKILL DataLoader workers still alive in this process (called when a command ends, so an
    error raised outside the loader cannot leave the exit waiting for workers that ignore SIGTERM)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if getattr(getattr(child, "_target", None), "__name__", "") == "_worker_loop":
            child.kill()
            child.join(timeout=5)
