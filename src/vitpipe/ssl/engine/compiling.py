"""`train.compile=auto`: torch.compile where it pays for this run, decided from the run's own steps.

A compile costs tens of seconds (35-40 s for ViT-Ti/S on a 2-core CPU) and gave 7-9% on a step
timed alone, but a synthetic step timed alone understates a real one: a 2,400-step ViT-S MAE was
measured 1.05x that way and left eager, while compiled it ran 1.28x faster, compile included
(benchmarks/RESULTS.md, "compile=auto on a long run"); the loader workers, the optimizer and the
allocator are part of a real step. So `auto` starts eager and times the session's own optimizer
steps (wall time from one step's end to the next, the median of WINDOW after WARMUP): a session
whose eager estimate is under MIN_SECONDS stays eager and compiles nothing. A longer one compiles
its trainable module where it stands and, after WARMUP compiled steps, runs ROUNDS blocks of BLOCK
steps eager and compiled in turn; it keeps the compiled module when its steps are at least MIN_GAIN
faster and goes back to eager otherwise (the compile's cost is then spent once, as the throwaway
measurement this replaced spent it). Every process takes the same
decision (times averaged over processes, at the same step). The choice and its numbers go into
run.json when taken.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

MIN_SECONDS = 600.0
"""Sessions whose steps left are estimated shorter than this (eager) are not compiled. A compile
that does not pay is lost time (35-40 s here: 6-7% of 10 minutes, at most); a shorter session would
need more than the 1.07-1.09x a compile gave ViT-Ti/S at fp32 to win its cost back."""
MIN_GAIN = 1.03
"""Compiled steps must be at least this much faster (below it: within the measurement's noise)."""
WARMUP = 3
"""Steps of each phase not timed (the first compiled ones include the compile and any recompile)."""
WINDOW = 10
"""Eager steps timed for the session's estimate."""
BLOCK, ROUNDS = 5, 6
"""The comparison: ROUNDS blocks of BLOCK steps, eager and compiled in turn (both modules share the
parameters, so swapping is free): an eager step slows as a run goes on (ViT-S MAE here: ~376 ms in
its first steps, ~400 ms from step 40) and the 2 cores' loader share moves steps by +-6%, which
back-to-back windows mistook for the gain (1.03x measured against ~1.09x in the logged img/s)."""
clock = time.perf_counter


def initial(setting: bool | str, remaining_steps: int) -> tuple[bool, str, bool]:
    """(compile at setup?, reason, time the steps to decide?) for ``train.compile``."""
    if setting != "auto":
        return bool(setting), "set by train.compile", False
    if remaining_steps <= 2 * WARMUP + WINDOW + BLOCK * ROUNDS:
        return False, f"auto: a session of {remaining_steps} steps is too short to time; eager", False
    return False, "auto: eager while its first steps are timed (decided later in this session)", True


class AutoCompile:
    """The decision of `compile=auto` for one session, fed one call per optimizer step.

    ``swap(True)`` makes the step go through the compiled trainable module (compiling it the first
    time), ``swap(False)`` back through the eager one; ``average`` is the mean of a number over
    processes (the identity on one)."""

    def __init__(self, remaining_steps: int, swap: Callable[[bool], None], average: Callable[[float], float]) -> None:
        self.remaining, self.swap, self.average = remaining_steps, swap, average
        self.timed: list[tuple[bool, float]] = []
        """(compiled?, seconds) of each step since the first."""
        self.using = False
        self.last: float | None = None
        self.eager = 0.0

    def _use(self, compiled: bool) -> None:
        if compiled != self.using:
            self.swap(compiled)
            self.using = compiled

    def after_step(self) -> tuple[bool, str] | None:
        """Time the step that just ended and pick the module of the next; the decision (compiled?,
        reason) at the step it is taken."""
        now = clock()
        elapsed, self.last = (None if self.last is None else now - self.last), now
        if elapsed is None:
            return None
        self.timed.append((self.using, elapsed))
        estimated = WARMUP + WINDOW
        since = len(self.timed) - estimated  # steps since the compile
        if since == 0:
            return self._estimate()
        if since < WARMUP + BLOCK * ROUNDS:
            if since >= WARMUP and (since - WARMUP) % BLOCK == 0:
                self._use((since - WARMUP) // BLOCK % 2 == 1)  # block 0 eager, block 1 compiled, ...
            return None
        return self._compare()

    def _estimate(self) -> tuple[bool, str] | None:
        self.eager = self.average(statistics.median(t for _, t in self.timed[WARMUP:]))
        left = self.remaining - len(self.timed) - 1
        if self.eager * left < MIN_SECONDS:
            return False, (f"auto: the rest of the session is estimated at {self.eager * left:.0f} s eager "
                           f"({self.eager * 1000:.0f} ms a step over {left} steps), under {MIN_SECONDS:.0f} s: "
                           "too short to risk a compile; not compiled")
        self._use(True)
        return None

    def _compare(self) -> tuple[bool, str]:
        first = WARMUP + WINDOW
        warmup, rounds = self.timed[first:first + WARMUP], self.timed[first + WARMUP:]
        eager = self.average(statistics.median(t for compiled, t in rounds if not compiled))
        fast = self.average(statistics.median(t for compiled, t in rounds if compiled))
        cost = self.average(sum(t for _, t in warmup) - WARMUP * fast)
        gain, left = eager / fast, self.remaining - len(self.timed) - 1
        chosen = gain >= MIN_GAIN
        self._use(chosen)
        return chosen, (f"auto: the run's compiled steps {gain:.2f}x its eager ones ({fast * 1000:.0f} vs "
                        f"{eager * 1000:.0f} ms, {ROUNDS} alternating blocks of {BLOCK}), the compile {cost:.0f} s, "
                        f"saving {(eager - fast) * left:.0f} s over the {left} steps left (needs {MIN_GAIN}x); "
                        f"{'kept' if chosen else 'back to eager'}")

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
