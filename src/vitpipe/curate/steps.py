"""The curation steps over per-sample records: fingerprints in, removals (reason, score, what it
duplicates) out. Hamming searches run on faiss binary indexes (pipeline/fingerprints.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vitpipe.curate.recipe import DecontaminateStep, FilterStep, NearDupStep
from vitpipe.pipeline.fingerprints import Fingerprints, bits_apart, hamming_pairs, near_pairs

@dataclass
class Item:
    """One input sample as curation sees it."""

    position: int
    """Its place in shard order."""
    key: str
    width: int
    height: int
    words: int
    """Words of its caption (0 without one)."""
    hashes: np.ndarray | None = None
    """[2, 8] pHash and dHash (None: the image could not be decoded)."""
    thumb: np.ndarray | None = None
    """[256] grey thumbnail (None: the image could not be decoded)."""


@dataclass
class Removal:
    reason: str
    score: float | None = None
    duplicate_of: str | None = None
    """The kept key (near_dup) or evaluation key (decontaminate) this sample repeats."""
    extra: dict = field(default_factory=dict)


def run_filter(items: list[Item], step: FilterStep) -> dict[int, Removal]:
    removed = {}
    for item in items:
        short, long = min(item.width, item.height), max(item.width, item.height)
        if step.min_side and short < step.min_side:
            removed[item.position] = Removal("too_small", float(short))
        elif step.max_aspect and long > step.max_aspect * max(short, 1):
            removed[item.position] = Removal("aspect", long / max(short, 1))
        elif step.min_caption_words and item.words < step.min_caption_words:
            removed[item.position] = Removal("short_caption", float(item.words))
    return removed


def run_near_dup(items: list[Item], step: NearDupStep) -> dict[int, Removal]:
    """Transitive clusters of pHashes within the radius; the largest image of each is kept (then
    the first in shard order), the others removed as duplicates of it."""
    items = [item for item in items if item.hashes is not None]
    if not items:
        return {}
    phashes = np.stack([item.hashes[0] for item in items])
    rows, cols, distances = hamming_pairs(phashes, phashes, step.radius)
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(rows.tolist(), cols.tolist()):
        if a != b:
            parent[root(a)] = root(b)
    clusters: dict[int, list[int]] = {}
    for index in range(len(items)):
        clusters.setdefault(root(index), []).append(index)
    removed = {}
    for members in clusters.values():
        keep = min(members, key=lambda i: (-items[i].width * items[i].height, items[i].position))
        for index in members:
            if index != keep:
                distance = int(bits_apart(items[index].hashes[:1], items[keep].hashes[:1])[0])
                removed[items[index].position] = Removal("near_duplicate", float(distance), items[keep].key)
    return removed


def run_decontaminate(items: list[Item], step: DecontaminateStep, evaluation: dict[str, tuple[list[str], Fingerprints]]
                      ) -> dict[int, Removal]:
    """``evaluation``: set name -> (keys of its M images, their M x C crop fingerprints in image
    order). A sample is removed when its pHash and dHash are both within the radius of the same
    crop of one evaluation image (and its thumbnail close enough, with ``min_cosine``)."""
    items = [item for item in items if item.hashes is not None]
    removed: dict[int, Removal] = {}
    if not items:
        return removed
    queries = (np.stack([item.hashes for item in items]), np.stack([item.thumb for item in items]))
    for name, (keys, crops) in evaluation.items():
        if not keys:
            continue
        per_image = len(crops) // len(keys)
        sample, crop, total = near_pairs(queries, (crops.hashes, crops.thumbs), step.radius, step.min_cosine)
        for s, c, bits in zip(sample.tolist(), crop.tolist(), total.tolist()):
            position = items[s].position
            if position not in removed or bits < removed[position].score:
                removed[position] = Removal("contaminated", float(bits), keys[c // per_image], {"against": name})
    return removed
