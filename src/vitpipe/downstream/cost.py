"""What a pretraining run cost: optimizer steps, samples seen, wall-clock, and FLOPs (one real
training step of the run's objective on its own data, counted by torch's FlopCounterMode)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError
from vitpipe.pipeline.loader import make_loader
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.ssl import registry
from vitpipe.ssl.engine.checkpoints import latest_verified, log_stderr
from vitpipe.ssl.engine.data import training_spec
from vitpipe.ssl.runs import build_run_objective

COUNT_BATCH = 8


def checkpoint_state(run: Path) -> dict[str, Any]:
    """state.json of the run's latest verified checkpoint (step, samples_seen, wall_seconds, ...); {} if none."""
    checkpoint = latest_verified(RunLayout.of(run).root, log_stderr, set_aside=False)
    return json.loads((checkpoint / "state.json").read_text()) if checkpoint else {}


def pretraining_cost(run: Path) -> dict[str, Any]:
    state = checkpoint_state(run)
    samples = state.get("samples_seen")
    per_sample = flops_per_sample(RunLayout.of(run).root)
    return {"steps": state.get("step"), "samples_seen": samples, "wall_seconds": state.get("wall_seconds"),
            "world_size": state.get("world_size"), "flops_per_sample": per_sample,
            "flops": per_sample * samples if per_sample and samples else None}


def flops_per_sample(run_dir: Path) -> float | None:
    """Forward + backward FLOPs of a training step, per sample (matmuls, convolutions, attention:
    what FlopCounterMode counts; elementwise work is not). None when the training data is gone."""
    config = registry.run_config(RunLayout(run_dir).config)
    try:
        resolve_shards(config.data.shards)  # the training data may be gone
    except ConfigError:
        return None
    objective = build_run_objective(run_dir, config, seed=0).train()
    spec = training_spec(config, objective, batch_size=COUNT_BATCH, shuffle_buffer=COUNT_BATCH,
                         samples_per_epoch=COUNT_BATCH, subset_fraction=1.0, resampled=False)
    batch = next(iter(make_loader(spec, 0)[1]))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        objective(batch).loss.backward()
    return counter.get_total_flops() / COUNT_BATCH
