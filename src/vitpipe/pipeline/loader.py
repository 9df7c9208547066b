"""The shard loader every stage reads from.

shards -> (epoch-seeded shard shuffle | resampling) -> split by rank, then by worker -> tar
samples -> seeded shuffle buffer -> batches of raw samples -> decode + transform -> tensors.

Decoding happens after batching, so resuming at a data position skips batches without decoding
them, and each batch reseeds the augmentation RNG from (seed, epoch, rank, worker, batch index):
the same position always gives the same tensors, whatever happened before.

Training mode yields exactly ``samples_per_epoch // batch_size`` batches per rank and epoch
(workers loop over their shards as needed). Evaluation mode yields each sample exactly once
across all ranks and workers, with no shuffle and a partial last batch.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitpipe.config import ConfigError
from vitpipe.pipeline.census import UNLABELLED, parse_label
from vitpipe.pipeline.images import EXTENSIONS, ImageRejected, decode_rgb
from vitpipe.pipeline.shardset import ShardSet, open_shard
from vitpipe.pipeline.tario import iter_tar_samples
from vitpipe.pipeline.transforms import TransformSpec, build_transform
from vitpipe.pipeline.workers import (  # noqa: F401 (DataError, WorkerError: importable from here)
    WORKER_FAILURE, DataError, ShardLoader, WorkerError, WorkerFailure, leave_stop_signals_to_main,
)

MIN_SAMPLES_BEFORE_ERROR_CHECK = 100


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class LoaderSpec:
    shards: ShardSet
    batch_size: int
    transform: TransformSpec
    train: bool = True
    """Training: shuffle, repeat, fixed batches per epoch, drop last. Eval: each sample once."""
    fields: tuple[str, ...] = ("image",)
    """Batch fields: image, label, text, key."""
    seed: int = 0
    shuffle_buffer: int = 1000
    samples_per_epoch: int = 0
    """Per rank, training mode; 0 = dataset size / world size (needs sizes.json)."""
    resampled: bool = False
    subset_fraction: float = 1.0
    """Keep a fixed subset of samples (by hash of seed and key), e.g. 1% of the labels."""
    max_error_rate: float = 0.05
    """Training: abort when more samples than this fail to decode, or are lost to damaged shards
    (see ``_read_shard``). Evaluation only counts them."""
    rank: int = 0
    world_size: int = 1
    batch_hook: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None
    """Adds objective-specific fields to a finished batch (e.g. masks), in the worker."""
    views: Callable[[Any], list[torch.Tensor]] | None = None
    """Training: the objective's multi-view recipe (``transforms.MultiView``) instead of
    ``transform``; ``batch["image"]`` is then a list of [B, C, h, w] tensors, one per view."""


def in_subset(key: str, fraction: float, seed: int) -> bool:
    """Whether a sample belongs to the fixed ``fraction`` subset for ``seed`` (stable across runs and ranks).
    Hashed apart from ingest's train/val assignment (``split_of_key``, sha256 of "seed:key"): with
    the same hash, a 10% label subset of train carved with --val-fraction 0.1 and the same seed
    was empty, and any subset smaller than the val fraction shrank."""
    if fraction >= 1:
        return True
    digest = hashlib.sha256(f"subset:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class ShardDataset(IterableDataset):
    def __init__(self, spec: LoaderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.epoch = 0
        self.skip_batches = 0
        self.transform = spec.views if spec.views is not None else build_transform(spec.transform)
        if spec.train:
            per_rank = spec.samples_per_epoch or int((spec.shards.total or 0) * spec.subset_fraction) // spec.world_size
            if per_rank < spec.batch_size:
                raise ConfigError(
                    f"{per_rank} samples per epoch and rank is less than one batch of {spec.batch_size}"
                    + ("; lower train.batch_size" if spec.shards.total else " (no sizes.json: set data.samples_per_epoch)"))
            self.batches_per_epoch = per_rank // spec.batch_size
        else:
            self.batches_per_epoch = None

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Start at batch ``skip_batches`` of ``epoch`` (call before iterating)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an evaluation stream has no fixed length")
        return self.batches_per_epoch

    # -- per worker ------------------------------------------------------------------------

    def _slot(self) -> tuple[int, int]:
        """(logical worker, workers). The DataLoader takes batches round-robin starting at worker
        0, so after skipping k batches worker i plays the part of worker (i + k) % workers."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.skip_batches) % info.num_workers, info.num_workers

    def _shard_order(self, rng: random.Random, worker: int, workers: int) -> tuple[list[str], int, int]:
        """Shards for this worker, plus (offset, stride) for sample-level splitting when there are
        fewer shards than reader slots (every sample still goes to exactly one slot)."""
        spec = self.spec
        urls = list(spec.shards.urls)
        if spec.train and not spec.resampled:
            random.Random(spec.seed * 1_000_003 + self.epoch).shuffle(urls)  # same order on every rank
        slots = spec.world_size * workers
        slot = spec.rank * workers + worker
        if len(urls) >= slots:
            return urls[spec.rank::spec.world_size][worker::workers], 0, 1
        return urls, slot, slots

    def _samples(self, worker: int, workers: int, rng: random.Random) -> Iterator[dict[str, bytes]]:
        """Raw samples of this worker, round after round in training mode. The shuffle buffer is
        drained at the end of each round, so one round never holds a sample twice."""
        spec = self.spec
        while True:
            if spec.resampled:
                urls, offset, stride = [rng.choice(spec.shards.urls) for _ in range(len(spec.shards.urls))], 0, 1
            else:
                urls, offset, stride = self._shard_order(rng, worker, workers)
            produced = False
            for sample in self._shuffled(self._round(urls, offset, stride), rng):
                produced = True
                yield sample
            if not spec.train:
                return
            if not produced:
                raise DataError(f"rank {spec.rank} worker {worker}: its shards hold no samples")

    def _round(self, urls: list[str], offset: int, stride: int) -> Iterator[dict[str, bytes]]:
        index, self.lost = 0, {}  # per shard: a resampled round may draw one shard twice
        for url in urls:
            for sample in self._read_shard(url):
                if index % stride == offset and self._in_subset(sample["__key__"]):
                    yield sample
                index += 1

    def _in_subset(self, key: str) -> bool:
        return in_subset(key, self.spec.subset_fraction, self.spec.seed)

    def _read_shard(self, url: str) -> Iterator[dict[str, bytes]]:
        """The shard's samples; a corrupt or truncated tar ends it, counted, no sleep. In training
        the samples sizes.json lists after the break are lost: when those of one pass over this
        reader's shards exceed ``max_error_rate`` of the whole set, training stops (a shard cut to
        4 of its 80 samples must not train on those 4 in a loop). Losses spread over many readers
        (ranks x workers) may add up to that many times the rate before one reader stops."""
        read = 0
        try:
            with open_shard(url) as handle:
                for sample in iter_tar_samples(handle):
                    read += 1
                    yield sample
        except Exception as err:
            expected = self.spec.shards.sizes.get(Path(url).name)
            where = f"{url}: {err}" + (f" ({read} of the {expected} samples sizes.json lists)" if expected else "")
            self.shard_errors.append(where)
            self.last_error = where
            self.lost[url] = max(0, (expected or 0) - read)
            total, lost = self.spec.shards.total or 0, sum(self.lost.values())
            if self.spec.train and total and lost > self.spec.max_error_rate * total:
                raise DataError(f"{lost} of the {total} samples are lost to damaged shards (more than "
                                f"data.max_error_rate={self.spec.max_error_rate}); last: {where}") from None

    def _shuffled(self, samples: Iterator, rng: random.Random) -> Iterator:
        size = self.spec.shuffle_buffer if self.spec.train else 0
        if size <= 1:
            yield from samples
            return
        buffer: list = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            index = rng.randrange(size)
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, raw: dict[str, bytes]) -> tuple[dict[str, Any] | None, str | None]:
        """(item, None), or (None, the reason it was skipped)."""
        ext = next((e for e in EXTENSIONS if e in raw), None)
        try:
            if ext is None:
                raise ImageRejected("no_image")
            item: dict[str, Any] = {}
            if "image" in self.spec.fields:
                item["image"] = self.transform(decode_rgb(raw[ext]))
            if "label" in self.spec.fields:
                try:
                    label = parse_label(raw["cls"]) if "cls" in raw else None
                except ValueError:
                    raise ImageRejected("bad_label", repr(raw["cls"][:20])) from None
                if label is None:  # left out of labelled evals and counted, never voted as a class
                    raise ImageRejected(UNLABELLED)
                item["label"] = label
            if "text" in self.spec.fields:
                if "txt" not in raw:  # a missing caption must never become "" silently
                    raise ConfigError(f"sample {raw['__key__']} has no caption (txt); this command needs "
                                      "image-text shards (ingest with captions)")
                item["text"] = raw["txt"].decode("utf-8", errors="replace")
            if "key" in self.spec.fields:
                item["key"] = raw["__key__"]
            return item, None
        except (ImageRejected, ValueError, OSError) as err:
            if isinstance(err, ConfigError):
                raise
            self.last_error = f"{raw.get('__key__')}: {err}"
            return None, err.reason if isinstance(err, ImageRejected) else "decode_error"

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for name in self.spec.fields:
            values = [item[name] for item in items]
            if name == "image" and isinstance(values[0], list):  # views: one stacked tensor per view
                batch[name] = [torch.stack(view) for view in zip(*values)]
            elif name == "image":
                batch[name] = torch.stack(values)
            elif name == "label":
                batch[name] = torch.tensor(values, dtype=torch.long)
            else:
                batch[name] = values
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is None:
            yield from self._batches()
            return
        try:
            yield from self._batches()
        except Exception as err:  # ShardLoader raises it in the main process, in one line
            yield {WORKER_FAILURE: WorkerFailure.of(err)}

    def _batches(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        worker, workers = self._slot()
        base_seed = hash((spec.seed, self.epoch, spec.rank, worker)) & 0xFFFF_FFFF
        rng = random.Random(base_seed)
        self.shard_errors: list[str] = []
        self.skipped: Counter[str] = Counter()
        self.last_error = ""
        self.seen = self.errors = 0
        reported: Counter[str] = Counter()
        shard_errors_reported = 0
        samples = self._samples(worker, workers, rng)
        if spec.train:
            budget = len(range(worker, self.batches_per_epoch, workers))
            skip = len(range(worker, self.skip_batches, workers))
        else:
            budget, skip = None, 0
        produced = 0
        while budget is None or produced < budget:
            raw_batch = _take(samples, spec.batch_size)
            if not raw_batch or (spec.train and len(raw_batch) < spec.batch_size):
                if not spec.train and (self.skipped != reported or len(self.shard_errors) > shard_errors_reported):
                    # what the last batch could not report: the count of an evaluation must be whole
                    yield {"skipped": dict(self.skipped - reported),
                           "shard_errors": self.shard_errors[shard_errors_reported:]}
                return
            batch_index = produced
            produced += 1
            if batch_index < skip:
                continue
            # per-batch seed: the same data position always gives the same augmentations
            batch_seed = hash((base_seed, batch_index)) & 0x7FFF_FFFF
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone (num_workers=0)
                torch.manual_seed(batch_seed)
                items = [item for item in map(self._decode_counted, raw_batch) if item is not None]
                while spec.train and len(items) < spec.batch_size:
                    refill = _take(samples, 1)  # replace corrupt samples so training batches stay full
                    if not refill:
                        return
                    item = self._decode_counted(refill[0])
                    if item is not None:
                        items.append(item)
            if not items:
                continue
            batch = self._collate(items)
            batch["skipped"] = dict(self.skipped - reported)
            batch["shard_errors"] = self.shard_errors[shard_errors_reported:]
            reported, shard_errors_reported = self.skipped.copy(), len(self.shard_errors)
            if spec.batch_hook is not None:
                batch = spec.batch_hook(batch, torch.Generator().manual_seed(batch_seed))
            yield batch

    def _decode_counted(self, raw: dict[str, bytes]) -> dict[str, Any] | None:
        item, reason = self._decode(raw)
        self.seen += 1
        if item is None:
            self.errors += reason != UNLABELLED  # left out on purpose, not a failure to decode
            self.skipped[reason] += 1
            # evaluation counts every skipped sample (see ReadTally) and lets its caller decide
            if (self.spec.train and self.seen >= MIN_SAMPLES_BEFORE_ERROR_CHECK
                    and self.errors > self.spec.max_error_rate * self.seen):
                raise DataError(f"{self.errors} of {self.seen} samples failed to decode (more than "
                                f"data.max_error_rate={self.spec.max_error_rate}); last: {self.last_error}")
        return item


def _take(iterator: Iterator, count: int) -> list:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) == count:
            break
    return out


def eval_loader(shards: ShardSet, data, fields: tuple[str, ...] = ("image",), workers: int = 0,
                batch_size: int = 256, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Every sample of ``shards`` once (this rank's share), in shard order, as the run's ``data``
    config evaluates them (``TransformSpec.for_eval``: resize, centre crop, normalise): the one
    loader every eval, index, figure and artefact fitter reads through."""
    spec = LoaderSpec(shards, batch_size, TransformSpec.for_eval(data), train=False, fields=fields, rank=rank,
                      world_size=world_size)
    return make_loader(spec, workers)[1]


def make_loader(spec: LoaderSpec, num_workers: int) -> tuple[ShardDataset, DataLoader]:
    dataset = ShardDataset(spec)
    # its own generator: creating an iterator must not draw from the global RNG, or a resumed run
    # (which restores that RNG) would diverge from an uninterrupted one
    loader = ShardLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                        prefetch_factor=4 if num_workers else None,
                        generator=torch.Generator().manual_seed(spec.seed),
                        worker_init_fn=leave_stop_signals_to_main if num_workers else None)
    return dataset, loader


@dataclass
class ReadTally:
    """What an evaluation read of a shard set: samples expected (sizes.json), read, skipped by
    reason, and missing (expected but never seen: truncated or corrupt shards)."""

    expected: int | None
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    shard_errors: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        if self.expected is None:
            return 0
        return max(0, self.expected - self.read - sum(self.skipped.values()))

    @property
    def lost(self) -> int:
        """Samples that should have been read and were not; unlabelled ones a labelled eval leaves
        out on purpose are counted in ``skipped`` but are not lost."""
        return sum(n for reason, n in self.skipped.items() if reason != UNLABELLED) + self.missing

    def as_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "read": self.read, "skipped": dict(sorted(self.skipped.items())),
                "missing": self.missing, "shard_errors": self.shard_errors[:20]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReadTally":
        return cls(data["expected"], data["read"], Counter(data["skipped"]), list(data["shard_errors"]))

    def summary(self) -> str:
        parts = [f"{count} {reason}" for reason, count in sorted(self.skipped.items())]
        if self.missing:
            parts.append(f"{self.missing} missing from {len(self.shard_errors) or 'unreadable'} damaged shard(s)")
        expected = "?" if self.expected is None else self.expected
        return f"read {self.read} of {expected} samples; skipped: {', '.join(parts) or 'none'}"


def counted(loader: DataLoader, tally: ReadTally, field_name: str = "image") -> Iterator[dict[str, Any]]:
    """The batches of an evaluation loader, with every skipped sample added to ``tally``."""
    for batch in loader:
        tally.skipped.update(batch.pop("skipped", {}))
        tally.shard_errors.extend(batch.pop("shard_errors", []))
        if field_name in batch:
            tally.read += len(batch[field_name])
            yield batch
