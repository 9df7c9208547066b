"""What the engine feeds an objective: the one training ``LoaderSpec`` of a run (the trainer's
loader, and the cost model's sample batch, are the same recipe)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vitpipe.config import PretrainConfig
from vitpipe.pipeline.loader import LoaderSpec
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.pipeline.transforms import TransformSpec
from vitpipe.ssl.objective import Objective


def training_spec(config: PretrainConfig, objective: Objective, rank: int = 0, world: int = 1,
                  **changes: Any) -> LoaderSpec:
    """The run's training loader for this process: the objective's fields, data recipe (``views``
    or its one-view preset) and batch hook, with the run's shuffling, subset and error budget;
    ``changes`` replaces fields of the spec (e.g. a small ``batch_size`` to measure one batch)."""
    data, train = config.data, config.train
    fields = tuple(objective.batch_fields)
    if train.record_keys and "key" not in fields:
        fields += ("key",)
    spec = LoaderSpec(resolve_shards(data.shards), train.batch_size,
                      TransformSpec.for_training(objective.transform_preset, data), train=True, fields=fields,
                      subset_fraction=data.subset_fraction, seed=train.seed, shuffle_buffer=data.shuffle_buffer,
                      samples_per_epoch=data.samples_per_epoch, resampled=data.resampled,
                      max_error_rate=data.max_error_rate, rank=rank, world_size=world,
                      batch_hook=objective.batch_hook(), views=objective.views(data))
    return dataclasses.replace(spec, **changes)
