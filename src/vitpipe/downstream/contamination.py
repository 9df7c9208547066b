"""The contamination figure every eval records: how many test images have a near-copy (re-encoded,
resized, brightened: not cropped, which `vitpipe curate`'s decontaminate step handles) among the
images the number depends on: the run's pretraining shards and the eval's own training /
reference shards. Read from stored fingerprints (pipeline/fingerprints.py); shards without them
are hashed once and kept in RUN/eval/cache/fingerprints.

The rule is strict on purpose: a test image counts when a reference image's pHash and dHash are
both within RADIUS bits of it (the candidates) and their 16x16 thumbnails have a cosine of at
least MIN_COSINE (the decision: at 28 px the hashes alone match most of Fashion-MNIST). Calibrated
on Fashion-MNIST's own splits, the hard case: 0.8% of its test images match a training image
under this rule, while it finds every exact and brightened copy and 83% of JPEG q30-70 ones
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitpipe.config import ConfigError
from vitpipe.pipeline.fingerprints import Fingerprints, near_pairs, of_shards
from vitpipe.pipeline.shardset import resolve_shards

RADIUS = 12
MIN_COSINE = 0.995
DEFAULT_MAX = 0.01
"""--max-contamination's default: above 1% of the test set an eval refuses to report a number."""
EXAMPLES = 5


@dataclass
class Contamination:
    test_images: int
    """Decodable test images checked."""
    contaminated: int
    """Test images with a near-copy in any reference set."""
    by_reference: dict[str, int]
    """Reference name (pretraining, train, ...) -> test images with a near-copy there."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """A few (test key, reference, reference key, bits apart) pairs, for a person to look at."""
    unreadable: list[str] = field(default_factory=list)
    """Reference sets that could not be read (moved away): not checked, said so."""
    hashed: int = 0
    """Images hashed for this figure (no stored fingerprints); 0 when every set had them."""
    rule: dict[str, Any] = field(default_factory=lambda: {"radius": RADIUS, "min_cosine": MIN_COSINE})

    @property
    def fraction(self) -> float:
        return self.contaminated / self.test_images if self.test_images else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": round(self.fraction, 6)}

    def line(self) -> str:
        where = ", ".join(f"{name} {n}" for name, n in self.by_reference.items() if n) or "none"
        text = (f"{self.contaminated} of {self.test_images} test images ({100 * self.fraction:.2f}%) "
                f"have a near-copy in the data behind this number ({where})")
        if self.unreadable:
            text += f"; not checked: {', '.join(self.unreadable)}"
        return text


def fields(record: dict[str, Any]) -> dict[str, Any]:
    """A recorded figure (as_dict) back to Contamination's fields."""
    return {key: value for key, value in record.items() if key != "fraction"}


def measure(test: str, references: dict[str, str], cache_dir: Path | None) -> Contamination:
    """Near-copies of ``test``'s images in each of ``references`` (name -> shard spec)."""
    lookup = of_shards(resolve_shards(test), cache_dir)
    queries = _decodable(lookup.prints)
    hashed, hit, by_reference, examples, unreadable = lookup.hashed, set(), {}, [], []
    for name, spec in references.items():
        try:
            found = of_shards(resolve_shards(spec), cache_dir)
        except (ConfigError, OSError):
            unreadable.append(f"{name} ({spec})")
            continue
        hashed += found.hashed
        base = _decodable(found.prints)
        rows, cols, bits = near_pairs((queries.hashes, queries.thumbs), (base.hashes, base.thumbs), RADIUS, MIN_COSINE)
        matched = set(rows.tolist())
        by_reference[name] = len(matched)
        hit |= matched
        for row in sorted(matched)[: max(0, EXAMPLES - len(examples))]:
            first = int(np.argmax(rows == row))
            examples.append({"test": queries.keys[row], "reference": name, "key": base.keys[cols[first]],
                             "bits": int(bits[first])})
    return Contamination(len(queries), len(hit), by_reference, examples, unreadable, hashed)


def _decodable(prints: Fingerprints) -> Fingerprints:
    keep = np.flatnonzero(prints.valid)
    return Fingerprints([prints.keys[i] for i in keep], prints.hashes[keep], prints.thumbs[keep], prints.valid[keep])


def checked(test: str, references: dict[str, str], cache_dir: Path | None, limit: float) -> Contamination:
    """measure(), refused (one line, exit 2) when above ``limit`` (a fraction of the test images)."""
    if not 0 <= limit <= 1:
        raise ConfigError(f"--max-contamination must be a fraction in [0, 1]; got {limit}")
    found = measure(test, references, cache_dir)
    if found.fraction > limit:
        raise ConfigError(f"contamination: {found.line()}, above --max-contamination {limit:g}; "
                          "test on images the data never held (vitpipe curate ... decontaminate.against=[TEST]) "
                          "or raise the limit knowingly")
    return found
