"""The experiment trackers a run logs to through accelerate: TensorBoard (RUN/tb), Weights & Biases,
MLflow (a file store under RUN/mlruns unless MLFLOW_TRACKING_URI names a server). A resumed run
continues the same W&B and MLflow runs: their ids are kept in run.json."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitpipe.config import ConfigError


def names(train: Any) -> list[str]:
    """accelerate's tracker names for ``train`` (a TrainConfig), refused early when one is missing."""
    chosen = [name for name, on in (("tensorboard", train.tensorboard), ("wandb", train.wandb),
                                    ("mlflow", train.mlflow)) if on]
    for name, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if name in chosen:
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(f"train.{name}=true needs {module}: pip install '{module}'") from None
    return chosen


def init_kwargs(run_dir: Path, train: Any, info: dict[str, Any], step: int) -> dict[str, dict[str, Any]]:
    """accelerate's ``init_trackers`` kwargs: TensorBoard drops events past the resumed step; W&B
    and MLflow reopen the run recorded in run.json (``info``) or start one named after the run."""
    if train.mlflow:
        import mlflow

        if "MLFLOW_TRACKING_URI" not in os.environ:
            # MLflow 3 keeps its file store only on request; a file store beside the run needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # set every time: an earlier run of this process set its own
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri())
    ids = info.get("trackers", {})
    wandb = {"name": run_dir.name, "dir": str(run_dir)}
    if ids.get("wandb"):
        wandb.update(id=ids["wandb"], resume="allow")
    mlflow = {"run_name": run_dir.name}
    if ids.get("mlflow"):
        mlflow["run_id"] = ids["mlflow"]
    return {"tensorboard": {"purge_step": step + 1}, "wandb": wandb, "mlflow": mlflow}


def run_ids(accelerator) -> dict[str, str]:
    """The W&B and MLflow run ids of a started session (what a resume reopens)."""
    ids = {}
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
    return ids
