"""`train.compile=auto` decides from the run's own steps: a session too short, or estimated too short
to pay a compile back, stays eager and compiles nothing; a longer one compiles in place, keeps the
compiled steps only where they are measured faster, and goes back to eager otherwise; the choice
and its numbers are in run.json and metrics.jsonl."""

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
FIRST_DECISION = 1 + compiling.WARMUP + compiling.WINDOW  # step 1 starts the clock


class Compiled(torch.nn.Module):
    """What the stubbed torch.compile returns: the module itself, counting the steps through it."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile stubbed (a real compile takes tens of seconds): every module it made."""
    made: list[Compiled] = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: made.append(Compiled(module)) or made[-1])
    return made


def fake_clock(monkeypatch, made, compiled_seconds, compile_seconds=5.0):
    """Steps take 0.1 s eager, ``compiled_seconds`` through the compiled module (its first one
    ``compile_seconds`` more)."""
    state = {"now": 0.0, "calls": 0}

    def clock() -> float:
        calls = made[0].calls if made else 0
        if calls > state["calls"]:
            state["now"] += compiled_seconds + (compile_seconds if state["calls"] == 0 else 0.0)
        else:
            state["now"] += 0.1
        state["calls"] = calls
        return state["now"]

    monkeypatch.setattr(compiling, "clock", clock)


def _pretrain(shards, run, *extra) -> dict:
    assert main(["pretrain", "mae", "--data", str(shards), "--out", str(run), *ARGS, "train.compile=auto",
                 "train.log_every=100", *extra]) == 0
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {**json.loads((run / "run.json").read_text()), "events": [e for e in events if e.get("event") == "compile"]}


def test_a_short_session_stays_eager_without_compiling(tiny_shards, tmp_path, compiled):
    info = _pretrain(tiny_shards, tmp_path / "run", "train.max_steps=2")
    assert info["compile"] is False and "too short to time" in info["compile_reason"] and compiled == []
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(tmp_path / "x"), *ARGS,
                 "train.compile=sometimes"]) == 2


def test_a_session_estimated_too_short_to_pay_back_is_timed_but_not_compiled(tiny_shards, tmp_path, monkeypatch,
                                                                              compiled):
    fake_clock(monkeypatch, compiled, 0.01)
    info = _pretrain(tiny_shards, tmp_path / "run", "train.max_steps=40")
    assert info["compile"] is False and compiled == []
    assert "100 ms a step over 26 steps" in info["compile_reason"] and "not compiled" in info["compile_reason"]
    assert [e["step"] for e in info["events"]] == [FIRST_DECISION]


@pytest.mark.parametrize("compiled_seconds, chosen", [(0.05, True), (0.099, False)])
def test_a_long_session_keeps_compiled_steps_only_where_they_are_faster(tiny_shards, tmp_path, monkeypatch, compiled,
                                                                        compiled_seconds, chosen):
    """Step times stubbed (eager 0.1 s; compiled 2x faster, or within noise): the run really steps
    through the compiled module from the first decision on, and only keeps doing so when it pays."""
    fake_clock(monkeypatch, compiled, compiled_seconds)
    monkeypatch.setattr(compiling, "MIN_SECONDS", 1.0)
    info = _pretrain(tiny_shards, tmp_path / "run", "train.max_steps=40")
    decided = FIRST_DECISION + compiling.WARMUP + compiling.WINDOW
    assert info["compile"] is chosen and len(compiled) == 1  # compiled once: the run's own module
    assert f"{0.1 / compiled_seconds:.2f}x" in info["compile_reason"] and "the compile 5 s" in info["compile_reason"]
    assert ("kept" if chosen else "back to eager") in info["compile_reason"]
    assert compiled[0].calls == (40 - FIRST_DECISION if chosen else decided - FIRST_DECISION)
    assert [e["step"] for e in info["events"]] == [decided]


def test_explicit_settings_are_kept_and_checked():
    config = registry.pretrain_config("mae", None, ["train.compile=true"])
    assert compiling.initial(config.train.compile, 10**6) == (True, "set by train.compile", False)
    assert compiling.initial(False, 10**6)[:2] == (False, "set by train.compile")
    with pytest.raises(ConfigError, match="train.compile"):
        registry.pretrain_config("mae", None, ["train.compile=maybe"])
