"""URL lists through img2dataset, with the bounds img2dataset lacks.

img2dataset reads whole response bodies with no size or total-time bound, follows redirects to
any scheme and any address urllib knows and fetches ``file://`` URLs. We keep img2dataset for
everything else (reading the list, thread pools, resizing, webdataset output, incremental resume)
and swap in vitpipe's bounded, address-checking fetch (``vitpipe.pipeline.fetch``) inside its
download processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from PIL import ImageColor

from vitpipe.config import ConfigError, IngestConfig
from vitpipe.pipeline.fetch import FetchPolicy
from vitpipe.pipeline.sources import Failure, Record, Sample
from vitpipe.pipeline.tario import iter_tar_samples

OPENCV_PIXEL_BOUND = "OPENCV_IO_MAX_IMAGE_PIXELS"  # vitpipe set CV_IO_MAX_IMAGE_PIXELS, which OpenCV never reads


def _input_format(path: Path) -> str:
    name = path.name.lower()
    gz = name.endswith(".gz")
    base = name.removesuffix(".gz").rsplit(".", 1)[-1]
    if base == "parquet" and gz:
        raise ConfigError(f"{path}: gzipped parquet is not supported (parquet compresses itself)")
    return base + (".gz" if gz else "")


def check_url_list(path: Path, url_col: str, caption_col: str | None, split_col: str | None = None) -> list[str]:
    """Fail fast, with one line, on a list img2dataset would choke on deep inside its workers.
    Returns the list's column names."""
    fmt = _input_format(path)
    if fmt.startswith("txt"):
        for option, column in (("--caption-col", caption_col), ("--split-col", split_col)):
            if column:
                raise ConfigError(f"{path}: a .txt URL list has no columns; drop {option}")
        return ["url"]
    import pandas as pd

    try:
        if fmt == "parquet":
            columns = pq.read_schema(path).names
        elif fmt.startswith("jsonl"):
            columns = list(pd.read_json(path, lines=True, nrows=5).columns)
        else:
            columns = list(pd.read_csv(path, sep="\t" if fmt.startswith("tsv") else ",", nrows=5).columns)
    except Exception as err:  # pandas/pyarrow raise many kinds
        raise ConfigError(f"{path}: cannot read URL list ({str(err).splitlines()[0]})") from None
    for column in filter(None, (url_col, caption_col, split_col)):
        if column not in columns:
            raise ConfigError(f"{path}: no column {column!r}; columns: {', '.join(map(str, columns))}")
    return [str(c) for c in columns]


def fetch_policy(config: IngestConfig) -> FetchPolicy:
    return FetchPolicy(config.timeout, config.max_download_bytes, tuple(config.allow_schemes),
                       tuple(config.allow_networks))


@contextlib.contextmanager
def _bounded_img2dataset(config: IngestConfig):
    import importlib

    # `img2dataset.main` the attribute is a function; the module is only reachable by name
    i2d_main = importlib.import_module("img2dataset.main")
    from vitpipe.pipeline.bounded_downloader import BoundedDownloader

    original = i2d_main.Downloader
    i2d_main.Downloader = functools.partial(BoundedDownloader, policy=fetch_policy(config),
                                            max_pixels=config.max_pixels)
    previous_env = os.environ.get(OPENCV_PIXEL_BOUND)
    # OpenCV refuses to allocate beyond this in imdecode (read when cv2 is imported: img2dataset's
    # spawned workers inherit it); BoundedDownloader checks image headers as well
    os.environ[OPENCV_PIXEL_BOUND] = str(config.max_pixels)
    try:
        yield
    finally:
        i2d_main.Downloader = original
        if previous_env is None:
            os.environ.pop(OPENCV_PIXEL_BOUND, None)
        else:
            os.environ[OPENCV_PIXEL_BOUND] = previous_env


def img2dataset_kwargs(url_list: Path, output_folder: Path, config: IngestConfig,
                       extra_columns: list[str] | None = None) -> dict:
    """The img2dataset arguments for our settings (also used by the benchmark's direct call)."""
    encode_format = "jpg" if config.encode_format == "auto" else config.encode_format
    return dict(
        url_list=str(url_list),
        output_folder=str(output_folder),
        input_format=_input_format(url_list),
        output_format="webdataset",
        url_col=config.url_col,
        caption_col=config.caption_col,
        image_size=config.image_size or 256,
        resize_mode=config.resize_mode if config.image_size else "no",
        encode_format=encode_format,
        # img2dataset reads "quality" as the zlib level (0-9) for PNG; use PIL's default level
        encode_quality=6 if encode_format == "png" else config.encode_quality,
        processes_count=config.processes,
        thread_count=config.threads,
        number_sample_per_shard=config.shard_size,
        timeout=config.timeout,
        retries=config.retries,
        max_image_area=float(config.max_pixels),
        incremental_mode="incremental",
        compute_hash="sha256",
        disallowed_header_directives=[],
        enable_wandb=False,
        save_additional_columns=extra_columns or None,
        # on Spark, img2dataset finds vitpipe's session (vitpipe.pipeline.spark) and maps its shards there
        distributor="pyspark" if config.distributor == "pyspark" else "multiprocessing",
    )


def download(url_list: Path, work_dir: Path, config: IngestConfig) -> Path:
    """Run img2dataset (resumable) into ``work_dir/img2dataset`` and return that folder."""
    columns = check_url_list(url_list, config.url_col, config.caption_col, config.split_col)
    if ImageColor.getrgb(config.background)[:3] != (255, 255, 255):
        raise ConfigError(f"ingest.background={config.background}: URL lists are resized by img2dataset, which "
                          "composites transparency on white only; ingest a folder for another background")
    extra = [c for c in (config.label_col, config.split_col) if c and c in columns] or None
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
    from img2dataset import download as i2d_download

    output = work_dir / "img2dataset"
    output.mkdir(parents=True, exist_ok=True)
    with _bounded_img2dataset(config), _output_to(None if sys.stderr.isatty() else work_dir / "img2dataset.log"):
        i2d_download(**img2dataset_kwargs(url_list, output, config, extra))
    return output


@contextlib.contextmanager
def _output_to(log: Path | None):
    """Without a terminal, img2dataset's progress bars and prints (its worker processes' too: they
    inherit the file descriptors) go to ``log``, not into the user's pipe or scheduler log."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


REASON_PATTERNS = [
    ("blocked_address", "blocked_address"), ("truncated_body", "truncated_body"),
    ("connection_error", "connection_error"), ("http_4xx", "http_4xx"), ("http_5xx", "http_5xx"),
    ("bad_scheme", "bad_scheme"), ("bad_redirect", "bad_redirect"), ("redirection to url", "bad_redirect"),
    ("too_large", "too_large"), ("empty_file", "empty_file"), ("timed out", "timeout"),
    ("timeout", "timeout"), ("http error 4", "http_4xx"), ("http error 5", "http_5xx"),
    ("image area too large", "too_many_pixels"), ("exceeds limit", "too_many_pixels"),
    ("connection refused", "connection_error"), ("remote end closed", "connection_error"),
    ("connection reset", "connection_error"), ("name or service", "connection_error"),
    ("incompleteread", "truncated_body"), ("image decoding error", "not_an_image"),
    ("unknown url type", "bad_scheme"),
]


def classify(error_message: str | None) -> str:
    text = (error_message or "").lower()
    for pattern, reason in REASON_PATTERNS:
        if pattern in text:
            return reason
    return "other_error"


def iter_downloaded(output: Path, label_col: str | None = None, split_col: str | None = None) -> Iterator[Record]:
    """Every row img2dataset processed, as samples and classified failures, in shard and key order.
    An integer ``label_col`` of the URL list (kept by img2dataset) becomes the sample's label, a
    ``split_col`` its split."""
    for table_path in sorted(output.glob("*.parquet")):
        yield from shard_records(table_path, label_col, split_col)


SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A split is a folder under OUT: no path separators, no leading dot or underscore (OUT/_work)."""


def _cell_text(value: object) -> str:
    """A URL list cell as text: an empty cell (None, or NaN where pandas read the column) is ""."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def shard_records(table_path: Path, label_col: str | None = None, split_col: str | None = None) -> Iterator[Record]:
    """One img2dataset shard: its parquet rows (status, error) joined with its tar members."""
    rows = pq.read_table(table_path).to_pylist()
    tar_path = table_path.with_suffix(".tar")
    members: dict[str, dict[str, bytes]] = {}
    if tar_path.exists():
        with open(tar_path, "rb") as handle:
            for sample in iter_tar_samples(handle):
                members[sample.pop("__key__").rsplit("/", 1)[-1]] = sample
    for row in sorted(rows, key=lambda r: r["key"]):
        key, url = row["key"], row.get("url") or ""
        if row["status"] != "success":
            yield Failure(classify(row.get("error_message")), url, row.get("error_message") or "")
            continue
        files = members.get(key, {})
        ext = next((e for e in ("jpg", "png", "webp") if e in files), None)
        if ext is None:
            yield Failure("missing_in_shard", url, f"{tar_path.name}:{key}")
            continue
        label = row.get(label_col) if label_col else None
        split = _cell_text(row.get(split_col)) if split_col else ""
        if split and not SPLIT_NAME.fullmatch(split):
            yield Failure("bad_split", url, f"{split_col}={split[:80]!r}: a split is a folder name (letters, digits, _.-)")
            continue
        yield Sample(
            key=key, image=files[ext], ext=ext, content_hash=row.get("sha256") or "",
            label=int(label) if label is not None and str(label).lstrip("-").isdigit() else None,
            original_size=(row.get("original_width") or 0, row.get("original_height") or 0),
            text=row.get("caption"), meta={"source": url, "width": row.get("width"), "height": row.get("height")},
            split=split or None,
        )
