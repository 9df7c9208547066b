"""Directory locks: one writer per run directory or ingest output, across processes and machines
that share the file system (flock), robust to a killed holder and to its forked DataLoader workers."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from vitpipe.config import ConfigError


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


class DirLock:
    """One writer per directory: a second process gets a clear error naming the holder. The lock
    file ``path`` may lie inside the directory (a run) or beside it (an ingest's --out, which must
    stay empty until the ingest writes it)."""

    def __init__(self, path: Path, directory: Path, rule: str) -> None:
        self.path, self.directory, self.rule = Path(path), Path(directory), rule
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
                raise ConfigError(f"{self.directory} is being written by {holder}; {self.rule}") from None
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
