"""`train.compile=auto`: torch.compile where it pays for this run, decided from the run's own steps.

A compile costs tens of seconds (35-40 s for ViT-Ti/S on a 2-core CPU) and gave 7-9% on a step
timed alone, but a synthetic step timed alone understates a real one: a 2,400-step ViT-S MAE was
measured 1.05x that way and left eager, while compiled it ran 1.28x faster, compile included
(benchmarks/RESULTS.md, "compile=auto on a long run"); the loader workers, the optimizer and the
allocator are part of a real step. So `auto` starts eager and times the session's own optimizer
steps (wall time from one step's end to the next, the median of WINDOW after WARMUP): a session
whose eager estimate is under MIN_SECONDS stays eager and compiles nothing. A longer one compiles
its trainable module where it stands and times WINDOW compiled steps after WARMUP; it keeps them
when they are at least MIN_GAIN faster and goes back to eager otherwise (the compile's cost is then
spent once, as the throwaway measurement this replaced spent it). Every process takes the same
decision (times averaged over processes, at the same step). The choice and its numbers go into
run.json when taken.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

MIN_SECONDS = 900.0
"""Sessions estimated shorter than this (eager) are not compiled: a compile could not pay back."""
MIN_GAIN = 1.03
"""Compiled steps must be at least this much faster (below it: within the measurement's noise)."""
WARMUP = 3
"""Steps of each phase not timed (the first compiled ones include the compile and any recompile)."""
WINDOW = 10
"""Steps of each phase timed."""
clock = time.perf_counter


def initial(setting: bool | str, remaining_steps: int) -> tuple[bool, str, bool]:
    """(compile at setup?, reason, time the steps to decide?) for ``train.compile``."""
    if setting != "auto":
        return bool(setting), "set by train.compile", False
    if remaining_steps <= 2 * (WARMUP + WINDOW):
        return False, f"auto: a session of {remaining_steps} steps is too short to time; eager", False
    return False, "auto: eager while its first steps are timed (decided later in this session)", True


class AutoCompile:
    """The decision of `compile=auto` for one session, fed one call per optimizer step.

    ``swap(True)`` makes the step go through the compiled trainable module (compiling it the first
    time), ``swap(False)`` back through the eager one; ``average`` is the mean of a number over
    processes (the identity on one)."""

    def __init__(self, remaining_steps: int, swap: Callable[[bool], None], average: Callable[[float], float]) -> None:
        self.remaining, self.swap, self.average = remaining_steps, swap, average
        self.steps = 0
        self.phase = "eager"
        self.times: list[float] = []
        self.last: float | None = None
        self.eager = 0.0

    def after_step(self) -> tuple[bool, str] | None:
        """Time the step that just ended; the decision (compiled?, reason) at the step it is taken."""
        now = clock()
        elapsed, self.last = (None if self.last is None else now - self.last), now
        self.steps += 1
        if elapsed is None:
            return None
        self.times.append(elapsed)
        if len(self.times) < WARMUP + WINDOW:
            return None
        median = self.average(statistics.median(self.times[WARMUP:]))
        left = self.remaining - self.steps
        if self.phase == "eager":
            self.eager = median
            if median * left < MIN_SECONDS:
                return False, (f"auto: the rest of the session is estimated at {median * left:.0f} s eager "
                               f"({median * 1000:.0f} ms a step over {left} steps), under {MIN_SECONDS:.0f} s: "
                               "a compile could not pay back; not compiled")
            self.swap(True)
            self.phase, self.times = "compiled", []
            return None
        cost = self.average(sum(self.times[:WARMUP]) - WARMUP * median)
        gain = self.eager / median
        chosen = gain >= MIN_GAIN
        if not chosen:
            self.swap(False)
        return chosen, (f"auto: the run's compiled steps {gain:.2f}x its eager ones ({median * 1000:.0f} vs "
                        f"{self.eager * 1000:.0f} ms), the compile {cost:.0f} s, saving {(self.eager - median) * left:.0f} s "
                        f"over the {left} steps left (needs {MIN_GAIN}x); {'kept' if chosen else 'back to eager'}")

    @classmethod
    def for_session(cls, session, remaining_steps: int) -> "AutoCompile":
        """Swapping ``session``'s wrapped trainable module for its compiled self (compiled once,
        when first asked) and back; times averaged over the session's processes."""
        import functools

        import torch

        eager, accelerator = session.wrapped, session.accelerator
        compiled = functools.cache(lambda: torch.compile(eager))

        def average(value: float) -> float:
            return accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="mean").item()

        return cls(remaining_steps, lambda on: session.use(compiled() if on else eager), average)


def record(run_dir, session, chosen: bool, reason: str) -> None:
    """The decision in run.json (replacing the session's provisional one) and in metrics.jsonl."""
    from vitpipe.ssl.engine import rundir

    if session.accelerator.is_main_process:
        rundir.update_run_info(run_dir, {"compile": chosen, "compile_reason": reason})
        session.metrics.write({"step": session.state.step, "event": "compile", "compile": chosen, "reason": reason})
