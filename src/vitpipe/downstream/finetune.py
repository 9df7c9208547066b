"""Fine-tuning a pretrained (or random-init) encoder with the same trainer as pretraining."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError, PretrainConfig, from_dict, merge, parse_overrides, to_dict
from vitpipe.downstream.contamination import DEFAULT_MAX
from vitpipe.downstream.evaluate import checked_contamination, write_result
from vitpipe.downstream.features import EncoderSource, FeatureSet, check_tally, extract
from vitpipe.downstream.featurestore import Processes
from vitpipe.downstream.probe import fit_linear_head
from vitpipe.pipeline.census import require
from vitpipe.pipeline.loader import ReadTally, counted, eval_loader, in_subset
from vitpipe.pipeline.shardset import label_remap, resolve_shards
from vitpipe.pipeline.manifest import label_map_of
from vitpipe.ssl.objectives.classify.objective import Classifier
from vitpipe.ssl import registry
from vitpipe.ssl.engine.checkpoints import list_checkpoints
from vitpipe.ssl.runs import build_run_objective, load_run_encoder
from vitpipe.ssl.engine.trainer import Trainer


def _num_classes(train: str) -> int:
    label_map = label_map_of(resolve_shards(train).directory)
    if not label_map:
        raise ConfigError("cannot tell the number of classes from the shards' manifest; pass finetune.num_classes=N")
    return len(label_map)


CARRIED_OVER = {"data": ("image_size", "channels", "mean", "std", "hflip", "shuffle_buffer", "max_error_rate"),
                "model": None, "train": ("precision", "compile", "log_every", "tensorboard", "wandb")}
"""What a fine-tune keeps of its source run's config (None: the whole section); the rest is the
classify objective's recipe (its registry defaults) and the user's overrides."""


def finetune_config(source: EncoderSource, train: str, overrides: list[str] | None = None) -> PretrainConfig:
    """The fine-tuning run's config: the source's shape and input settings <- the classify recipe
    (lr 1e-3, drop path 0.1, label smoothing 0.1, 8-100% crops, ...) <- ``key=value`` overrides.
    From a random init, layer-wise decay defaults to off (it only suits pretrained blocks)."""
    source_config = to_dict(source.config)
    base = {section: {k: v for k, v in source_config[section].items() if keys is None or k in keys}
            for section, keys in CARRIED_OVER.items()}
    spec = registry.get("classify")
    user = parse_overrides(overrides or [])
    data = merge(merge(base, spec.defaults), {"data": {"shards": train}})
    if source.kind == "random" and "layer_decay" not in user.get("finetune", {}):
        data = merge(data, {"finetune": {"layer_decay": 1.0}})
    data = merge(data, user)
    if "batch_size" not in user.get("train", {}):
        data = merge(data, {"train": {"batch_size": _batch_for_labels(train, data)}})
    if not data.get("finetune", {}).get("num_classes"):
        data = merge(data, {"finetune": {"num_classes": _num_classes(train)}})
    return from_dict(registry.config_class("classify"), data)


def _batch_for_labels(train: str, data: dict[str, Any]) -> int:
    """The recipe's batch, halved until one epoch of the labelled subset on each process holds a
    batch (a 10% label subset of 1,000 images is 100 samples: less than the recipe's 128)."""
    batch = int(data["train"]["batch_size"])
    total = resolve_shards(train).total
    labelled = int((total or 0) * data["data"].get("subset_fraction", 1.0)) // Processes.from_env().world
    if not total or labelled >= batch or labelled < 1:
        return batch
    smaller = 2 ** int(math.log2(labelled))
    print(f"note: fine-tune batch {smaller}: {labelled} labelled samples per process are fewer than the recipe's "
          f"{batch} (set train.batch_size to choose)", file=sys.stderr)
    return smaller


def classifier_builder(source: EncoderSource, head: nn.Linear | None = None):
    """Build the classifier around the source's encoder (rebuilt through the source run's registry
    entry, with the fine-tuning model settings such as drop path), at the pretraining resolution,
    then its positions interpolated to the fine-tuning one; ``head`` (if given) replaces the zero head."""

    def build(config: PretrainConfig, artifacts: dict[str, bytes]) -> Classifier:
        shaped = dataclasses.replace(source.config, model=config.model)
        if source.kind == "trained":
            encoder = load_run_encoder(source.run, shaped)[0].train()
        else:  # the same draw as EncoderSource(kind="random", seed=train.seed)
            encoder = build_run_objective(source.run, shaped, seed=config.train.seed).encoder()
        if hasattr(encoder, "resize_pos_embed"):
            encoder.resize_pos_embed(config.data.image_size)
        torch.manual_seed(config.train.seed)
        classifier = Classifier(encoder, config.finetune)
        if head is not None:
            classifier.head.load_state_dict(head.state_dict())
        return classifier

    return build


def probe_head(source: EncoderSource, train: str, config: PretrainConfig) -> tuple[nn.Linear, dict[str, Any]]:
    """A linear head fitted on frozen features of exactly the labelled subset the fine-tune will see."""
    if config.data.image_size != source.config.data.image_size:
        raise ConfigError("--probe-init needs the pretraining resolution (features are taken from the frozen encoder)")
    frozen = dataclasses.replace(source, seed=config.train.seed)
    features = extract(frozen, train, pool=config.model.pool, num_workers=config.data.num_workers,
                       cache_dir=RunLayout.of(source.run).cache)
    keep = np.array([in_subset(key, config.data.subset_fraction, config.train.seed) for key in features.keys])
    if keep.sum() < 2:
        raise ConfigError("--probe-init: fewer than 2 labelled samples in the subset")
    head, info = fit_linear_head(features.features["last"][keep], features.labels[keep], config.finetune.num_classes)
    return head, {**info, "samples": int(keep.sum())}


@torch.no_grad()
def evaluate_classifier(model: Classifier, config: PretrainConfig, test: str, workers: int,
                        max_skipped: float = 0.01, remap: list[int] | None = None) -> dict[str, Any]:
    """Top-1 on ``test``; ``remap`` puts its labels in the train set's numbering (``label_remap``)."""
    model.eval()
    shards = resolve_shards(test)
    require(shards, test, ("label",), "a fine-tune's test")
    loader = eval_loader(shards, config.data, ("image", "label"), workers)
    correct = total = 0
    tally = ReadTally(shards.expected)
    table = None if remap is None else torch.tensor(remap)
    for batch in counted(loader, tally):
        predictions = model.logits(batch["image"]).argmax(dim=-1)
        labels = batch["label"] if table is None else table[batch["label"]]
        correct += (predictions == labels).sum().item()
        total += len(predictions)
    if not total:
        raise ConfigError(f"no test samples in {test}")
    check_tally(test, FeatureSet({}, None, [], tally), max_skipped)
    return {"top1": correct / total, "test_samples": total, "samples": {"test": tally.as_dict()}}


def result_name(label_fraction: float) -> str:
    """One result file per label fraction: finetune.json, finetune-labels0.1.json, ..."""
    return "finetune" if label_fraction == 1.0 else f"finetune-labels{label_fraction:g}"


def finetune(source: EncoderSource, train: str, test: str, overrides: list[str] | None = None,
             probe_init: bool = False, max_skipped: float = 0.01,
             max_contamination: float = DEFAULT_MAX) -> tuple[Path, dict[str, Any]]:
    """Train (resumable, under RUN/finetune/<tag>/), then evaluate top-1 on ``test``. ``overrides``
    are ``key=value`` settings of the fine-tuning run (see ``finetune_config``); ``probe_init``
    starts the head from a linear probe on the same labelled subset (LP-FT)."""
    if source.kind == "pixels":
        raise ConfigError("fine-tuning needs an encoder; use --init random for the from-scratch baseline")
    start = time.monotonic()
    leaks = checked_contamination(source, test, max_contamination, train=train)
    remap = label_remap(train, test)
    config = finetune_config(source, train, overrides)
    fraction, seed = config.data.subset_fraction, config.train.seed
    # different settings must never resume (and silently reuse) another fine-tune's checkpoints
    identity = {"config": to_dict(config), "probe_init": probe_init}
    settings_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    out = RunLayout.of(source.run).finetune / f"{source.kind}-labels{fraction:g}-seed{seed}-{settings_hash}"
    head, probe = probe_head(source, train, config) if probe_init else (None, None)
    build = classifier_builder(source, head)
    summary = Trainer(config, out, build, resume="auto").run()
    model = build(config, {})
    from safetensors.torch import load_file

    model.load_state_dict(load_file(list_checkpoints(out)[-1] / "model.safetensors"))
    scores = evaluate_classifier(model, config, test, config.data.num_workers, max_skipped, remap)
    payload = {**scores, "label_fraction": fraction, "steps": summary.steps,
               "train_seconds": round(summary.seconds, 1), "run": str(out), "overrides": list(overrides or []),
               "finetune_config": to_dict(config), "probe_init": probe, "contamination": leaks}
    name = result_name(fraction)
    path = write_result(source, name, payload, {"train": train, "test": test}, time.monotonic() - start)
    return path, payload
