"""Checkpoints: written atomically with checksums, verified before they are trusted.

Layout: ``RUN/checkpoints/step_NNNNNNNN/`` with model.safetensors, optimizer.pt, scheduler.pt,
rng_<rank>.pt, state.json and checksums.json (sha256 of every other file, written last). A
checkpoint is built in ``.tmp-step_N``, fsynced and renamed, so a ``step_*`` directory is
complete; checksums catch what happens to it afterwards (bit rot, a truncated copy, a tool that
writes into it). Non-finite weights or optimizer state are never written. Under FSDP the files
are the same consolidated ones (ssl/engine/sharding.py gathers and re-cuts the shards).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from vitpipe.runlayout import RunLayout
from vitpipe import __version__
from vitpipe.atomic import ordinary_mode
from vitpipe.pipeline.tario import sha256_file

PREFIX = "step_"
CHECKSUMS = "checksums.json"
REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "state.json", "rng_0.pt")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one could not be written; the message is one line for the user."""


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (verified or not). Incomplete ones only ever exist under
    a ``.tmp-`` name, damaged ones that were set aside under ``.damaged-``."""
    directory = RunLayout(run_dir).checkpoints
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file())


def verify(checkpoint: Path) -> str | None:
    """None when every file matches the checksum written with it; else what is wrong, in words."""
    try:
        expected = json.loads((checkpoint / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUMS}"
    except (OSError, ValueError) as err:
        return f"{CHECKSUMS} unreadable ({err})"
    for name in REQUIRED:
        if name not in expected:
            return f"{name} is not in {CHECKSUMS}"
    for name, digest in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_verified(run_dir: Path, log=print, set_aside: bool = True) -> Path | None:
    """The newest checkpoint that verifies, with one line per damaged newer one; those are renamed
    ``.damaged-step_N`` when ``set_aside`` (a resuming run: kept for inspection, never listed
    again). CheckpointError when checkpoints exist but none verifies."""
    checkpoints = list_checkpoints(run_dir)
    problems = []
    for checkpoint in reversed(checkpoints):
        problem = verify(checkpoint)
        if problem is None:
            if problems:
                log(f"vitpipe: using {checkpoint.name}, the newest checkpoint that verifies")
            return checkpoint
        problems.append(f"{checkpoint.name}: {problem}")
        if set_aside:
            aside = checkpoint.with_name(f".damaged-{checkpoint.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(checkpoint, aside)
            log(f"vitpipe: checkpoint {checkpoint.name} is damaged ({problem}); set aside as {aside.name}")
        else:
            log(f"vitpipe: checkpoint {checkpoint.name} is damaged ({problem}); skipped")
    if problems:
        raise CheckpointError(f"no checkpoint in {run_dir} verifies ({'; '.join(problems)}); "
                              "start again with another --out, or restore the checkpoints")
    return None


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _first_nonfinite(weights: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> str | None:
    for name, param in weights.items():
        if param.is_floating_point() and not torch.isfinite(param).all():
            return f"parameter {name}"
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"optimizer state {key} of parameter {index}"
    return None


def save(accelerator, model, optimizer, scheduler, state: dict[str, Any], run_dir: Path, keep: int) -> Path:
    """Atomic: temp dir, checksums last, fsync, rename; prune old ones only after that. Refuses
    non-finite weights (TrainingError-worthy: raised as CheckpointError) and cleans up after a
    failed write (disk full) so the previous checkpoint stays the latest."""
    from safetensors.torch import save_file

    from vitpipe.ssl.engine import sharding

    unwrapped = accelerator.unwrap_model(model)
    # every process takes part (gathering FSDP shards is a collective); only the writer keeps whole
    # host tensors, the others one finiteness flag per tensor, so all reach the same verdict below
    writer = accelerator.is_main_process
    weights = sharding.full_state_dict(unwrapped, writer)
    optimizer_state = sharding.full_optimizer_state(optimizer, writer)
    bad = _first_nonfinite(weights, optimizer_state)
    if bad is not None:
        raise CheckpointError(f"non-finite values in {bad} after step {state['step']}; not checkpointed (lower "
                              "optim.base_lr or set optim.clip_grad); the last checkpoint is still good")
    directory = RunLayout(run_dir).checkpoints
    final = directory / f"{PREFIX}{state['step']:08d}"
    tmp = directory / f".tmp-{final.name}"
    try:
        if accelerator.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
            ordinary_mode(tmp / "model.safetensors")
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "world_size": accelerator.num_processes,
                                                       "vitpipe_version": __version__}, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_tree(directory)
    except Exception as err:  # OSError, and safetensors' own SafetensorError for the same causes
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in list_checkpoints(run_dir) if p != final]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        what = "disk full" if is_disk_full(err) else f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{what} while writing checkpoint {final.name}; {kept}") from None
    if accelerator.is_main_process:
        for old in list_checkpoints(run_dir)[:-keep]:
            prune(old)
    accelerator.wait_for_everyone()
    return final


PINS = ".pins"
_PINNED: dict[str, Any] = {}  # checkpoint -> open lock file, held until this process exits


def _pin_file(checkpoint: Path) -> Path:
    return checkpoint.parent / PINS / f"{checkpoint.name}.lock"


def pin(checkpoint: Path) -> bool:
    """Keep ``checkpoint`` from being pruned while this process lives (an eval of a run that is
    still training reads it): a shared lock that ``prune`` respects. False when the checkpoint is
    already gone (pruned before the lock was taken: locate the newest again). A run directory this
    process cannot write is read unpinned."""
    import fcntl

    checkpoint = Path(checkpoint)
    if str(checkpoint) in _PINNED:
        return True
    try:
        _pin_file(checkpoint).parent.mkdir(exist_ok=True)
        handle = open(_pin_file(checkpoint), "a")
    except OSError:
        return (checkpoint / "state.json").is_file()
    fcntl.flock(handle, fcntl.LOCK_SH)  # waits out a prune under way
    if not (checkpoint / "state.json").is_file():
        handle.close()
        return False
    _PINNED[str(checkpoint)] = handle
    return True


def prune(checkpoint: Path) -> bool:
    """Delete an old checkpoint unless a reader has pinned it (then it stays, and a later save
    prunes it); True when deleted."""
    import fcntl

    path = _pin_file(checkpoint)
    if not path.is_file():
        shutil.rmtree(checkpoint)
        return True
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(checkpoint)
        path.unlink(missing_ok=True)
    return True


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def load(path: Path, accelerator, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore a verified checkpoint into prepared objects; returns its state.json."""
    from safetensors.torch import load_file

    saved = json.loads((path / "state.json").read_text())
    if saved["world_size"] != accelerator.num_processes:
        from vitpipe.config import ConfigError

        raise ConfigError(f"{path} was written by {saved['world_size']} processes, this run has "
                          f"{accelerator.num_processes}: the data position would not match")
    try:
        from vitpipe.ssl.engine import sharding
        from vitpipe.ssl.engine.optim import with_frozen

        sharding.load_model(accelerator.unwrap_model(model), load_file(path / "model.safetensors"))
        sharding.load_optimizer(optimizer, with_frozen(torch.load(path / "optimizer.pt", weights_only=True), optimizer))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / f"rng_{accelerator.process_index}.pt", weights_only=True))
    except Exception as err:  # e.g. a refused pickle: say which file, in one line
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot load {path}: {type(err).__name__}: {first}") from None
    return saved


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
