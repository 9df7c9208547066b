"""The run directory's bookkeeping: which checkpoint to start from, config.yaml, run.json,
metrics.jsonl, and what a resumed run may change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vitpipe.runlayout import RunLayout
from vitpipe.atomic import write_text_atomic, writing
from vitpipe.config import ConfigError, PretrainConfig, save_config, to_dict
from vitpipe.ssl import registry
from vitpipe.ssl.engine import checkpoints
from vitpipe.ssl.engine.checkpoints import CheckpointError, list_checkpoints

RESUMABLE_CHANGES = {
    "data.shards", "data.num_workers", "train.max_steps", "train.log_every", "train.ckpt_every_steps",
    "train.ckpt_every_minutes", "train.keep_checkpoints", "train.tensorboard", "train.wandb", "train.mlflow",
    "train.record_keys", "train.nan_policy", "train.compile", "train.grad_checkpointing", "train.health_every",
    "train.collapse_min_std", "train.fsdp",
    "train.collapse_min_rank",
}
"""Settings a resumed run may change; any other change would make it another run."""


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; non-scalar leaves become strings (for trackers)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


def start_checkpoint(run_dir: Path, config: PretrainConfig, resume: str | None, is_main: bool) -> Path | None:
    """The checkpoint to resume from (or None), after refusing to clobber another run or to resume
    a different one. A directory whose run never completed a checkpoint is not a run yet."""
    if resume not in (None, "auto", "never") and not Path(resume).is_dir():
        raise ConfigError(f"--resume must be auto, never or a checkpoint directory; got {resume}")
    if resume == "auto":
        start = checkpoints.latest_verified(run_dir, checkpoints.log_stderr if is_main else _silent)
    elif resume in (None, "never"):
        if list_checkpoints(run_dir) or RunLayout(run_dir).encoder.exists():
            raise ConfigError(f"{run_dir} already holds a run; use --resume auto to continue it or another --out")
        start = None
    else:
        start = Path(resume)
        if (problem := checkpoints.verify(start)) is not None:
            raise CheckpointError(f"checkpoint {start} is damaged ({problem})")
    if start is not None:
        check_resumable(RunLayout(start.parent.parent).config, config)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, RunLayout(run_dir).config)
    return start


def check_resumable(saved: Path, config: PretrainConfig) -> None:
    if not saved.is_file():
        return
    before, now = flat(to_dict(registry.run_config(saved))), flat(to_dict(config))
    changed = sorted(key for key in set(before) | set(now)
                     if before.get(key) != now.get(key) and key not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed[:5])} differ(s) from the run in {saved.parent} "
                          f"({before.get(changed[0])!r} there, {now.get(changed[0])!r} now); use another --out")


def keep_metrics_up_to(run_dir: Path, step: int) -> None:
    """Drop records of steps after the checkpoint a run resumes from: those steps are redone, and
    each step must appear once in metrics.jsonl."""
    path = RunLayout(run_dir).metrics
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if line.strip() and _step_of(line) <= step]
    write_text_atomic(path, "".join(kept))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return sys.maxsize  # the torn last line of a killed run: dropped


def _silent(message: str) -> None:
    pass


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = RunLayout(run_dir).info
    return json.loads(path.read_text()) if path.exists() else {}


def update_run_info(run_dir: Path, values: dict[str, Any]) -> None:
    write_text_atomic(RunLayout(run_dir).info, json.dumps({**read_run_info(run_dir), **values}, indent=2))


class JsonLines:
    """An append-only JSONL file, flushed per line (metrics, audit)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def record_session(run_dir: Path, config: PretrainConfig, launch: dict[str, Any], resumed_from: int | None) -> None:
    """run.json: what the run is (objective, data manifest, code revision, launch) and one entry
    per session (start time, the step it resumed from, SLURM restarts)."""
    from vitpipe import __version__
    from vitpipe.pipeline.manifest import manifest_hash
    from vitpipe.pipeline.shardset import resolve_shards

    info = read_run_info(run_dir)
    info.setdefault("sessions", [])
    info.update({
        "objective": config.objective, "vitpipe_version": __version__, "git_revision": git_revision(),
        "data_shards": config.data.shards,
        "data_manifest_sha256": manifest_hash(Path(resolve_shards(config.data.shards).directory or ".")),
        **launch,
    })
    info["sessions"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "resumed_from_step": resumed_from,
                             "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")})
    info.pop("encoder_sha256", None)  # until this session exports a new encoder
    write_text_atomic(RunLayout(run_dir).info, json.dumps(info, indent=2))


def export_encoder(run_dir: Path, weights: dict, depth: int) -> None:
    """RUN/encoder.safetensors from the encoder's whole state dict (what eval and export read;
    decoders and heads are training-only), its sha256 and depth in run.json so a damaged file is
    never evaluated."""
    from safetensors.torch import save_file

    with writing(RunLayout(run_dir).encoder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp)
        digest = checkpoints.sha256_file(tmp)
    update_run_info(run_dir, {"encoder_sha256": digest, "encoder_depth": depth})


def progress_line(record: dict[str, Any], max_steps: int, global_batch: int) -> str:
    """``step 120/1000  loss 1.2345  lr 4.57e-04  img/s 27.4  eta 0:34:15`` (ETA at the last rate)."""
    rate = record["img_per_s"] / max(global_batch, 1)
    eta = (max_steps - record["step"]) / rate if rate > 0 else None
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None and eta < 86400 else "?"
    return (f"step {record['step']}/{max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"img/s {record['img_per_s']}  eta {eta_text}")
