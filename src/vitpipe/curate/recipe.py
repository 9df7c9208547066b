"""A curation recipe: the steps `vitpipe curate` runs, in order, each with typed settings.

    steps:
      - filter: {min_side: 32}
      - near_dup: {radius: 6}
      - decontaminate: {against: [shards/test]}

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
    flips: bool = False
    """Also match mirrored copies (the evaluation images are hashed flipped too): finds every
    flipped copy, at the cost of more look-alikes removed (benchmarks/RESULTS.md)."""

    def __post_init__(self) -> None:
        check(bool(self.against), "decontaminate.against needs at least one evaluation shard set")
        check(0 <= self.radius <= MAX_RADIUS, f"decontaminate.radius must be in 0..{MAX_RADIUS}")
        check(0 <= self.min_cosine <= 1, "decontaminate.min_cosine must be in [0, 1]")


STEPS: dict[str, type] = {"filter": FilterStep, "near_dup": NearDupStep, "decontaminate": DecontaminateStep}
PLANNED = ("semantic_dedup", "clip_score", "balance")  # the curation issue's embedding steps, not built yet


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
    if name in PLANNED:
        raise ConfigError(f"curation step {name!r} is not built yet; available: {', '.join(STEPS)}")
    if name not in STEPS:
        raise ConfigError(f"unknown curation step {name!r}; available: {', '.join(STEPS)}")
