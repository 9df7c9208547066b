"""A curation recipe: the steps `vitpipe curate` runs, in order, each with typed settings.

    steps:
      - filter: {min_side: 32}
      - near_dup: {radius: 6}
      - decontaminate: {against: [shards/test]}
      - semantic_dedup: {encoder: runs/mae, eps: 0.05}

``key=value`` overrides address a step of the recipe by name (``near_dup.radius=4``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitpipe.config import ConfigError, check, from_dict, parse_overrides, to_dict

MAX_RADIUS = 16


@dataclass
class FilterStep:
    """The simple filters: images too small or too elongated, captions too short."""

    min_side: int = 0
    """Remove images whose shorter side (as ingested, before resizing) is below this (0: off)."""
    max_aspect: float = 0.0
    """Remove images whose long/short side ratio exceeds this (0: off)."""
    min_caption_words: int = 0
    """Remove samples whose caption has fewer words (0: off; uncaptioned samples count as 0 words)."""

    def __post_init__(self) -> None:
        check(self.min_side >= 0 and self.min_caption_words >= 0, "filter: min_side and min_caption_words must be >= 0")
        check(self.max_aspect == 0 or self.max_aspect >= 1, "filter.max_aspect must be 0 (off) or >= 1")


@dataclass
class NearDupStep:
    """Near-duplicates inside the shards: 64-bit pHashes within ``radius`` bits are one cluster
    (transitively); the largest image of each cluster is kept (then the first in shard order)."""

    radius: int = 4
    """Hamming radius in bits (of 64) under which two images are the same picture."""

    def __post_init__(self) -> None:
        check(0 <= self.radius <= MAX_RADIUS, f"near_dup.radius must be in 0..{MAX_RADIUS}")


@dataclass
class DecontaminateStep:
    """Remove samples that are near-copies of an evaluation image: re-encoded, resized, brightened,
    or cropped to 85-95% of it. Each evaluation image is hashed whole and as 15 crops (85/90/95% at
    the centre and the four corners); a sample is removed when its own pHash AND dHash are both
    within ``radius`` bits of one of them (two hash kinds: one alone flags distinct look-alikes)."""

    against: list[str] = field(default_factory=list)
    """Evaluation shard sets (paths, globs or brace patterns) whose images must not be trained on."""
    radius: int = 10
    """Hamming radius in bits, for each of the two hashes."""
    min_cosine: float = 0.0
    """Also require the 16x16 thumbnails' cosine (mean removed) to reach this (0: hashes alone)."""
    encoder: str = ""
    """Also remove samples whose embedding under this run's encoder has a cosine of at least
    ``min_embedding_cosine`` to an evaluation image's ("": hashes only)."""
    min_embedding_cosine: float = 0.95
    flips: bool = False
    """Also match mirrored copies (the evaluation images are hashed flipped too): finds every
    flipped copy, at the cost of more look-alikes removed (benchmarks/RESULTS.md)."""

    def __post_init__(self) -> None:
        check(bool(self.against), "decontaminate.against needs at least one evaluation shard set")
        check(0 <= self.radius <= MAX_RADIUS, f"decontaminate.radius must be in 0..{MAX_RADIUS}")
        check(0 <= self.min_cosine <= 1, "decontaminate.min_cosine must be in [0, 1]")
        check(-1 < self.min_embedding_cosine <= 1, "decontaminate.min_embedding_cosine must be in (-1, 1]")


@dataclass
class SemanticDedupStep:
    """SemDeDup: embeddings from an encoder, k-means into clusters, and inside each cluster every
    sample whose cosine to a kept one exceeds ``1 - eps`` removed. The least typical samples of a
    cluster (farthest from its centroid) are kept first, as SemDeDup does."""

    encoder: str = ""
    """A vitpipe run (any objective) or one of its checkpoint directories."""
    eps: float = 0.05
    """Remove when the cosine to a kept sample is above 1 - eps."""
    clusters: int = 0
    """k-means clusters (0: about the square root of the samples)."""
    seed: int = 0

    def __post_init__(self) -> None:
        check(bool(self.encoder), "semantic_dedup.encoder needs a run directory")
        check(0 < self.eps < 1, "semantic_dedup.eps must be in (0, 1)")
        check(self.clusters >= 0, "semantic_dedup.clusters must be >= 0")


@dataclass
class ClipScoreStep:
    """DataComp's CLIP-score filter: keep image-caption pairs whose cosine under a vitpipe CLIP run
    is at least ``min_score`` and (with ``top_fraction``) among the best that fraction."""

    model: str = ""
    """A vitpipe run of an image-text objective (clip)."""
    min_score: float = -1.0
    """Remove pairs scoring below this cosine (-1: off)."""
    top_fraction: float = 1.0
    """Keep only this fraction of the pairs, the best scoring (1: off)."""

    def __post_init__(self) -> None:
        check(bool(self.model), "clip_score.model needs a clip run directory")
        check(-1 <= self.min_score <= 1, "clip_score.min_score must be a cosine in [-1, 1]")
        check(0 < self.top_fraction <= 1, "clip_score.top_fraction must be in (0, 1]")


@dataclass
class BalanceStep:
    """ssl-data-curation's balanced sampling: hierarchical k-means over the embeddings (clusters of
    samples, then clusters of those clusters' centroids, ...), then ``target`` samples drawn evenly
    down the tree (a small cluster gives all it has, the rest goes to the others), seeded."""

    encoder: str = ""
    """A vitpipe run (any objective) or one of its checkpoint directories."""
    target: int = 0
    """Samples to keep."""
    levels: list[int] = field(default_factory=list)
    """Clusters per level, finest first, e.g. [100, 10] (empty: one level of about sqrt(N))."""
    seed: int = 0

    def __post_init__(self) -> None:
        check(bool(self.encoder), "balance.encoder needs a run directory")
        check(self.target > 0, "balance.target must be > 0 (samples to keep)")
        check(all(k > 0 for k in self.levels), "balance.levels must be positive cluster counts")
        check(list(self.levels) == sorted(self.levels, reverse=True), "balance.levels go from finest (most clusters) to coarsest")


STEPS: dict[str, type] = {"filter": FilterStep, "near_dup": NearDupStep, "decontaminate": DecontaminateStep,
                          "semantic_dedup": SemanticDedupStep, "clip_score": ClipScoreStep, "balance": BalanceStep}


@dataclass
class Recipe:
    steps: list[tuple[str, Any]]
    """(name, settings) in the order they run."""

    def settings(self) -> list[dict[str, Any]]:
        """The recipe as written into the output manifest."""
        return [{name: to_dict(step)} for name, step in self.steps]


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """The recipe of a YAML file (``steps:`` a list of {name: settings}) with ``step.key=value``
    overrides; without a file, the steps named by the overrides, in the order of STEPS."""
    raw: list[Any] = []
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"--config {path}: {err}") from None
        if not isinstance(loaded, dict) or set(loaded) != {"steps"} or not isinstance(loaded["steps"], list):
            raise ConfigError(f"--config {path}: a recipe is a mapping with one key, steps: a list of {{name: settings}}")
        raw = loaded["steps"]
    entries = [_entry(item) for item in raw]
    changes = parse_overrides(overrides or [])
    for name in changes:
        if name not in (n for n, _ in entries):
            _known(name)
            entries.append((name, {}))
    if path is None:
        entries.sort(key=lambda entry: list(STEPS).index(entry[0]))
    if not entries:
        raise ConfigError("no curation steps: give --config RECIPE.yaml or step settings such as near_dup.radius=4")
    steps = []
    for name, settings in entries:
        merged = {**settings, **changes.get(name, {})}
        steps.append((name, from_dict(STEPS[name], merged, f"{name}.")))
    return Recipe(steps)


def _entry(item: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(item, dict) or len(item) != 1:
        raise ConfigError(f"a recipe step is one {{name: settings}} mapping; got {item!r}")
    (name, settings), = item.items()
    _known(name)
    if settings is not None and not isinstance(settings, dict):
        raise ConfigError(f"{name}: its settings must be a mapping; got {settings!r}")
    return name, settings or {}


def _known(name: str) -> None:
    if name not in STEPS:
        raise ConfigError(f"unknown curation step {name!r}; available: {', '.join(STEPS)}")
