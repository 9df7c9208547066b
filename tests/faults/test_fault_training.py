"""Training state under faults: NaN weights, damaged checkpoints, kills, a full disk, stale locks,
signals to the whole process group (issue: faults and hostile input). Each test does the damage,
runs the command and asserts the outcome."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitpipe.cli import main
from vitpipe.ssl.engine.checkpoints import list_checkpoints, verify

RUN_ARGS = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
            "mae.decoder_depth=1", "train.batch_size=8", "train.log_every=1", "data.num_workers=0",
            "data.shuffle_buffer=10", "train.tensorboard=false"]


def pretrain(shards: Path, run: Path, *extra: str, resume: bool = True) -> int:
    return main(["pretrain", "mae", "--data", str(shards), "--out", str(run), *(["--resume", "auto"] if resume else []),
                 *RUN_ARGS, *extra])


def spawn(shards: Path, run: Path, *extra: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitpipe", "pretrain", "mae", "--data", str(shards), "--out",
                             str(run), "--resume", "auto", *RUN_ARGS, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip() and '"loss"' in line]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(steps_logged(run)) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"run did not reach step {step}")


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


# -- 1. non-finite weights -------------------------------------------------------------------


def test_nan_weights_are_never_checkpointed(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    # step 2's loss is finite (~1e21) but its optimizer step leaves NaN weights
    assert pretrain(tiny_shards, run, "optim.base_lr=1e6", "train.ckpt_every_steps=1", "train.max_steps=10") == 1
    err = error_lines(capsys)
    assert err[-1].startswith("error: non-finite values") and not any("Traceback" in line for line in err)
    assert list_checkpoints(run), "the first, finite checkpoint is kept"
    for checkpoint in list_checkpoints(run):
        assert verify(checkpoint) is None and all_finite(checkpoint / "model.safetensors")
    assert not (run / "encoder.safetensors").exists()


# -- 2. damaged checkpoints ------------------------------------------------------------------

def flip(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(max(0, path.stat().st_size // 2 - 2048))
        handle.write(b"\xff" * 4096)


DAMAGE = {
    "flipped_bytes": lambda c: flip(c / "model.safetensors"),
    "truncated": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000]),
    "deleted": lambda c: (c / "optimizer.pt").unlink(),
    "emptied": lambda c: (c / "scheduler.pt").write_bytes(b""),
    "no_checksums": lambda c: (c / "checksums.json").unlink(),
}


@pytest.fixture
def finished_run(tiny_shards, tmp_path) -> Path:
    run = tmp_path / "run"
    assert pretrain(tiny_shards, run, "train.max_steps=6", "train.ckpt_every_steps=2", "train.keep_checkpoints=3") == 0
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    return run


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(finished_run, tiny_shards, capsys, damage):
    good_encoder = load_file(finished_run / "encoder.safetensors")
    DAMAGE[damage](finished_run / "checkpoints" / "step_00000006")
    capsys.readouterr()
    assert pretrain(tiny_shards, finished_run, "train.max_steps=6", "train.ckpt_every_steps=2",
                    "train.keep_checkpoints=3") == 0
    err = capsys.readouterr().err
    assert "step_00000006 is damaged" in err and "using step_00000004" in err
    encoder = load_file(finished_run / "encoder.safetensors")
    assert all(torch.equal(encoder[k], good_encoder[k]) for k in good_encoder)  # redone exactly
    assert steps_logged(finished_run) == [1, 2, 3, 4, 5, 6]


def test_no_verifying_checkpoint_is_one_error_line(finished_run, tiny_shards, capsys):
    for checkpoint in list_checkpoints(finished_run):
        flip(checkpoint / "model.safetensors")
    capsys.readouterr()
    assert pretrain(tiny_shards, finished_run, "train.max_steps=6") == 1
    err = error_lines(capsys)
    assert err[-1].startswith("error: no checkpoint in") and "Traceback" not in "".join(err)


def test_damaged_encoder_is_never_evaluated(finished_run, tiny_shards, capsys):
    flip(finished_run / "encoder.safetensors")
    capsys.readouterr()
    code = main(["eval", "knn", str(finished_run), "--train", str(tiny_shards), "--test", str(tiny_shards),
                 "--workers", "0"])
    err = error_lines(capsys)
    assert code == 1 and len(err) == 1 and "does not match the sha256" in err[0]


def test_refused_pickle_in_a_checkpoint_is_one_error_line(finished_run, tiny_shards, capsys):
    import hashlib

    checkpoint = list_checkpoints(finished_run)[-1]
    marker = finished_run / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Evil()}, checkpoint / "optimizer.pt")
    sums = json.loads((checkpoint / "checksums.json").read_text())  # the attacker fixes the checksums too
    sums["optimizer.pt"] = hashlib.sha256((checkpoint / "optimizer.pt").read_bytes()).hexdigest()
    (checkpoint / "checksums.json").write_text(json.dumps(sums))
    capsys.readouterr()
    assert pretrain(tiny_shards, finished_run, "train.max_steps=6") == 1
    err = error_lines(capsys)
    assert err[-1].startswith("error: cannot load") and "UnpicklingError" in err[-1]
    assert "Traceback" not in "".join(err) and not marker.exists()


# -- 3. metrics after kill and resume --------------------------------------------------------


def test_each_step_is_logged_once_after_kill_and_resume(tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    extra = ["train.max_steps=60", "train.ckpt_every_steps=10", "train.tensorboard=true"]
    proc = spawn(tiny_shards, run, *extra)
    wait_for_step(run, 25, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert len(steps_logged(run)) >= 25 and len(steps_logged(run)) < 60
    resumed = spawn(tiny_shards, run, *extra)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert steps_logged(run) == list(range(1, 61))
    events = EventAccumulator(str(next((run / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == list(range(1, 61))


# -- 4. disk full ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_checkpoint(tiny_shards, small_disk, capsys):
    run = small_disk / "run"
    # one checkpoint (~0.9 MB) fits, a second one beside it does not
    code = pretrain(tiny_shards, run, "train.max_steps=20", "train.ckpt_every_steps=2", "train.keep_checkpoints=1")
    err = error_lines(capsys)
    assert code == 1 and err[-1].startswith("error: disk full while writing checkpoint step_00000004")
    assert "step_00000002 is intact" in err[-1] and "Traceback" not in "".join(err)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert verify(run / "checkpoints" / "step_00000002") is None
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle:  # now fill the disk to the last byte
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                pass
    capsys.readouterr()
    assert pretrain(tiny_shards, run, "train.max_steps=20", "train.ckpt_every_steps=2",
                    "train.keep_checkpoints=1") == 1
    err = error_lines(capsys)
    assert err[-1].startswith("error: disk full") and "Traceback" not in "".join(err)
    filler.unlink()
    assert verify(run / "checkpoints" / "step_00000002") is None


# -- 5. stale locks, runs that never took a step ---------------------------------------------


def test_killed_run_leaves_no_blocking_lock_and_no_phantom_run(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    proc = spawn(tiny_shards, run, "train.max_steps=400", "train.ckpt_every_steps=1000")
    wait_for_step(run, 3, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert (run / ".lock").exists() and (run / "config.yaml").exists() and not list_checkpoints(run)
    for args in (["eval", "knn", str(run), "--train", str(tiny_shards), "--test", str(tiny_shards)],
                 ["export", str(run), "--out", str(tmp_path / "export")], ["report", str(run)]):
        capsys.readouterr()
        assert main(args) == 2, args
        err = error_lines(capsys)
        assert len(err) == 1 and "no checkpoint yet" in err[0], err
    # raw pixels need no weights: that baseline runs on a run that never saved any
    assert main(["eval", "knn", str(run), "--train", str(tiny_shards), "--test", str(tiny_shards), "--pixels",
                 "--workers", "0", "--max-contamination", "1"]) == 0
    assert (run / "eval" / "knn.pixels.json").is_file()
    # a plain rerun (no --resume) starts afresh: nothing there was a run
    assert pretrain(tiny_shards, run, "train.max_steps=5", resume=False) == 0
    assert steps_logged(run) == [1, 2, 3, 4, 5]
    assert not (run / ".lock").exists()


# -- 11. SIGTERM to the whole process group --------------------------------------------------


def test_sigterm_to_the_process_group_checkpoints_and_exits_75(tiny_shards, tmp_path):
    run = tmp_path / "run"
    extra = ["train.max_steps=400", "train.ckpt_every_steps=1000", "data.num_workers=2"]
    proc = spawn(tiny_shards, run, *extra, start_new_session=True)  # its own process group, like a job step
    wait_for_step(run, 10, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # reaches the DataLoader workers too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "DataLoader worker" not in err
    (checkpoint,) = list_checkpoints(run)
    assert verify(checkpoint) is None and int(checkpoint.name.split("_")[1]) >= 10
