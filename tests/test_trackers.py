"""train.mlflow and train.wandb log through accelerate; a resumed run continues the same tracker run."""

from __future__ import annotations

import json

import pytest

from test_trainer import RUN_ARGS
from vitpipe.cli import main


def test_mlflow_file_store_gets_the_metrics_and_a_resume_continues_the_same_run(tiny_shards, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    args = ["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS, "train.mlflow=true"]
    assert main([*args, "train.max_steps=2"]) == 0
    run_id = json.loads((run / "run.json").read_text())["trackers"]["mlflow"]
    assert main([*args, "train.max_steps=4", "--resume", "auto"]) == 0
    assert json.loads((run / "run.json").read_text())["trackers"]["mlflow"] == run_id
    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # both sessions in one MLflow run
    assert client.get_run(run_id).data.params["objective"] == "mae"


def test_mlflow_honours_the_tracking_uri(tiny_shards, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "server-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS, "train.mlflow=true",
                 "train.max_steps=1"]) == 0
    run_id = json.loads((run / "run.json").read_text())["trackers"]["mlflow"]
    assert mlflow.tracking.MlflowClient(tracking_uri=store.as_uri()).get_run(run_id).info.run_name == "run"
    assert not (run / "mlruns").exists()


def test_wandb_offline_resumes_the_same_run(tiny_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = ["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS, "train.wandb=true"]
    assert main([*args, "train.max_steps=1"]) == 0
    first = json.loads((run / "run.json").read_text())["trackers"]["wandb"]
    assert main([*args, "train.max_steps=2", "--resume", "auto"]) == 0
    assert json.loads((run / "run.json").read_text())["trackers"]["wandb"] == first
    assert list((run / "wandb").glob(f"offline-run-*-{first}"))
