"""Plots of a run's logs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from vitpipe.runlayout import RunLayout


def read_metrics(run_dir: Path) -> list[dict]:
    path = RunLayout(run_dir).metrics
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_per_step(records: list[dict]) -> list[dict]:
    """A resumed run may log a step twice (redone after a crash); keep the last record."""
    by_step = {r["step"]: r for r in records if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def loss_curve(run_dir: Path, out: Path, title: str | None = None) -> Path:
    """Loss, learning rate and throughput against steps, one PNG."""
    records = last_per_step(read_metrics(run_dir))
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax_loss.plot(steps, [r["loss"] for r in records], lw=1)
    ax_loss.set(xlabel="step", ylabel="loss", title=title or "training loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=1)
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    ax_lr.grid(alpha=0.3)
    ax_speed.plot(steps, [r.get("img_per_s", 0) for r in records], color="tab:green", lw=1)
    ax_speed.set(xlabel="step", ylabel="images / s", title="throughput")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
