"""`train.compile=auto`: a short run is left eager without compiling anything; a long one compiles
only when the measured saving beats the measured compile cost; the choice and its numbers are in
run.json."""

from __future__ import annotations

import json

import pytest
import torch

from test_trainer import RUN_ARGS
from vitpipe.cli import main
from vitpipe.config import ConfigError
from vitpipe.ssl import registry
from vitpipe.ssl.engine import compiling

ARGS = [*RUN_ARGS[:1], "data.image_size=16", "model.patch_size=4", "train.batch_size=8", "data.num_workers=0",
        "train.tensorboard=false", "train.precision=fp32"]


@pytest.fixture
def compile_calls(monkeypatch):
    """torch.compile recorded and made the identity (a real compile takes tens of seconds)."""
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(type(module).__name__) or module)
    return calls


def _info(run) -> dict:
    return json.loads((run / "run.json").read_text())


def test_a_short_run_stays_eager_without_compiling(tiny_shards, tmp_path, compile_calls):
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *ARGS, "train.max_steps=2",
                 "train.compile=auto"]) == 0
    info = _info(run)
    assert info["compile"] is False and "not measured" in info["compile_reason"] and compile_calls == []
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(tmp_path / "x"), *ARGS,
                 "train.compile=sometimes"]) == 2


@pytest.mark.parametrize("compiled_seconds, chosen", [(0.05, True), (0.099, False)])
def test_a_long_run_compiles_only_where_the_measurement_says_it_pays(tiny_shards, tmp_path, monkeypatch,
                                                                     compile_calls, compiled_seconds, chosen):
    """Step times stubbed (eager 0.1 s; compiled 2x faster, or within noise): the decision and the
    real wrapping follow the measurement, for a run long enough to be measured at all."""
    monkeypatch.setattr(compiling, "step_seconds",
                        lambda module, batch, autocast, rounds=3: 0.1 if compile_calls == [] else compiled_seconds)
    monkeypatch.setattr(compiling, "MIN_SECONDS", 1.0)
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *ARGS, "train.max_steps=40",
                 "train.compile=auto", "train.log_every=40"]) == 0
    info = _info(run)
    assert info["compile"] is chosen and "x eager" in info["compile_reason"]
    assert compile_calls == (["MAE", "MAE"] if chosen else ["MAE"])  # the throwaway, then the run's own


def test_explicit_settings_are_kept_and_checked():
    config = registry.pretrain_config("mae", None, ["train.compile=true"])
    assert compiling.decide(config.train.compile, None, None, 8, 10**6, None) == (True, "set by train.compile")
    with pytest.raises(ConfigError, match="train.compile"):
        registry.pretrain_config("mae", None, ["train.compile=maybe"])
