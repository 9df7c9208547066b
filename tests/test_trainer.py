"""The training loop's promises: CLI smoke, resume after SIGTERM and SIGKILL with identical losses,
atomic checkpoints under failing disks, NaN handling, launch checks."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitpipe.cli import main
from vitpipe.config import PretrainConfig
from vitpipe.ssl import registry
from vitpipe.ssl.engine.launch import check_launch
from vitpipe.ssl.registry import build_objective
from vitpipe.ssl.engine.schedules import warmup_cosine
from vitpipe.ssl.engine.checkpoints import CheckpointError, list_checkpoints
from vitpipe.ssl.engine.trainer import EXIT_PREEMPTED, Trainer, TrainingError

RUN_ARGS = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
            "mae.decoder_depth=1", "train.batch_size=8", "train.log_every=1", "data.num_workers=0",
            "data.shuffle_buffer=10", "train.tensorboard=false"]


def losses(run: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def test_pretrain_cli_smoke(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS,
                 "train.max_steps=6", "train.tensorboard=true"]) == 0
    # no terminal (a SLURM log, a pipe): a plain line per logged step instead of a progress bar
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and lines[-1].startswith("step 6/6  loss ") and "img/s" in lines[-1] and "eta" in lines[-1]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in records)
    assert (run / "config.yaml").is_file() and (run / "encoder.safetensors").is_file()
    assert list((run / "tb").rglob("events.out.tfevents*"))
    info = json.loads((run / "run.json").read_text())
    assert info["global_batch"] == 8 and info["data_manifest_sha256"]
    # a second plain start refuses to clobber the run; --resume auto on a finished run is a no-op
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS, "train.max_steps=6"]) == 2
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), "--resume", "auto", *RUN_ARGS,
                 "train.max_steps=6"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--format", "timm"]) == 0
    assert (tmp_path / "exp" / "model.safetensors").is_file()
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "AutoModel.from_pretrained" in card
    assert "steps: 6" in card and (tmp_path / "hf" / "preprocessor_config.json").is_file()
    assert info["data_manifest_sha256"] in card


@pytest.mark.parametrize("args,message", [
    (["pretrain", "mae", "--data", "/nope", "--out", "OUT"], "shard not found"),
    (["pretrain", "nope", "--data", "DATA", "--out", "OUT"], "unknown objective"),
    (["pretrain", "mae", "--data", "DATA", "--out", "OUT", "train.max_step=3"], "unknown config key"),
    (["pretrain", "mae", "--data", "DATA", "--out", "OUT", "data.image_size=18"], "not a multiple"),
    (["pretrain", "mae", "--data", "DATA", "--out", "OUT", "--config", "MISSING"], "config file not found"),
    (["export", "OUT", "--out", "EXP"], "neither a run directory"),
])
def test_bad_inputs_exit_2(tiny_shards, tmp_path, capsys, args, message):
    names = {"DATA": str(tiny_shards), "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "no.yaml"),
             "EXP": str(tmp_path / "exp")}
    assert main([names.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_schedule_warmup_then_cosine():
    values = [warmup_cosine(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:])) and values[-1] < 0.01


def run_cli_subprocess(shards, run, extra, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "vitpipe", "pretrain", "mae", "--data", str(shards), "--out",
                             str(run), "--resume", "auto", *RUN_ARGS, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_step(run: Path, step: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(losses(run)) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("run did not reach step %d" % step)


@pytest.mark.parametrize("how,workers", [("sigterm", 0), ("sigkill", 2)])
def test_interrupted_run_resumes_with_identical_losses(tiny_shards, tmp_path, how, workers):
    # 80 steps: ~13 epochs of the 23 samples (each epoch starts the loader workers anew); the kill
    # lands at step 12
    extra = ["train.max_steps=80", "train.ckpt_every_steps=5", "train.seed=3", f"data.num_workers={workers}"]
    reference = tmp_path / "reference"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(reference), *RUN_ARGS, *extra]) == 0
    expected = {step: values[0] for step, values in losses(reference).items()}
    assert len(expected) == 80

    run = tmp_path / "run"
    proc = run_cli_subprocess(tiny_shards, run, extra)
    wait_for_step(run, 12, proc)
    proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    proc.wait(timeout=60)
    if how == "sigterm":
        assert proc.returncode == EXIT_PREEMPTED
    stopped_at = max(losses(run))
    assert stopped_at < 80, "the run finished before it could be interrupted"
    resumed = run_cli_subprocess(tiny_shards, run, extra)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    got = losses(run)
    assert sorted(got) == list(range(1, 81))
    for step, values in got.items():  # steps redone after SIGKILL are logged once, as redone
        assert values == [pytest.approx(expected[step], abs=1e-6)], step
    assert len(list_checkpoints(run)) <= 2  # pruned to keep_checkpoints


def tiny_config(shards, *extra) -> PretrainConfig:
    return registry.pretrain_config("mae", None, [*RUN_ARGS, f"data.shards={shards}", *extra])


def test_failing_disk_leaves_previous_checkpoint_loadable(tiny_shards, tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    config = tiny_config(tiny_shards, "train.max_steps=6", "train.ckpt_every_steps=2")
    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def failing_save(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way through writing the weights
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(CheckpointError, match="disk full .* step_00000002 is intact"):
        Trainer(config, run, build_objective, progress=False).run()
    checkpoints = list_checkpoints(run)
    assert [c.name for c in checkpoints] == ["step_00000002"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # no temp dir left
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    summary = Trainer(config, run, build_objective, resume="auto", progress=False).run()
    assert summary.resumed_from == 2 and summary.steps == 6


def test_nan_loss_stops_and_is_never_checkpointed(tiny_shards, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(tiny_shards, "train.max_steps=10", "train.ckpt_every_steps=1")

    def poisoned(cfg, artifacts):
        objective = build_objective(cfg, artifacts)
        original = objective.forward
        calls = {"n": 0}

        def forward(batch):
            calls["n"] += 1
            output = original(batch)
            if calls["n"] >= 4:
                output.loss = output.loss * float("nan")
            return output

        objective.forward = forward
        return objective

    with pytest.raises(TrainingError, match="non-finite loss at step 4"):
        Trainer(config, run, poisoned, progress=False).run()
    from safetensors.torch import load_file
    for checkpoint in list_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
    assert max(int(c.name.split("_")[1]) for c in list_checkpoints(run)) == 3

    skip_run = tmp_path / "skip"
    skip_config = tiny_config(tiny_shards, "train.max_steps=10", "train.nan_policy=skip")
    with pytest.raises(TrainingError, match="10 non-finite losses in a row"):
        Trainer(skip_config, skip_run, poisoned, progress=False).run()


def test_launch_checks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="train its own copy"):
        check_launch(1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setattr("vitpipe.ssl.engine.launch._parent_cmdline",
                        lambda: ["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "vitpipe"])
    with pytest.raises(Exception, match="starts only ONE process"):
        check_launch(1)
    monkeypatch.setattr("vitpipe.ssl.engine.launch._parent_cmdline", lambda: ["accelerate", "launch", "--cpu", "-m", "x"])
    check_launch(1)


def test_compiled_run_writes_checkpoints_and_encoders_that_load(tiny_shards, tmp_path):
    """torch.compile wraps the objective (state-dict keys gain `_orig_mod.`); what is saved must not."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS, "train.max_steps=2",
                 "train.compile=true"]) == 0
    checkpoint = list_checkpoints(run)[-1]
    assert not any("_orig_mod" in key for key in load_file(checkpoint / "model.safetensors"))
    assert not any("_orig_mod" in key for key in load_file(run / "encoder.safetensors"))
    # an uncompiled session resumes the compiled run's checkpoint (strict load), then exports
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), "--resume", "auto", *RUN_ARGS,
                 "train.max_steps=4"]) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert main(["export", str(checkpoint.parent / "step_00000004"), "--out", str(tmp_path / "exp")]) == 0


def test_weight_decay_schedule_and_adam_eps(tiny_shards, tmp_path):
    """optim.weight_decay_end makes weight decay a cosine over training (I-JEPA's 0.04 -> 0.4) on the
    decaying groups only; optim.eps reaches AdamW."""
    from vitpipe.ssl.engine import optim

    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS, "train.max_steps=8",
                 "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.eps=1e-6"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    decays = [r["weight_decay"] for r in records]
    assert decays == sorted(decays) and decays[-1] == pytest.approx(0.4) and decays[0] > 0.04
    config = tiny_config(tiny_shards, "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.eps=1e-6",
                         "train.max_steps=8")
    optimizer, *_ = optim.build(build_objective(config), config, 8)
    assert optimizer.defaults["eps"] == 1e-6
    assert optim.update_weight_decay(optimizer, config, 4) == pytest.approx(0.22)
    assert sorted(round(g["weight_decay"], 6) for g in optimizer.param_groups) == [0.0, 0.22]
