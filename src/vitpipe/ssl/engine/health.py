"""Is the representation collapsing? Per-dimension spread and effective rank of pooled features,
for every objective (JEPA-style objectives can collapse silently: their loss still falls)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable

import torch
from torch import nn


@torch.no_grad()
def feature_health(encoder: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """``feature_std``: mean over dimensions of the batch std of pooled features; ``effective_rank``:
    exp of the entropy of the normalised singular values of the centred features (Roy & Vetterli),
    1 when every image maps to one line, up to min(batch, width)."""
    training = encoder.training
    encoder.eval()
    try:
        features = encoder.pool(encoder.forward_features(images)).float()
    finally:
        encoder.train(training)
    centred = features - features.mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(centred)
    total = singular.sum()
    if total <= 0:
        return {"feature_std": 0.0, "effective_rank": 0.0}
    p = singular / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"feature_std": features.std(dim=0).mean().item(), "effective_rank": entropy.exp().item()}


def monitor(encoder: nn.Module, images: torch.Tensor, step: int, train: Any,
            log_event: Callable[[dict[str, Any]], None]) -> dict[str, float]:
    """The health numbers of this step; a warning line and a `collapse` event when the feature std
    or the effective rank falls below train.collapse_min_std / train.collapse_min_rank."""
    health = feature_health(encoder, images)
    if health["feature_std"] < train.collapse_min_std or health["effective_rank"] < train.collapse_min_rank:
        print(f"warning: step {step}: the representation may be collapsing (feature std "
              f"{health['feature_std']:.2e}, effective rank {health['effective_rank']:.2f})", file=sys.stderr)
        log_event({"step": step, "event": "collapse", **health})
    return health


def session_health(s: Any, train: Any) -> dict[str, float]:
    """``monitor`` on a trainer ``Session`` when ``train.health_every`` says so: on the first process,
    and on every one when sharded (gathering the weights is a collective); {} elsewhere."""
    from vitpipe.ssl.engine import sharding

    if not train.health_every or (s.state.step % train.health_every and s.state.step > 1) or s.images is None:
        return {}
    main = s.accelerator.is_main_process
    if not (main or s.sharded):
        return {}
    gathered = sharding.unsharded(s.objective, s.objective.trainable_module()) if s.sharded else contextlib.nullcontext()
    with gathered:
        health = monitor(s.objective.encoder(), s.images, s.state.step, train,
                         s.metrics.write if main else lambda event: None)
    return health if main else {}
