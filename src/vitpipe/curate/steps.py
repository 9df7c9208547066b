"""The curation steps over per-sample records: hashes in, removals (reason, score, what it
duplicates) out. Hamming searches run on faiss binary indexes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vitpipe.curate.recipe import DecontaminateStep, FilterStep, NearDupStep

CROP_SCALES = (0.85, 0.9, 0.95)
CROP_CORNERS = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))  # centre, then the corners


def image_hashes(image: Image.Image) -> np.ndarray:
    """[2, 8] uint8: the 64-bit pHash and dHash of an RGB image, bit-packed."""
    import imagehash

    return np.stack([np.packbits(imagehash.phash(image).hash.flatten()),
                     np.packbits(imagehash.dhash(image).hash.flatten())])


def crop_hashes(image: Image.Image, flips: bool = False) -> np.ndarray:
    """[16, 2, 8]: the image's hashes whole, then of its 85/90/95% crops at the centre and corners
    (a training copy cropped from an evaluation image matches one of these, not the whole);
    ``flips``: [32, 2, 8], the mirrored image's after them (pHash is not flip-invariant)."""
    if flips:
        return np.concatenate([crop_hashes(image), crop_hashes(image.transpose(Image.FLIP_LEFT_RIGHT))])
    width, height = image.size
    out = [image_hashes(image)]
    for scale in CROP_SCALES:
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        for fx, fy in CROP_CORNERS:
            left, top = round((width - w) * fx), round((height - h) * fy)
            out.append(image_hashes(image.crop((left, top, left + w, top + h))))
    return np.stack(out)


def hamming_pairs(database: np.ndarray, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, database index, distance) of every pair within ``radius`` bits (faiss)."""
    import faiss

    index = faiss.IndexBinaryFlat(64)
    index.add(np.ascontiguousarray(database))
    limits, distances, labels = index.range_search(np.ascontiguousarray(queries), radius + 1)  # faiss: < radius
    rows = np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))
    return rows, labels.astype(np.int64), distances.astype(np.int64)


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
                distance = int(np.unpackbits(items[index].hashes[0] ^ items[keep].hashes[0]).sum())
                removed[items[index].position] = Removal("near_duplicate", float(distance), items[keep].key)
    return removed


def run_decontaminate(items: list[Item], step: DecontaminateStep, evaluation: dict[str, tuple[list[str], np.ndarray]]
                      ) -> dict[int, Removal]:
    """``evaluation``: set name -> (keys, [M, 16, 2, 8] crop hashes). A sample is removed when its
    pHash and its dHash are both within the radius of the same crop of one evaluation image."""
    items = [item for item in items if item.hashes is not None]
    removed: dict[int, Removal] = {}
    if not items:
        return removed
    queries = np.stack([item.hashes for item in items])  # [N, 2, 8]
    for name, (keys, crops) in evaluation.items():
        if not len(keys):
            continue
        flat = crops.reshape(-1, 2, 8)
        sample, crop, phash_distance = hamming_pairs(flat[:, 0], queries[:, 0], step.radius)
        dhash_distance = np.unpackbits(flat[crop, 1] ^ queries[sample, 1], axis=1).sum(axis=1)
        for s, c, total, near in zip(sample, crop, phash_distance + dhash_distance, dhash_distance <= step.radius):
            position = items[s].position
            if near and (position not in removed or total < removed[position].score):
                removed[position] = Removal("contaminated", float(total), keys[c // crops.shape[1]], {"against": name})
    return removed
