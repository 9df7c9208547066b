"""Sources -> WebDataset shards + sizes.json + manifest.json, resumable and fully accounted.

Accounting invariant (checked by the tests): rows = written + failed + filtered + duplicates.
Shards are written to a temporary file, fsynced and renamed, so a shard file that exists is
complete; a rerun after a crash writes only the shards that are missing. Beside each shard,
``NNNNN.fp.npz`` keeps its images' near-duplicate fingerprints (pipeline/fingerprints.py), so
curation and every eval's contamination figure never decode these images again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from vitpipe.config import ConfigError, IngestConfig, to_dict
from vitpipe.locks import DirLock
from vitpipe.pipeline import fingerprints, manifest as manifest_io
from vitpipe.pipeline.sources import (
    FASHION_MNIST_CLASSES, Failure, Record, Sample, Skipped, SourceSpec, folder_label_map, iter_fashion_mnist,
    iter_folder, iter_idx, parse_source,
)
from vitpipe.pipeline.tario import write_tar_atomic

WORK_DIR = "_work"
MAX_EXAMPLES_PER_REASON = 20


def split_of_key(key: str, val_fraction: float, seed: int) -> str:
    """Stable train/val assignment from the key alone, so reruns and resumes agree."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


@dataclass
class SplitWriter:
    """Groups samples of one split into fixed-size shards; skips shards that already exist."""

    directory: Path
    shard_size: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    buffer: list[Sample] = field(default_factory=list)
    written: int = 0
    skipped_existing: int = 0

    def add(self, sample: Sample) -> None:
        self.buffer.append(sample)
        if len(self.buffer) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        entry, reused = write_shard(self.directory, len(self.shards), self.buffer)
        self.skipped_existing += reused
        self.shards.append(entry)
        self.written += len(self.buffer)
        self.buffer = []


def write_shard(directory: Path, index: int, samples: list[Sample]) -> tuple[dict[str, Any], bool]:
    """Write shard ``index`` of a split and its stats file; returns (stats, reused). A shard a killed
    run already completed is kept when it holds these samples, refused when it holds others."""
    name = f"{index:05d}.tar"
    path, stats_path = directory / name, directory / f"{index:05d}_stats.json"
    if path.exists() and stats_path.exists():
        entry = json.loads(stats_path.read_text())
        if entry.get("first_key") != samples[0].key or entry.get("samples") != len(samples):
            raise ConfigError(f"{path} does not hold the samples this ingest would write there; "
                              "rerun with --overwrite")
        if fingerprints.read_sidecar(path, entry["sha256"]) is None:  # a shard of a version that kept none
            fingerprints.write_sidecar(path, _fingerprints(samples), entry["bytes"], entry["sha256"])
        return entry, True
    directory.mkdir(parents=True, exist_ok=True)
    size, digest = write_tar_atomic(path, (_to_wds(s) for s in samples))
    fingerprints.write_sidecar(path, _fingerprints(samples), size, digest)
    labels = Counter(s.label for s in samples if s.label is not None)
    entry = {
        "file": name, "samples": len(samples), "bytes": size, "sha256": digest,
        "first_key": samples[0].key, "last_key": samples[-1].key,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "captions": sum(s.text is not None for s in samples),
        "captions_utf8_repaired": sum(bool(s.meta.get("caption_utf8_repaired")) for s in samples),
    }
    manifest_io.write_json_atomic(stats_path, entry)
    return entry, False


def _fingerprints(samples: list[Sample]) -> fingerprints.Fingerprints:
    """Of the images as stored (after any resize and re-encode): what training and evaluation see."""
    return fingerprints.of_samples({"__key__": s.key, s.ext: s.image} for s in samples)


def _to_wds(sample: Sample) -> dict[str, bytes]:
    meta = {"key": sample.key, "sha256": sample.content_hash, "original_width": sample.original_size[0],
            "original_height": sample.original_size[1], **sample.meta}
    item = {"__key__": sample.key, sample.ext: sample.image, "json": json.dumps(meta).encode()}
    if sample.label is not None:
        item["cls"] = str(sample.label).encode()
    if sample.text is not None:
        item["txt"] = sample.text.encode()
    return item


def _records(spec: SourceSpec, work: Path, config: IngestConfig) -> Iterator[Record]:
    if spec.kind == "url_list":
        from vitpipe.pipeline import web

        yield from web.iter_downloaded(web.download(Path(spec.location), work, config), config.label_col,
                                       config.split_col)
    elif spec.kind == "folder":
        yield from iter_folder(Path(spec.location), config)
    elif spec.kind == "hf":
        from vitpipe.pipeline.hf import iter_hf

        yield from iter_hf(spec.location, config)
    elif spec.kind == "idx":
        yield from iter_idx(spec.location, spec.extra.get("labels"), config, split=None, prefix="")
    elif spec.kind == "fashion-mnist":
        yield from iter_fashion_mnist(spec.extra["split"], config)
    else:  # parse_source only makes the kinds above
        raise ConfigError(f"unknown source kind {spec.kind}")


def _filter_reason(sample: Sample, config: IngestConfig) -> str | None:
    width, height = sample.original_size
    if config.min_size and width and height and min(width, height) < config.min_size:
        return "min_size"
    if config.max_aspect and width and height and max(width, height) / min(width, height) > config.max_aspect:
        return "max_aspect"
    return None


def _prepare_output(out: Path, settings: dict[str, Any], fingerprint: dict[str, Any],
                    overwrite: bool) -> dict[str, Any] | None:
    """Return the finished manifest when this exact ingest of this exact source already completed
    (nothing to do). A source that changed since is refused unless ``overwrite``."""
    work = out / WORK_DIR
    settings_path, source_path = work / "settings.json", work / "source.json"
    if out.exists() and any(out.iterdir()):
        previous = json.loads(settings_path.read_text()) if settings_path.exists() else None
        finished = manifest_io.read_manifest(out) if (out / "manifest.json").exists() else None
        before = (json.loads(source_path.read_text()) if source_path.exists()
                  else (finished or {}).get("source_fingerprint"))
        if previous is None and finished is None:
            raise ConfigError(f"{out} exists and was not written by vitpipe ingest; choose another --out "
                              "(--overwrite only replaces earlier ingests)")
        elif overwrite:
            shutil.rmtree(out)
        elif (previous or (finished or {}).get("settings_full")) != settings:
            raise ConfigError(f"{out} holds an ingest with other settings; pass --overwrite to replace it")
        elif before is not None and before != fingerprint:
            raise ConfigError(f"the source changed since the ingest in {out} ({before['files']} files then, "
                              f"{fingerprint['files']} now, contents differ); pass --overwrite to ingest it again")
        elif finished is not None:
            return finished
    work.mkdir(parents=True, exist_ok=True)
    manifest_io.write_json_atomic(settings_path, settings)
    manifest_io.write_json_atomic(source_path, fingerprint)
    return None


@dataclass
class Accounts:
    """Where every row went: rows = written + failed + filtered + duplicates, always."""

    rows: int = 0
    failures: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    duplicates: int = 0
    hashes: set[str] = field(default_factory=set)
    """Content hashes of train+val samples kept so far (exact-duplicate removal)."""

    def split_of(self, record: Record, config: IngestConfig) -> str | None:
        """The split a record goes to, or None when it was counted as failed/filtered/duplicate."""
        self.rows += 1
        outcome, where = place(record, config)
        if outcome == "failed":
            self.failures[where] += 1
            bucket = self.examples.setdefault(where, [])
            if len(bucket) < MAX_EXAMPLES_PER_REASON:
                bucket.append({"ref": record.ref, "detail": record.detail[:300]})
            return None
        if outcome == "filtered":
            self.filtered[where] += 1
            return None
        if config.dedup and where != "test":  # an official test split is kept as it is
            if record.content_hash in self.hashes:
                self.duplicates += 1
                return None
            self.hashes.add(record.content_hash)
        return where


def place(record: Record, config: IngestConfig) -> tuple[str, str]:
    """("failed" | "filtered", reason) or ("sample", split) for one record, before dedup (which
    needs every record before it: a set here, a Spark window in vitpipe.pipeline.spark)."""
    if isinstance(record, Skipped):
        return "filtered", record.reason
    if isinstance(record, Failure):
        return "failed", record.reason
    reason = _filter_reason(record, config)
    if reason:
        return "filtered", reason
    split = record.split or "train"
    if split == "train" and config.val_fraction:  # carved from train only: a test split stays whole
        split = split_of_key(record.key, config.val_fraction, config.seed)
    return "sample", split


def ingest(source: str, out: Path, config: IngestConfig, *, overwrite: bool = False,
           progress: bool | None = None) -> dict[str, Any]:
    """Ingest ``source`` into ``out``; returns the manifest (also written to out/manifest.json)."""
    spec = parse_source(source)
    out = Path(out)
    if config.split_col and spec.kind != "url_list":
        raise ConfigError(f"ingest.split_col is for URL lists; {source} is a {spec.kind} source")
    if config.distributor == "pyspark":  # before anything is written
        from vitpipe.pipeline import spark

        spark.check_can_run(spec)
    settings = {"source": spec.describe(),
                "ingest": {k: v for k, v in to_dict(config).items() if k not in OUTCOME_ONLY}}
    # beside --out, not in it (an --out must hold nothing but an ingest); two at once collided on
    # their shards' temp files and one died with FileNotFoundError
    lock = DirLock(out.parent / f".{out.name}.ingest.lock", out, "one ingest per --out at a time")
    lock.acquire()
    try:
        return _ingest_into(spec, out, config, settings, overwrite, progress)
    finally:
        lock.release()


def _ingest_into(spec: SourceSpec, out: Path, config: IngestConfig, settings: dict[str, Any], overwrite: bool,
                 progress: bool | None) -> dict[str, Any]:
    fingerprint = spec.fingerprint()
    done = _prepare_output(out, settings, fingerprint, overwrite)
    if done is not None:
        done["resumed_nothing_to_do"] = True
        return done
    flat = config.val_fraction == 0 and not _has_splits(spec, config)
    start = time.monotonic()
    if config.distributor == "pyspark":
        from vitpipe.pipeline import spark

        writers, accounts = spark.ingest_url_list(Path(spec.location), out, config, flat)
    else:
        writers, accounts = _write_locally(spec, out, config, flat, progress)
    manifest = _manifest(spec, config, settings, writers, accounts, flat, time.monotonic() - start)
    manifest["source_fingerprint"] = fingerprint
    _finish(out, manifest)
    return manifest


class IngestFailed(RuntimeError):
    """The ingest finished (manifest written) but wrote nothing, or failed on too many rows."""


OUTCOME_ONLY = ("max_failed_fraction",)
"""Settings that judge an ingest's outcome without changing its shards."""


def check_outcome(manifest: dict[str, Any], config: IngestConfig) -> None:
    """Raise IngestFailed when nothing was written, or more than ``max_failed_fraction`` of the
    rows failed: a scheduled pipeline must not go on to pretrain on it."""
    failed, rows = sum(manifest["failures"].values()), manifest["rows"]
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(manifest["failures"].items(), key=lambda i: -i[1])[:4])
    if manifest["written"] == 0:
        raise IngestFailed(f"nothing written: {rows} rows, {failed} failed ({reasons or 'no failures'}), "
                           f"{sum(manifest['filtered'].values())} filtered, {manifest['duplicates']} duplicates")
    if rows and failed / rows > config.max_failed_fraction:
        raise IngestFailed(f"{failed} of {rows} rows failed ({failed / rows:.1%} > max_failed_fraction="
                           f"{config.max_failed_fraction}): {reasons}; the manifest lists them")


def _write_locally(spec: SourceSpec, out: Path, config: IngestConfig, flat: bool,
                   progress: bool | None) -> tuple[dict[str, SplitWriter], Accounts]:
    writers: dict[str, SplitWriter] = {}
    accounts = Accounts()
    records: Iterable[Record] = _records(spec, out / WORK_DIR, config)
    if sys.stderr.isatty() if progress is None else progress:
        from tqdm import tqdm

        records = tqdm(records, desc="ingest", unit="img", dynamic_ncols=True)
    for record in records:
        split = accounts.split_of(record, config)
        if split is None:
            continue
        if split not in writers:
            writers[split] = SplitWriter(out if flat else out / split, config.shard_size)
        writers[split].add(record)
    for writer in writers.values():
        writer.flush()
    return writers, accounts


def _finish(out: Path, manifest: dict[str, Any]) -> None:
    """The manifest marks the ingest complete; only then is img2dataset's copy of the data removed
    (a rerun of a complete ingest needs nothing but the manifest)."""
    manifest_io.write_json_atomic(out / "manifest.json", manifest)
    shutil.rmtree(out / WORK_DIR / "img2dataset", ignore_errors=True)


def _manifest(spec: SourceSpec, config: IngestConfig, settings: dict[str, Any], writers: dict[str, SplitWriter],
              accounts: Accounts, flat: bool, seconds: float) -> dict[str, Any]:
    """sizes.json per split, then the manifest (its accounting checked: never silently wrong)."""
    written = sum(w.written for w in writers.values())
    splits = {}
    for name, writer in writers.items():
        manifest_io.write_json_atomic(writer.directory / "sizes.json",
                                      {s["file"]: s["samples"] for s in writer.shards})
        splits[name] = {"dir": "." if flat else name, "written": writer.written, "shards": writer.shards,
                        "shards_reused": writer.skipped_existing}
    if accounts.rows != written + sum(accounts.failures.values()) + sum(accounts.filtered.values()) + accounts.duplicates:
        raise RuntimeError("ingest accounting does not add up; this is a bug")
    return manifest_io.build_manifest(
        source=spec.describe(), settings=to_dict(config), settings_full=settings, rows=accounts.rows,
        written=written, failures=dict(accounts.failures), filtered=dict(accounts.filtered),
        duplicates=accounts.duplicates, splits=splits, failure_examples=accounts.examples,
        label_map=_label_map(spec, config), seconds=seconds,
    ) | {"fields": field_counts([s for w in writers.values() for s in w.shards])}


def field_counts(shards: list[dict[str, Any]]) -> dict[str, int]:
    """Written samples without a label (none, or Hugging Face's -1: left out of labelled evals),
    without a caption, and with a caption whose bytes were not UTF-8 (decoded with U+FFFD)."""
    return {"unlabelled": sum(s["samples"] - sum(s["labels"].values()) for s in shards),
            "uncaptioned": sum(s["samples"] - s["captions"] for s in shards),
            "captions_utf8_repaired": sum(s.get("captions_utf8_repaired", 0) for s in shards)}


def _has_splits(spec: SourceSpec, config: IngestConfig) -> bool:
    """Does the source bring several splits of its own (each to OUT/<split>/)?"""
    if spec.kind == "fashion-mnist":
        return spec.extra["split"] == "all"
    if spec.kind == "hf":
        from vitpipe.pipeline.hf import open_splits

        return None not in open_splits(spec.location, config.split)
    return spec.kind == "url_list" and bool(config.split_col)


def _label_map(spec: SourceSpec, config: IngestConfig) -> dict[str, int] | None:
    if spec.kind == "fashion-mnist":
        return {name: index for index, name in enumerate(FASHION_MNIST_CLASSES)}
    if spec.kind == "folder":
        return folder_label_map(Path(spec.location)) or None
    if spec.kind == "hf":
        from vitpipe.pipeline.hf import label_names

        return label_names(spec.location, config)
    return None
