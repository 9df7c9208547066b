"""Fine-tuning a pretrained (or random-init) encoder with the same trainer as pretraining."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitpipe.config import ConfigError, PretrainConfig, from_dict, merge, parse_overrides, to_dict
from vitpipe.downstream.evaluate import run_dir_of, write_result
from vitpipe.downstream.features import EncoderSource, FeatureSet, check_tally, extract
from vitpipe.downstream.probe import fit_linear_head
from vitpipe.pipeline.loader import LoaderSpec, ReadTally, counted, in_subset, make_loader, resolve_shards
from vitpipe.pipeline.manifest import find_manifest
from vitpipe.pipeline.transforms import TransformSpec
from vitpipe.ssl.classify import Classifier
from vitpipe.ssl import registry
from vitpipe.ssl.checkpoints import list_checkpoints
from vitpipe.ssl.runs import build_run_objective, load_run_encoder
from vitpipe.ssl.trainer import Trainer


@dataclass
class FinetuneSettings:
    label_fraction: float = 1.0
    """Fraction of the training labels used (fixed subset by key hash and seed)."""
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    """Peak learning rate (AdamW, warmup then cosine)."""
    weight_decay: float = 0.05
    layer_decay: float | None = None
    """Layer-wise lr decay (1 = off); None: 0.75 from a pretrained encoder, 1 from scratch."""
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    crop_scale_min: float = 0.08
    """RandomResizedCrop keeps 8-100% of the image (the DeiT/MAE fine-tuning default)."""
    freeze_blocks: int = 0
    freeze_patch_embed: bool = False
    image_size: int = 0
    """Fine-tuning resolution; 0 = the pretraining one (other sizes interpolate positions)."""
    num_classes: int = 0
    """0 = from the training shards' manifest label map."""
    seed: int = 0
    workers: int = 2
    probe_init: bool = False
    """Start the head from a linear probe fitted on the same labelled subset (LP-FT), not from zero."""
    max_skipped: float = 0.01
    """Fraction of the expected test samples that may be unreadable before the evaluation fails."""


def _num_classes(train: str) -> int:
    shards = resolve_shards(train)
    path = find_manifest(shards.directory) if shards.directory else None
    label_map = json.loads(path.read_text()).get("label_map") if path else None
    if not label_map:
        raise ConfigError("cannot tell the number of classes from the shards' manifest; pass --num-classes")
    return len(label_map)


def _layer_decay(source: EncoderSource, settings: FinetuneSettings) -> float:
    if settings.layer_decay is not None:
        return settings.layer_decay
    return 1.0 if source.kind == "random" else 0.75  # decaying towards the input only suits pretrained blocks


def finetune_config(source: EncoderSource, train: str, settings: FinetuneSettings,
                    overrides: list[str] | None = None) -> PretrainConfig:
    base = to_dict(source.config)
    base = {key: base[key] for key in ("data", "model", "train")}
    base["data"].update(shards=train, subset_fraction=settings.label_fraction, crop_scale_min=settings.crop_scale_min,
                        image_size=settings.image_size or source.config.data.image_size)
    base["model"].update(drop_path=settings.drop_path)
    base["finetune"] = dict(num_classes=settings.num_classes or _num_classes(train),
                            label_smoothing=settings.label_smoothing, layer_decay=_layer_decay(source, settings),
                            freeze_blocks=settings.freeze_blocks, freeze_patch_embed=settings.freeze_patch_embed)
    base["optim"] = dict(base_lr=settings.lr, lr=settings.lr, weight_decay=settings.weight_decay,
                         betas=[0.9, 0.999], warmup_fraction=0.1, min_lr=1e-6, clip_grad=0.0, warmup_steps=0)
    base["train"].update(max_steps=settings.steps, batch_size=settings.batch_size, grad_accum=1, seed=settings.seed,
                         ckpt_every_steps=max(100, settings.steps // 4), record_keys=False)
    return from_dict(registry.config_class("classify"), merge(base, parse_overrides(overrides or [])))


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


def probe_head(source: EncoderSource, train: str, config: PretrainConfig,
               settings: FinetuneSettings) -> tuple[nn.Linear, dict[str, Any]]:
    """A linear head fitted on frozen features of exactly the labelled subset the fine-tune will see."""
    if config.data.image_size != source.config.data.image_size:
        raise ConfigError("--probe-init needs the pretraining resolution (features are taken from the frozen encoder)")
    frozen = dataclasses.replace(source, seed=config.train.seed)
    features = extract(frozen, train, pool=config.model.pool, num_workers=settings.workers,
                       cache_dir=run_dir_of(source.run) / "eval" / "cache")
    keep = np.array([in_subset(key, config.data.subset_fraction, config.train.seed) for key in features.keys])
    if keep.sum() < 2:
        raise ConfigError("--probe-init: fewer than 2 labelled samples in the subset")
    head, info = fit_linear_head(features.features["last"][keep], features.labels[keep], config.finetune.num_classes)
    return head, {**info, "samples": int(keep.sum())}


@torch.no_grad()
def evaluate_classifier(model: Classifier, config: PretrainConfig, test: str, workers: int,
                        max_skipped: float = 0.01) -> dict[str, Any]:
    model.eval()
    transform = TransformSpec("eval", config.data.image_size, config.data.channels, mean=tuple(config.data.mean),
                              std=tuple(config.data.std))
    shards = resolve_shards(test)
    spec = LoaderSpec(shards, 256, transform, train=False, fields=("image", "label"))
    _, loader = make_loader(spec, workers)
    correct = total = 0
    tally = ReadTally(shards.expected)
    for batch in counted(loader, tally):
        predictions = model.logits(batch["image"]).argmax(dim=-1)
        correct += (predictions == batch["label"]).sum().item()
        total += len(predictions)
    if not total:
        raise ConfigError(f"no test samples in {test}")
    check_tally(test, FeatureSet({}, None, [], tally), max_skipped)
    return {"top1": correct / total, "test_samples": total, "samples": {"test": tally.as_dict()}}


def finetune(source: EncoderSource, train: str, test: str, settings: FinetuneSettings,
             overrides: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train (resumable, under RUN/finetune/<tag>/), then evaluate top-1 on ``test``."""
    if source.kind == "pixels":
        raise ConfigError("fine-tuning needs an encoder; use --init random for the from-scratch baseline")
    start = time.monotonic()
    settings = dataclasses.replace(settings, layer_decay=_layer_decay(source, settings))  # recorded as used
    config = finetune_config(source, train, settings, overrides)
    # different settings must never resume (and silently reuse) another fine-tune's checkpoints
    identity = {"config": to_dict(config), "probe_init": settings.probe_init}
    settings_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    tag = f"{source.kind}-labels{settings.label_fraction:g}-seed{settings.seed}-{settings_hash}"
    out = run_dir_of(source.run) / "finetune" / tag
    head, probe = probe_head(source, train, config, settings) if settings.probe_init else (None, None)
    build = classifier_builder(source, head)
    summary = Trainer(config, out, build, resume="auto").run()
    model = build(config, {})
    from safetensors.torch import load_file

    model.load_state_dict(load_file(list_checkpoints(out)[-1] / "model.safetensors"))
    scores = evaluate_classifier(model, config, test, settings.workers, settings.max_skipped)
    payload = {**scores, "label_fraction": settings.label_fraction, "steps": summary.steps,
               "train_seconds": round(summary.seconds, 1), "run": str(out), "settings": dataclasses.asdict(settings),
               "probe_init": probe}
    path = write_result(source, "finetune", payload, {"train": train, "test": test}, time.monotonic() - start)
    if settings.label_fraction != 1.0:  # keep one file per label fraction
        renamed = path.with_name(path.name.replace("finetune", f"finetune-labels{settings.label_fraction:g}", 1))
        path.replace(renamed)
        path = renamed
    return path, payload
