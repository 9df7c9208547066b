"""Hugging Face datasets as users hold them, read from local disk only (never from the hub):
``save_to_disk`` folders (a Dataset or a DatasetDict), any folder ``datasets.load_dataset`` reads
(hub layout ``data/train-00000-of-00003.parquet``, arrow, imagefolder, webdataset), and parquet
files or globs. Everything but ``save_to_disk`` data (memory-mapped already) is streamed, so memory
stays flat in the dataset's size. The dataset's own splits are kept."""

from __future__ import annotations

import functools
import glob
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vitpipe.config import ConfigError, IngestConfig
from vitpipe.pipeline.sources import Failure, ImageRejected, Record, decode_caption, make_sample

SHUFFLE_BUFFER = 1000
"""Rows a streamed dataset is shuffled through (memory: this many encoded images)."""
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _offline() -> None:
    """No network at run time, whatever the user's environment says about the hub; and no progress
    bars of `datasets` in vitpipe's output (ingest draws its own)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()


def hf_files(location: str) -> list[Path]:
    """The files a ``hf:`` location consists of (for the source fingerprint)."""
    path = Path(location)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(Path(p) for p in glob.glob(location) if Path(p).is_file())


@functools.lru_cache(maxsize=None)
def _note_once(message: str) -> None:
    """Splits are opened several times per ingest (plan, count, read); say a thing once."""
    print(message, file=sys.stderr)


def _splits_on_disk(datasets, path: Path) -> dict[str | None, Any]:
    """A saved DatasetDict split by split: ``load_from_disk`` of the whole fails (IndexError) when
    one split is empty; an empty split is left out with a note."""
    names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    splits = {}
    for name in names:
        if not list((path / name).glob("*.arrow")):
            _note_once(f"note: hf:{path}: split {name!r} is empty; left out")
            continue
        splits[name] = datasets.load_from_disk(str(path / name))
    if not splits:
        raise ConfigError(f"hf:{path}: every split is empty")
    return splits


def open_splits(location: str, split: str = "") -> dict[str | None, Any]:
    """split name -> Dataset or IterableDataset; the key is None for a dataset without splits (a
    ``save_to_disk`` Dataset) or when ``split`` picks one, so the output is flat as for a folder."""
    _offline()
    import datasets

    path = Path(location)
    if (path / "dataset_dict.json").is_file():
        splits = _splits_on_disk(datasets, path)
    elif (path / "state.json").is_file():
        splits = {None: datasets.load_from_disk(str(path))}
    else:
        loaded = _load_streaming(datasets, location)
        splits = dict(loaded) if len(loaded) > 1 or split else {None: next(iter(loaded.values()))}
    if split:
        if split not in splits:
            raise ConfigError(f"hf:{location}: no split {split!r}; splits: {', '.join(map(str, splits))}")
        return {None: splits[split]}
    return splits


def _load_streaming(datasets, location: str):
    path = Path(location)
    try:
        if path.is_dir():
            return datasets.load_dataset(str(path), streaming=True)
        files = sorted(glob.glob(location))
        if not files:
            raise ConfigError(f"hf:{location}: no such file or folder")
        builder = FILE_BUILDERS.get(Path(files[0]).suffix.lower())
        if builder is None:
            raise ConfigError(f"hf:{location}: expected a folder or {', '.join(FILE_BUILDERS)} files")
        return datasets.load_dataset(builder, data_files=files, streaming=True)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"hf:{location}: not a dataset `datasets` can read from disk "
                          f"({str(err).splitlines()[0][:200]})") from None


def _columns(dataset) -> list[str]:
    if dataset.features is not None:
        return list(dataset.features)
    return list(dataset.column_names or [])


def check_columns(location: str, dataset, config: IngestConfig) -> tuple[bool, bool]:
    """(has a label column, has a text column); a missing image column, or a caption column that
    was asked for by name and is missing, is one ConfigError naming the columns there are."""
    columns = _columns(dataset)
    missing = [c for c in (config.image_col, config.text_col) if c and c not in columns]
    if missing:
        raise ConfigError(f"hf:{location}: no column {missing[0]!r}; columns: {', '.join(columns)}")
    return bool(config.label_col and config.label_col in columns), bool(config.text_col)


def label_names(location: str, config: IngestConfig) -> dict[str, int] | None:
    """The label column's ClassLabel names as a label map (for zero-shot prompts and reports)."""
    import datasets

    for dataset in open_splits(location, config.split).values():
        feature = (dataset.features or {}).get(config.label_col) if config.label_col else None
        if isinstance(feature, datasets.ClassLabel):
            return {name: index for index, name in enumerate(feature.names)}
    return None


def iter_hf(location: str, config: IngestConfig) -> Iterator[Record]:
    """Every row of every split (or of ``config.split``) as a Sample, in the dataset's order (so a
    rerun after a crash skips the shards already written, as for folders)."""
    import datasets

    splits = open_splits(location, config.split)
    names = label_names(location, config) if config.label_col else None
    for split_name, dataset in splits.items():
        has_label, has_text = check_columns(location, dataset, config)
        if isinstance((dataset.features or {}).get(config.image_col), datasets.Image):
            dataset = dataset.cast_column(config.image_col, datasets.Image(decode=False))
        prefix = f"{split_name}_" if split_name else ""
        for index, row in _rows(dataset, config, isinstance(dataset, datasets.IterableDataset)):
            ref = f"{prefix}{index}"
            data, ext = image_bytes(row[config.image_col])
            if data is None:
                yield Failure("not_an_image", ref, f"unsupported image value {type(row[config.image_col]).__name__}")
                continue
            label = hf_label(row[config.label_col], config.label_col, names) if has_label else None
            text, meta = hf_text(row[config.text_col] if has_text else None)
            try:
                sample = make_sample(data, f"{prefix}{index:09d}", config, ext, label=label, text=text,
                                     meta={"source": ref, **meta})
            except ImageRejected as err:
                yield Failure(err.reason, ref, str(err))
                continue
            sample.split = split_name
            yield sample


def hf_label(value: Any, column: str, names: dict[str, int] | None) -> int | None:
    """A label cell as a class index; None for "no label" (None, or Hugging Face's -1). A value that
    is not an integer (0.7, "cat" without ClassLabel names to map it) is one ConfigError naming
    the column: truncating it would score wrong labels without a word."""
    if value is None:
        return None
    if isinstance(value, str) and names and value in names:
        return names[value]
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise ConfigError(f"label column {column!r} holds {value!r} ({type(value).__name__}), not an integer "
                          "class index; pick an integer (or ClassLabel) column with label_col=NAME")
    return int(value) if value >= 0 else None


def hf_text(value: Any) -> tuple[str | None, dict[str, Any]]:
    """A caption cell as text, and what the manifest counts about it: bytes that are not UTF-8
    are decoded with U+FFFD and marked (``caption_utf8_repaired``), never rewritten silently."""
    if value is None:
        return None, {}
    if isinstance(value, (bytes, bytearray)):
        text, repaired = decode_caption(bytes(value))
        return text, {"caption_utf8_repaired": True} if repaired else {}
    return str(value), {}


def _rows(dataset, config: IngestConfig, streamed: bool) -> Iterator[tuple[int, dict]]:
    """(row number in the dataset, row): the key stays the row's own whatever the order. Shuffled
    (seeded, so a rerun sees the same order): a random permutation for datasets on disk, a bounded
    buffer for streams."""
    if not config.shuffle:
        yield from enumerate(dataset)
    elif not streamed:
        for index in np.random.default_rng(config.seed).permutation(len(dataset)):
            yield int(index), dataset[int(index)]
    else:
        rng, buffer = random.Random(config.seed), []
        for item in enumerate(dataset):
            buffer.append(item)
            if len(buffer) >= SHUFFLE_BUFFER:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def image_bytes(value: Any) -> tuple[bytes | None, str | None]:
    """An image cell (``{"bytes", "path"}``, raw bytes or a PIL image) -> (encoded bytes, extension)."""
    import io

    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], _ext_of(value.get("path") or "")
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes(), _ext_of(value["path"])
        return None, None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if hasattr(value, "save"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    return None, None


def _ext_of(path: str) -> str | None:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(suffix, suffix) or None
