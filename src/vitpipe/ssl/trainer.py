"""The training loop: the only module that knows about Accelerate, checkpoints, signals and logs.

It takes any objective from the registry (``forward(batch) -> Output``, ``on_step_end``) and the
shard loader, and never looks inside either. Schedules are in optimizer steps.

Exit codes of a run: 0 done, 1 failure (e.g. NaN loss), 75 (EX_TEMPFAIL) stopped by SIGTERM or
SIGUSR1 after a complete checkpoint; rerun the same command with ``--resume auto``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vitpipe import __version__
from vitpipe.config import ConfigError, PretrainConfig, save_config, to_dict
from vitpipe.pipeline.loader import LoaderSpec, ShardDataset, make_loader, resolve_shards
from vitpipe.pipeline.manifest import manifest_hash
from vitpipe.pipeline.transforms import TransformSpec
from vitpipe.ssl import checkpoints
from vitpipe.ssl.checkpoints import CheckpointError, list_checkpoints
from vitpipe.ssl.objective import Objective

EXIT_PREEMPTED = 75
RESUMABLE_CHANGES = {
    "data.shards", "data.num_workers", "train.max_steps", "train.log_every", "train.ckpt_every_steps",
    "train.ckpt_every_minutes", "train.keep_checkpoints", "train.tensorboard", "train.wandb",
    "train.record_keys", "train.nan_policy",
}
"""Settings a resumed run may change; any other change would make it another run."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); nothing bad was checkpointed."""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written. Exit with EXIT_PREEMPTED."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by signal at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


# ---------------------------------------------------------------------------------------------
# Launch checks
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def param_groups(model: Objective, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """No decay for norms, biases (1-D parameters), position embeddings and tokens; per-parameter
    learning-rate scales from the objective (layer-wise decay) become separate groups."""
    skip = model.no_weight_decay()
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name in skip or name.endswith("token"))
        groups.setdefault((decay, model.lr_scale(name)), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))]


def lr_factor(step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to ``min_ratio`` at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_lr(config: PretrainConfig, global_batch: int) -> float:
    return config.optim.lr or config.optim.base_lr * global_batch / 256


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Samples consumed by all processes together."""
    epoch: int = 0
    """Data epoch (drives shard order and shuffles)."""
    batches_in_epoch: int = 0
    """Micro-batches of this epoch already consumed (per process): the data position."""
    wall_seconds: float = 0.0
    """Training time accumulated over all sessions of this run."""


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    final_loss: float | None
    seconds: float
    images_per_second: float
    checkpoint: Path | None
    resumed_from: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    is_main: bool = True


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def requeue_slurm_job() -> bool:
    """Under SLURM, ask it to requeue this job (exiting non-zero alone marks it FAILED)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job or shutil.which("scontrol") is None:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"vitpipe: scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr)
    return result.returncode == 0


class RunLock:
    """One writer per run directory: a second job on the same run gets a clear error."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.handle = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise ConfigError(f"{self.path.parent} is being written by {holder}; one job per run directory") from None
            try:  # the holder we waited for may have removed the file meanwhile: lock the one on disk
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        self.handle = handle
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


class Trainer:
    def __init__(self, config: PretrainConfig, run_dir: Path, build_objective: Callable[[PretrainConfig], Objective],
                 resume: str | None = None, progress: bool | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.build_objective = build_objective
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress

    # -- setup -----------------------------------------------------------------------------

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        train = self.config.train
        cuda = torch.cuda.is_available()
        precision = train.precision
        if precision == "auto":
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        trackers = ["tensorboard"] if train.tensorboard else []
        if train.wandb:
            trackers.append("wandb")
        accelerator = Accelerator(
            cpu=not cuda,  # a plain Accelerator() on a GPU-less --multi_gpu launch trains N unlinked copies
            mixed_precision={"fp32": "no"}.get(precision, precision),
            gradient_accumulation_steps=train.grad_accum,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "tb")),
            step_scheduler_with_optimizer=False,
        )
        check_launch(accelerator.num_processes)
        return accelerator, precision

    def _loader(self, objective: Objective, rank: int, world: int) -> tuple[ShardDataset, Any]:
        data, train = self.config.data, self.config.train
        shards = resolve_shards(data.shards)
        transform = TransformSpec(objective.transform_preset, data.image_size, data.channels, data.crop_scale_min,
                                  data.hflip, tuple(data.mean), tuple(data.std))
        fields = tuple(objective.batch_fields) + (("key",) if train.record_keys and "key" not in objective.batch_fields else ())
        spec = LoaderSpec(shards, train.batch_size, transform, train=True, fields=fields,
                          subset_fraction=data.subset_fraction,
                          seed=train.seed, shuffle_buffer=data.shuffle_buffer,
                          samples_per_epoch=data.samples_per_epoch, resampled=data.resampled,
                          max_error_rate=data.max_error_rate, rank=rank, world_size=world,
                          batch_hook=objective.batch_hook())
        return make_loader(spec, data.num_workers)

    def _prepare_run_dir(self, is_main: bool) -> Path | None:
        """Return the checkpoint to resume from (or None). Refuse to clobber another run. A
        directory whose run never completed a checkpoint is not a run yet: it is started afresh."""
        if self.resume not in (None, "auto", "never") and not Path(self.resume).is_dir():
            raise ConfigError(f"--resume must be auto, never or a checkpoint directory; got {self.resume}")
        if self.resume == "auto":
            start = checkpoints.latest_verified(self.run_dir, checkpoints.log_stderr if is_main else _silent)
        elif self.resume in (None, "never"):
            if list_checkpoints(self.run_dir) or (self.run_dir / "encoder.safetensors").exists():
                raise ConfigError(f"{self.run_dir} already holds a run; use --resume auto to continue it or "
                                  "another --out")
            start = None
        else:
            start = Path(self.resume)
            problem = checkpoints.verify(start)
            if problem:
                raise CheckpointError(f"checkpoint {start} is damaged ({problem})")
        if start is not None:
            self._check_resumable(start.parent.parent / "config.yaml")
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
        return start

    def _check_resumable(self, saved: Path) -> None:
        if not saved.is_file():
            return
        from vitpipe.config import load_config

        before, now = _flat(to_dict(load_config(PretrainConfig, saved))), _flat(to_dict(self.config))
        changed = sorted(key for key in set(before) | set(now)
                         if before.get(key) != now.get(key) and key not in RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"--resume: {', '.join(changed[:5])} differ(s) from the run in {self.run_dir} "
                              f"({before.get(changed[0])!r} there, {now.get(changed[0])!r} now); use another --out")

    def _keep_metrics_up_to(self, step: int) -> None:
        """Drop records of steps after the checkpoint a run resumes from: those steps are redone,
        and each step must appear once in metrics.jsonl."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and _step_of(line) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> RunSummary:
        accelerator, precision = self._accelerator()
        if self.config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        lock = RunLock(self.run_dir)
        if accelerator.is_main_process:
            lock.acquire()
        try:
            return self._run(accelerator, precision)
        finally:
            lock.release()

    def _run(self, accelerator, precision: str) -> RunSummary:
        from accelerate.utils import send_to_device, set_seed

        config, train = self.config, self.config.train
        start_checkpoint = self._prepare_run_dir(accelerator.is_main_process)
        set_seed(train.seed)  # identical initial parameters on every rank
        objective = self.build_objective(config)
        dataset, loader = self._loader(objective, accelerator.process_index, accelerator.num_processes)
        global_batch = train.batch_size * train.grad_accum * accelerator.num_processes
        lr = peak_lr(config, global_batch)
        optimizer = torch.optim.AdamW(param_groups(objective, config.optim.weight_decay, lr), lr=lr,
                                      betas=tuple(config.optim.betas))
        warmup = config.optim.warmup_steps or int(config.optim.warmup_fraction * train.max_steps)
        min_ratio = config.optim.min_lr / lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, train.max_steps, warmup, min_ratio))
        if train.compile:
            objective = torch.compile(objective)
        model, optimizer = accelerator.prepare(objective, optimizer)
        set_seed(train.seed + accelerator.process_index)  # masks differ across ranks
        state = TrainState()
        if start_checkpoint is not None:
            saved = checkpoints.load(start_checkpoint, accelerator, model, optimizer, scheduler)
            state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__})
        resumed_from = state.step if start_checkpoint is not None else None

        if accelerator.is_main_process:
            self._keep_metrics_up_to(state.step)
            self._write_run_info(accelerator, precision, global_batch, lr, warmup, resumed_from)
            accelerator.init_trackers("pretrain", config=_flat(to_dict(config)),
                                      init_kwargs={"tensorboard": {"purge_step": state.step + 1}})
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
        audit_file = None
        if train.record_keys:
            (self.run_dir / "audit").mkdir(parents=True, exist_ok=True)
            audit_file = open(self.run_dir / "audit" / f"rank{accelerator.process_index}.jsonl", "a")
        stop = StopFlag()
        stop.install()
        bar = None
        if self.progress and accelerator.is_main_process:
            from tqdm import tqdm
            bar = tqdm(total=train.max_steps, initial=state.step, desc=f"pretrain {config.objective}",
                       dynamic_ncols=True)

        session_start = time.monotonic()
        last_ckpt_time = time.monotonic()
        last_log_time, last_log_samples = time.monotonic(), state.samples_seen
        wall_before = state.wall_seconds
        last_checkpoint: Path | None = None
        last_loss: float | None = None
        decode_errors = 0
        consecutive_skips = 0
        try:
            while state.step < train.max_steps:
                dataset.set_position(state.epoch, state.batches_in_epoch)
                for batch in loader:
                    decode_errors += sum(batch.pop("skipped").values()) + len(batch.pop("shard_errors"))
                    if audit_file is not None:
                        keys = batch["key"] if "key" in objective.batch_fields else batch.pop("key")
                        _log_line(audit_file, {"step": state.step + 1, "keys": keys})
                    batch = send_to_device(batch, accelerator.device)
                    with accelerator.accumulate(model):
                        output = model(batch)
                        # one all-reduce per micro-batch: non-finite loss, stop signal, checkpoint due
                        flags = torch.tensor([0.0 if torch.isfinite(output.loss.detach()) else 1.0,
                                              1.0 if stop.signal else 0.0,
                                              1.0 if self._checkpoint_due(state.step + 1, last_ckpt_time) else 0.0],
                                             device=accelerator.device)
                        flags = accelerator.reduce(flags, reduction="sum").tolist()
                        finite = flags[0] == 0
                        if finite:
                            accelerator.backward(output.loss)
                            if accelerator.sync_gradients and config.optim.clip_grad > 0:
                                accelerator.clip_grad_norm_(model.parameters(), config.optim.clip_grad)
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    state.batches_in_epoch += 1
                    if not finite:
                        if train.nan_policy == "error":
                            raise TrainingError(f"non-finite loss at step {state.step + 1}; the last checkpoint "
                                                "is still good (lower optim.base_lr or set optim.clip_grad)")
                        consecutive_skips += 1
                        if consecutive_skips >= 10:
                            raise TrainingError(f"10 non-finite losses in a row at step {state.step + 1}")
                        if accelerator.is_main_process:
                            _log_line(metrics_file, {"step": state.step + 1, "event": "skipped_nonfinite_loss"})
                        continue
                    consecutive_skips = 0
                    if not accelerator.sync_gradients:
                        continue
                    scheduler.step()
                    state.step += 1
                    state.samples_seen += global_batch
                    accelerator.unwrap_model(model).on_step_end(state.step, train.max_steps)
                    if state.step % train.log_every == 0 or state.step == train.max_steps:
                        loss = accelerator.reduce(output.loss.detach().float(), reduction="mean").item()
                        last_loss = loss
                        if accelerator.is_main_process:
                            now = time.monotonic()
                            record = {
                                "step": state.step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                                "samples": state.samples_seen, "epoch": state.epoch,
                                "img_per_s": round((state.samples_seen - last_log_samples) / max(now - last_log_time, 1e-9), 1),
                                "decode_errors": decode_errors,
                                **{k: float(v) for k, v in output.metrics.items()},
                            }
                            last_log_time, last_log_samples = now, state.samples_seen
                            _log_line(metrics_file, record)
                            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
                            if bar is not None:
                                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                                                img_s=record["img_per_s"])
                    if bar is not None:
                        bar.update(1)
                    state.wall_seconds = wall_before + time.monotonic() - session_start
                    signalled = flags[1] > 0
                    if (flags[2] > 0 or signalled) and state.step < train.max_steps:
                        last_checkpoint = self._save(accelerator, model, optimizer, scheduler, state)
                        last_ckpt_time = time.monotonic()
                    if signalled and state.step < train.max_steps:
                        if accelerator.is_main_process and "SLURM_JOB_ID" in os.environ:
                            requeued = requeue_slurm_job()
                            _log_line(metrics_file, {"step": state.step, "event": "preempted",
                                                     "slurm_requeued": requeued})
                        raise Preempted(state.step, last_checkpoint)
                    if state.step >= train.max_steps:
                        break
                else:
                    state.epoch += 1
                    state.batches_in_epoch = 0
            last_checkpoint = self._save(accelerator, model, optimizer, scheduler, state)
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            for handle in (metrics_file, audit_file):
                if handle is not None:
                    handle.close()
            accelerator.end_training()
        seconds = time.monotonic() - session_start
        images = (state.samples_seen - (resumed_from or 0) * global_batch) / max(seconds, 1e-9)
        if train.record_keys:
            fingerprint = sum(p.detach().double().abs().sum().item() for p in accelerator.unwrap_model(model).parameters())
            (self.run_dir / "audit" / f"rank{accelerator.process_index}.final.json").write_text(
                json.dumps({"param_abs_sum": fingerprint, "global_batch": global_batch,
                            "world_size": accelerator.num_processes}))
        if accelerator.is_main_process:
            self._export_encoder(accelerator.unwrap_model(model))
        return RunSummary(self.run_dir, state.step, last_loss, seconds, images, last_checkpoint, resumed_from,
                          {"decode_errors": decode_errors}, accelerator.is_main_process)

    def _checkpoint_due(self, step: int, last_ckpt_time: float) -> bool:
        train = self.config.train
        return bool((train.ckpt_every_steps and step % train.ckpt_every_steps == 0) or (
            train.ckpt_every_minutes and time.monotonic() - last_ckpt_time > 60 * train.ckpt_every_minutes))

    def _save(self, accelerator, model, optimizer, scheduler, state: TrainState) -> Path:
        return checkpoints.save(accelerator, model, optimizer, scheduler, dict(state.__dict__), self.run_dir,
                                self.config.train.keep_checkpoints)

    def _export_encoder(self, objective: Objective) -> None:
        """The encoder alone, for eval and export (the decoder/heads are training-only); its sha256
        goes to run.json so a damaged file is never evaluated."""
        from safetensors.torch import save_file

        encoder = objective.encoder()
        tmp = self.run_dir / "encoder.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, tmp)
        digest = checkpoints.sha256_file(tmp)
        os.replace(tmp, self.run_dir / "encoder.safetensors")
        _update_run_info(self.run_dir, {"encoder_sha256": digest})

    def _write_run_info(self, accelerator, precision, global_batch, lr, warmup, resumed_from) -> None:
        info_path = self.run_dir / "run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {"sessions": []}
        info.update({
            "objective": self.config.objective, "vitpipe_version": __version__, "git_revision": git_revision(),
            "data_shards": self.config.data.shards,
            "data_manifest_sha256": manifest_hash(Path(resolve_shards(self.config.data.shards).directory or ".")),
            "world_size": accelerator.num_processes, "device": str(accelerator.device), "precision": precision,
            "global_batch": global_batch, "peak_lr": lr, "warmup_steps": warmup,
        })
        info["sessions"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "resumed_from_step": resumed_from,
                                 "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")})
        info.pop("encoder_sha256", None)  # until this session exports a new encoder
        _write_json_atomic(info_path, info)


def _update_run_info(run_dir: Path, values: dict[str, Any]) -> None:
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    _write_json_atomic(info_path, {**info, **values})


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return sys.maxsize  # the torn last line of a killed run: dropped


def _silent(message: str) -> None:
    pass


def _log_line(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
