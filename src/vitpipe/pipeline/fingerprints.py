"""Near-duplicate fingerprints of images, computed once and kept beside the shards.

A fingerprint is a 64-bit pHash, a 64-bit dHash and a 16x16 grey thumbnail. The hashes find
candidates fast (faiss binary index); the thumbnail's cosine (after removing its mean) confirms
them: at 28 px two 64-bit hashes cannot tell Fashion-MNIST's distinct products apart, the
thumbnail can (benchmarks/RESULTS.md).

Ingest and curate write ``NNNNN.fp.npz`` beside each ``NNNNN.tar`` (keys, hashes, thumbnails,
which images decoded, and the tar's size and sha256 it describes). Shards without one are hashed
on first need and kept in the caller's cache directory, so no image is hashed twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from vitpipe.pipeline.images import EXTENSIONS, decode_rgb
from vitpipe.pipeline.manifest import shard_hashes, write_bytes_atomic
from vitpipe.pipeline.shardset import ShardSet, is_local, open_shard
from vitpipe.pipeline.tario import iter_tar_samples

THUMB = 16
CROP_SCALES = (0.85, 0.9, 0.95)
CROP_CORNERS = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))  # centre, then the corners
MAX_PIXELS = 40_000_000
PAIR_CHUNK = 65536
_BITS_SET = np.array([bin(byte).count("1") for byte in range(256)], np.uint8)
"""Bits set in each byte value (numpy>=1.26 has no popcount; unpackbits was 8x the memory)."""


@dataclass
class Fingerprints:
    """Fingerprints of N images, in shard order."""

    keys: list[str]
    hashes: np.ndarray
    """[N, 2, 8] uint8: pHash and dHash, bit-packed."""
    thumbs: np.ndarray
    """[N, 256] uint8: the 16x16 grey thumbnail."""
    valid: np.ndarray
    """[N] bool: False where the image could not be decoded (its hashes are zeros)."""

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(cls, keys: list[str], prints: list[tuple[np.ndarray, np.ndarray] | None]) -> "Fingerprints":
        blank = (np.zeros((2, 8), np.uint8), np.zeros(THUMB * THUMB, np.uint8))
        filled = [p if p is not None else blank for p in prints]
        return cls(list(keys), np.stack([h for h, _ in filled]).reshape(-1, 2, 8) if filled else np.zeros((0, 2, 8), np.uint8),
                   np.stack([t for _, t in filled]).reshape(-1, THUMB * THUMB) if filled else np.zeros((0, THUMB * THUMB), np.uint8),
                   np.array([p is not None for p in prints], bool))

    @classmethod
    def concat(cls, parts: list["Fingerprints"]) -> "Fingerprints":
        if not parts:
            return cls.of([], [])
        return cls([k for p in parts for k in p.keys], np.concatenate([p.hashes for p in parts]),
                   np.concatenate([p.thumbs for p in parts]), np.concatenate([p.valid for p in parts]))


def of_image(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """([2, 8] uint8 pHash and dHash, [256] uint8 thumbnail) of a decoded image."""
    import imagehash

    grey = image.convert("L")
    hashes = np.stack([np.packbits(imagehash.phash(grey).hash.flatten()),
                       np.packbits(imagehash.dhash(grey).hash.flatten())])
    return hashes, np.asarray(grey.resize((THUMB, THUMB), Image.BOX), np.uint8).ravel()


def of_crops(image: Image.Image, flips: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """The image whole, then its 85/90/95% crops at the centre and corners (16 fingerprints: a copy
    cropped from the image matches one of these, not the whole); ``flips``: 32, the mirrored
    image's after them (pHash is not flip-invariant)."""
    if flips:
        return of_crops(image) + of_crops(image.transpose(Image.FLIP_LEFT_RIGHT))
    width, height = image.size
    out = [of_image(image)]
    for scale in CROP_SCALES:
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        for fx, fy in CROP_CORNERS:
            left, top = round((width - w) * fx), round((height - h) * fy)
            out.append(of_image(image.crop((left, top, left + w, top + h))))
    return out


def unit_thumbs(thumbs: np.ndarray) -> np.ndarray:
    """[K, 256] thumbnails as float32 rows with their mean brightness removed and unit length (a flat
    thumbnail stays all zeros), so that a dot product of two is their cosine after removing each
    one's mean brightness (a brightened copy scores ~1, a flat image against anything 0)."""
    centred = thumbs.astype(np.float32)
    centred -= centred.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)


def hamming_pairs(database: np.ndarray, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, database index, distance) of every pair of [*, 8] hashes within ``radius``
    bits, by faiss range search on a binary index."""
    import faiss

    index = faiss.IndexBinaryFlat(64)
    index.add(np.ascontiguousarray(database))
    limits, distances, labels = index.range_search(np.ascontiguousarray(queries), radius + 1)  # faiss: < radius
    rows = np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))
    return rows, labels.astype(np.int64), distances.astype(np.int64)


def bits_apart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of [K, 8] packed hashes."""
    return _BITS_SET[a ^ b].sum(axis=1, dtype=np.int64)


def near_pairs(queries: tuple[np.ndarray, np.ndarray], database: tuple[np.ndarray, np.ndarray], radius: int,
               min_cosine: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, database row, pHash + dHash bits apart) of every pair of (hashes [*, 2, 8],
    thumbnails [*, 256]) whose pHash AND dHash are within ``radius`` bits and, when ``min_cosine``
    is above 0, whose thumbnails' cosine is at least that."""
    (query_hashes, query_thumbs), (base_hashes, base_thumbs) = queries, database
    if not len(query_hashes) or not len(base_hashes):
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    rows, cols, phash = hamming_pairs(base_hashes[:, 0], query_hashes[:, 0], radius)
    dhash = bits_apart(base_hashes[cols, 1], query_hashes[rows, 1])
    keep = dhash <= radius
    rows, cols, bits = rows[keep], cols[keep], (phash + dhash)[keep]
    if min_cosine > 0 and len(rows):
        # Each thumbnail in a pair normalised once, not once per pair: a pair's cosine is then one
        # dot product (Fashion-MNIST test against train: 11.6 -> 2.7 s, benchmarks/RESULTS.md).
        # Only those in a pair: a curate run's whole set as float32 would be 4x its thumbnails.
        query_rows, query_of = np.unique(rows, return_inverse=True)
        base_rows, base_of = np.unique(cols, return_inverse=True)
        query_units, base_units = unit_thumbs(query_thumbs[query_rows]), unit_thumbs(base_thumbs[base_rows])
        keep = np.empty(len(rows), bool)
        for start in range(0, len(rows), PAIR_CHUNK):  # [chunk, 256] floats at a time, not [pairs, 256]
            part = slice(start, start + PAIR_CHUNK)
            keep[part] = np.einsum("ij,ij->i", query_units[query_of[part]], base_units[base_of[part]]) >= min_cosine
        rows, cols, bits = rows[keep], cols[keep], bits[keep]
    return rows, cols, bits


def sample_image(sample: dict[str, bytes]) -> Image.Image | None:
    """A shard sample's image decoded to RGB, or None (no image member, or one that does not decode)."""
    data = next((sample[ext] for ext in EXTENSIONS if ext in sample), None)
    try:
        return decode_rgb(data, MAX_PIXELS) if data is not None else None
    except Exception:  # noqa: BLE001 - an undecodable image is counted by its caller, never fatal
        return None


def of_samples(samples: Iterable[dict[str, bytes]]) -> Fingerprints:
    keys: list[str] = []
    prints: list = []
    for sample in samples:
        _add(sample, keys, prints)
    return Fingerprints.of(keys, prints)


def _add(sample: dict[str, bytes], keys: list[str], prints: list) -> None:
    image = sample_image(sample)
    keys.append(sample["__key__"])
    prints.append(of_image(image) if image is not None else None)


def sidecar_path(tar: Path) -> Path:
    return Path(tar).with_name(Path(tar).name.removesuffix(".tar") + ".fp.npz")


def write_sidecar(tar: Path, prints: Fingerprints, tar_bytes: int, tar_sha256: str) -> None:
    _save(sidecar_path(tar), prints, {"tar_bytes": tar_bytes, "tar_sha256": tar_sha256})


def _save(path: Path, prints: Fingerprints, about: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(prints.keys, dtype=str), hashes=prints.hashes, thumbs=prints.thumbs,
             valid=prints.valid, about=np.array(json.dumps(about)))
    write_bytes_atomic(path, buffer.getvalue())


def _load(path: Path) -> tuple[Fingerprints, dict] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            prints = Fingerprints([str(k) for k in data["keys"]], data["hashes"], data["thumbs"], data["valid"])
            return prints, json.loads(str(data["about"]))
    except (OSError, ValueError, KeyError):
        return None


def read_sidecar(tar: Path, recorded_sha256: str | None) -> Fingerprints | None:
    """The stored fingerprints of ``tar`` when they describe this very file: its size, and its
    sha256 where the manifest records one (None: none stored, or stale)."""
    loaded = _load(sidecar_path(tar))
    if loaded is None:
        return None
    prints, about = loaded
    if about.get("tar_bytes") != Path(tar).stat().st_size:
        return None
    if recorded_sha256 is not None and about.get("tar_sha256") != recorded_sha256:
        return None
    return prints


@dataclass
class Lookup:
    """Fingerprints of a shard set and where they came from."""

    prints: Fingerprints
    stored: int
    """Images whose fingerprints were read (sidecars, or this cache from an earlier need)."""
    hashed: int
    """Images decoded and hashed now."""


def of_shards(shards: ShardSet, cache_dir: Path | None = None) -> Lookup:
    """Every image's fingerprints, in shard order: a shard's sidecar when it is current, else the
    cache's copy, else hashed now (and kept in ``cache_dir`` when given)."""
    recorded = shard_hashes(shards.directory) if shards.directory else {}
    parts, stored, hashed = [], 0, 0
    for url in shards.urls:
        prints = stored_prints(url, recorded.get(Path(url).name), cache_dir)
        if prints is None:
            prints, whole = _hash_shard(url)
            hashed += len(prints)
            if whole and cache_dir is not None:
                keep(url, prints, cache_dir)
        else:
            stored += len(prints)
        parts.append(prints)
    return Lookup(Fingerprints.concat(parts), stored, hashed)


def _hash_shard(url: str) -> tuple[Fingerprints, bool]:
    """The fingerprints of a shard's samples, and whether it was read to its end: a damaged shard
    gives those before the damage (reading it is the eval's business, which counts or refuses it)."""
    keys, prints = [], []
    try:
        with open_shard(url) as handle:
            for sample in iter_tar_samples(handle):
                _add(sample, keys, prints)
    except (OSError, ValueError, tarfile.TarError):
        return Fingerprints.of(keys, prints), False
    return Fingerprints.of(keys, prints), True


def stored_prints(url: str, recorded: str | None, cache_dir: Path | None) -> Fingerprints | None:
    """A shard's fingerprints without decoding it: its sidecar when current (``recorded``: the
    manifest's sha256 of it), else the copy an earlier need kept in ``cache_dir`` (None: neither)."""
    if not is_local(url):
        return None
    path = Path(url.removeprefix("file://"))
    prints = read_sidecar(path, recorded)
    if prints is None and cache_dir is not None:
        loaded = _load(_cache_path(url, cache_dir))
        prints = loaded[0] if loaded else None
    return prints


def keep(url: str, prints: Fingerprints, cache_dir: Path) -> None:
    """Keep a local shard's fingerprints in ``cache_dir`` for the next need."""
    if is_local(url):
        _save(_cache_path(url, cache_dir), prints, {})


def _cache_path(url: str, cache_dir: Path) -> Path:
    """Named by the shard's absolute path, size and mtime: a changed shard is hashed again."""
    path = Path(url.removeprefix("file://")).resolve()
    stat = path.stat()
    name = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{name}.fp.npz"

