"""`train.compile=auto` decides from the run's own steps: a session too short, or estimated too short
to pay a compile back, stays eager and compiles nothing; a longer one compiles in place, times
compiled and eager steps in alternating blocks, keeps the compiled module only where its steps are
faster, and goes back to eager otherwise; the choice and its numbers are in run.json and
metrics.jsonl."""

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


def fake_clock(monkeypatch, made, compiled_seconds, eager_seconds=lambda step: 0.1, compile_seconds=5.0):
    """Steps take ``eager_seconds(step)`` eager, ``compiled_seconds`` through the compiled module
    (its first one ``compile_seconds`` more)."""
    state = {"now": 0.0, "calls": 0, "step": 0}

    def clock() -> float:
        calls = made[0].calls if made else 0
        state["step"] += 1
        if calls > state["calls"]:
            state["now"] += compiled_seconds + (compile_seconds if state["calls"] == 0 else 0.0)
        else:
            state["now"] += eager_seconds(state["step"])
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
    info = _pretrain(tiny_shards, tmp_path / "run", "train.max_steps=60")
    assert info["compile"] is False and compiled == []
    assert "100 ms a step over 46 steps" in info["compile_reason"] and "risk a compile" in info["compile_reason"]
    assert [e["step"] for e in info["events"]] == [FIRST_DECISION]


def slowing(step: int) -> float:
    """An eager step that slows as the run goes on (as ViT-S MAE's did here, ~376 -> ~400 ms)."""
    return 0.1 if step < 20 else 0.12


@pytest.mark.parametrize("compiled_seconds, eager_seconds, chosen, gain", [
    (0.05, lambda step: 0.1, True, "2.00x"),
    (0.099, lambda step: 0.1, False, "1.01x"),
    (0.11, slowing, True, "1.09x"),  # timed back to back, eager's first steps would have said 0.91x
])
def test_a_long_session_keeps_compiled_steps_only_where_they_are_faster(tiny_shards, tmp_path, monkeypatch, compiled,
                                                                        compiled_seconds, eager_seconds, chosen, gain):
    """Step times stubbed: the run really steps through the compiled module from the first decision
    on, in alternating blocks against eager, and only keeps doing so when it pays."""
    fake_clock(monkeypatch, compiled, compiled_seconds, eager_seconds)
    monkeypatch.setattr(compiling, "MIN_SECONDS", 1.0)
    info = _pretrain(tiny_shards, tmp_path / "run", "train.max_steps=60")
    decided = FIRST_DECISION + compiling.WARMUP + compiling.BLOCK * compiling.ROUNDS
    assert info["compile"] is chosen and len(compiled) == 1  # compiled once: the run's own module
    assert f"{gain} its eager" in info["compile_reason"] and "the compile 5 s" in info["compile_reason"]
    assert ("kept" if chosen else "back to eager") in info["compile_reason"]
    trial = compiling.WARMUP + compiling.BLOCK * compiling.ROUNDS // 2  # warm-up, then every other block
    assert compiled[0].calls == trial + (60 - decided if chosen else 0)
    assert [e["step"] for e in info["events"]] == [decided]


def test_explicit_settings_are_kept_and_checked():
    config = registry.pretrain_config("mae", None, ["train.compile=true"])
    assert compiling.initial(config.train.compile, 10**6) == (True, "set by train.compile", False)
    assert compiling.initial(False, 10**6)[:2] == (False, "set by train.compile")
    with pytest.raises(ConfigError, match="train.compile"):
        registry.pretrain_config("mae", None, ["train.compile=maybe"])


def test_every_process_takes_the_same_decision(monkeypatch):
    """Two processes in lockstep (threads; ``average`` meets at a barrier as the all-reduce does):
    one sees compiled steps 2x faster, the other none faster. Alone they would decide apart; on
    the averaged times both keep the compiled module, at the same step."""
    import threading

    monkeypatch.setattr(compiling, "MIN_SECONDS", 1.0)
    step_seconds = {0: {False: 0.1, True: 0.05}, 1: {False: 0.1, True: 0.1}}
    barrier, shared, local = threading.Barrier(2), {}, threading.local()
    decisions: dict[int, list] = {0: [], 1: []}

    def clock() -> float:
        local.now += step_seconds[local.rank][local.trial.using]
        return local.now

    def average(value: float) -> float:
        shared[local.rank] = value
        barrier.wait()
        mean = sum(shared.values()) / 2
        barrier.wait()
        return mean

    def process(rank: int) -> None:
        local.rank, local.now = rank, 0.0
        local.trial = compiling.AutoCompile(200, lambda on: None, average)
        for step in range(1, 201):
            decided = local.trial.after_step()
            if decided is not None:
                decisions[rank].append((step, decided[0]))
                return

    monkeypatch.setattr(compiling, "clock", clock)
    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    decided_at = 1 + 2 * compiling.WARMUP + compiling.WINDOW + compiling.BLOCK * compiling.ROUNDS
    assert decisions[0] == decisions[1] == [(decided_at, True)]
