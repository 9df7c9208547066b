"""Extracted features on disk, written by one process or many.

Each process streams its samples' features into numbered ``.npy`` parts (a few thousand rows
each, so its memory does not grow with the dataset) plus one index file of its keys, labels and
read tally. The first process then merges every part into one ``features.npy`` per layer, rows
in key order, so one process and N processes produce the same file. Readers memory-map it.

    CACHE/<key>/features.npy   [N, D] float32, rows in key order
    CACHE/<key>/labels.npy     [N] int64 (labelled shards only)
    CACHE/<key>/index.json     keys and the read tally; written last: its presence means complete
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from vitpipe.atomic import write_text_atomic
from vitpipe.pipeline.loader import ReadTally

CHUNK_ROWS = 4096


@dataclass(frozen=True)
class Processes:
    """Which extraction process this is: torchrun and accelerate launch set RANK / WORLD_SIZE."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Processes":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def first(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        """Every process's parts are on disk past this point."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            # gloo on CPU and GPU alike: only a barrier crosses it; a merge may take a while
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=timedelta(hours=2))
        dist.barrier()


@contextmanager
def cache_lock(parts: Path, processes: Processes):
    """Hold the feature cache of ``parts`` while it is checked, extracted and merged: a second
    eval of the same features (another command, another job) waits here, then finds them complete,
    instead of deleting the first one's parts under it. The first process of a job takes the lock;
    the others pass the barrier once it has it."""
    from filelock import FileLock

    lock = FileLock(f"{parts}.lock") if processes.first else None
    if lock is not None:
        parts.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        processes.barrier()
        yield
    finally:
        if lock is not None:
            lock.release()


@dataclass
class PartWriter:
    """One process's features, flushed every CHUNK_ROWS rows as numbered .npy parts."""

    directory: Path
    rank: int
    names: list[str]
    keys: list[str] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    buffers: dict[str, list[np.ndarray]] = field(default_factory=dict)
    buffered: int = 0
    chunks: int = 0

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"*r{self.rank:04d}*"):  # a killed run's parts of this rank
            stale.unlink()
        self.buffers = {name: [] for name in self.names}

    def add(self, features: dict[str, np.ndarray], keys: list[str], labels: np.ndarray | None) -> None:
        for name, array in features.items():
            self.buffers[name].append(np.asarray(array, dtype=np.float32))
        self.keys.extend(keys)
        if labels is not None:
            self.labels.append(np.asarray(labels, dtype=np.int64))
        self.buffered += len(keys)
        if self.buffered >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        for position, name in enumerate(self.names):
            np.save(self.directory / f"layer{position}.r{self.rank:04d}.{self.chunks:05d}.npy",
                    np.concatenate(self.buffers[name]))
            self.buffers[name] = []
        self.chunks, self.buffered = self.chunks + 1, 0

    def close(self, tally: ReadTally, with_labels: bool) -> None:
        self.flush()
        labels = np.concatenate(self.labels).tolist() if with_labels and self.labels else ([] if with_labels else None)
        _write_json(self.directory / f"r{self.rank:04d}.json",
                    {"keys": self.keys, "labels": labels, "chunks": self.chunks, "tally": tally.as_dict()})


def merge(directory: Path, world: int, targets: dict[str, Path], expected: int | None) -> ReadTally:
    """Rank 0, after the barrier: every process's parts -> one key-ordered store per layer (none
    when no sample was read). Returns what was read, summed over the processes."""
    indexes = [json.loads((directory / f"r{rank:04d}.json").read_text()) for rank in range(world)]
    keys = [key for index in indexes for key in index["keys"]]
    order = np.argsort(np.array(keys, dtype=str), kind="stable")
    destination = np.empty_like(order)
    destination[order] = np.arange(len(order))
    labelled = all(index["labels"] is not None for index in indexes)
    labels = np.array([label for index in indexes for label in index["labels"]], dtype=np.int64) if labelled else None
    tally = merged_tally(indexes, expected)
    for position, (name, target) in enumerate(targets.items()):
        target.mkdir(parents=True, exist_ok=True)
        (target / "index.json").unlink(missing_ok=True)
        tmp, merged, offset = target / "features.tmp.npy", None, 0
        for rank, index in enumerate(indexes):
            for chunk in range(index["chunks"]):
                part = np.load(directory / f"layer{position}.r{rank:04d}.{chunk:05d}.npy", mmap_mode="r")
                if merged is None:
                    merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keys), part.shape[1]))
                merged[destination[offset:offset + len(part)]] = part
                offset += len(part)
        if merged is None:
            break  # no sample anywhere: the caller says so
        merged.flush()
        del merged
        os.replace(tmp, target / "features.npy")
        if labels is not None:
            np.save(target / "labels.npy", labels[order])
        _write_json(target / "index.json", {"keys": [keys[i] for i in order], "tally": tally.as_dict()})
    shutil.rmtree(directory)
    return tally


def merged_tally(indexes: list[dict], expected: int | None) -> ReadTally:
    tally = ReadTally(expected)
    for index in indexes:
        part = ReadTally.from_dict(index["tally"])
        tally.read += part.read
        tally.skipped.update(part.skipped)
        tally.shard_errors.extend(part.shard_errors)
    return tally


def is_complete(target: Path, with_labels: bool = False) -> bool:
    return (target / "index.json").is_file() and (not with_labels or (target / "labels.npy").is_file())


def load(target: Path) -> tuple[np.ndarray, np.ndarray | None, list[str], ReadTally]:
    """(features memory-mapped copy-on-write, labels, keys, tally) of a complete store."""
    index = json.loads((target / "index.json").read_text())
    labels = np.load(target / "labels.npy") if (target / "labels.npy").is_file() else None
    features = np.load(target / "features.npy", mmap_mode="c")
    return features, labels, index["keys"], ReadTally.from_dict(index["tally"])


def _write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data))
