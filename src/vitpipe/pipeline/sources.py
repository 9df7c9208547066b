"""Sources: each yields records (a sample or a classified failure) in a deterministic order.

URL lists go through img2dataset (``vitpipe.pipeline.web``); this module holds the local sources
(image folders, Hugging Face datasets on disk, IDX files) and the parsing of a SOURCE argument.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vitpipe.config import ConfigError, IngestConfig
from vitpipe.pipeline.images import EXTENSIONS, ImageRejected, encode, open_bounded, resize_to_fit, to_rgb

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
URL_LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".jsonl")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Sample:
    key: str
    image: bytes
    ext: str
    content_hash: str
    """sha256 of the source bytes (or raw pixels) for exact-duplicate removal."""
    original_size: tuple[int, int]
    """(width, height) before any resize."""
    label: int | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    """Official split this sample belongs to (IDX train/test, a URL list's split_col); None = assign by val_fraction."""


@dataclass
class Failure:
    reason: str
    ref: str
    detail: str = ""


@dataclass
class Skipped:
    """A file that was never meant to be an image (a sound, an SVG, notes): counted under
    ``filtered[reason]``, not as a failure."""

    reason: str
    ref: str


Record = Sample | Failure | Skipped


@dataclass
class SourceSpec:
    kind: str
    """url_list | folder | hf | idx | fashion-mnist"""
    location: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, **self.extra}

    def fingerprint(self) -> dict[str, Any]:
        """What the source holds now: every file's path, size and mtime (the URL list's sha256), so
        a rerun notices edited captions, added images or a changed list."""
        if self.kind == "url_list":
            return {"files": 1, "sha256": hashlib.sha256(Path(self.location).read_bytes()).hexdigest()}
        if self.kind == "idx":
            paths = [Path(p) for p in (self.location, self.extra.get("labels")) if p]
        elif self.kind == "fashion-mnist":
            paths = sorted(Path(self.location).glob("*.gz"))
        elif self.kind == "hf":
            from vitpipe.pipeline.hf import hf_files

            paths = hf_files(self.location)
        else:  # folder
            paths = sorted(p for p in Path(self.location).rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for path in paths:
            stat = path.stat()
            name = path.relative_to(self.location) if self.kind in ("folder", "fashion-mnist") or (
                self.kind == "hf" and Path(self.location).is_dir()) else path
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {"files": len(paths), "sha256": digest.hexdigest()}


def parse_source(text: str) -> SourceSpec:
    """Turn the SOURCE argument into a spec, or raise ConfigError with one clear line."""
    if text == "fashion-mnist" or text.startswith("fashion-mnist:"):
        split = text.partition(":")[2] or "all"
        if split not in ("train", "test", "all"):
            raise ConfigError("fashion-mnist split must be train, test or omitted (both)")
        if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
            raise ConfigError(f"fashion-mnist not found in {FASHION_MNIST_DIR}; "
                              "install it with: apt-get install -y dataset-fashion-mnist")
        return SourceSpec("fashion-mnist", str(FASHION_MNIST_DIR), {"split": split})
    if text.startswith("hf:"):
        from vitpipe.pipeline.hf import hf_files

        if not hf_files(text[3:]):
            raise ConfigError(f"Hugging Face dataset not found: {text[3:]} (a folder, a parquet file or a glob)")
        return SourceSpec("hf", text[3:])
    if text.startswith("idx:"):
        images, _, labels = text[4:].partition(",")
        for item in filter(None, (images, labels)):
            if not Path(item).is_file():
                raise ConfigError(f"IDX file not found: {item}")
        return SourceSpec("idx", images, {"labels": labels or None})
    path = Path(text)
    if path.is_dir():
        return SourceSpec("folder", str(path))
    name = path.name.lower().removesuffix(".gz")
    if not any(name.endswith(s) for s in URL_LIST_SUFFIXES):
        if not path.exists():
            raise ConfigError(f"source not found: {text}")
        raise ConfigError(f"unknown source format: {text} (expected {', '.join(URL_LIST_SUFFIXES)} "
                          "optionally .gz, a folder, hf:PATH, idx:IMAGES[,LABELS] or fashion-mnist)")
    if not path.is_file():
        raise ConfigError(f"URL list not found: {text}")
    if path.stat().st_size == 0:
        raise ConfigError(f"URL list is empty: {text}")
    return SourceSpec("url_list", str(path))


def sanitize_key(text: str) -> str:
    """WebDataset splits keys at the first dot; keep keys to a safe alphabet."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def make_sample(data: bytes, key: str, config: IngestConfig, source_ext: str | None, *,
                label: int | None = None, text: str | None = None, meta: dict | None = None,
                content_hash: str | None = None) -> Sample:
    """Validate and (only when needed) re-encode one local image. Raises ImageRejected."""
    image = open_bounded(data, config.max_pixels)
    original_size = image.size
    target_ext = config.encode_format if config.encode_format != "auto" else "png"
    keep_bytes = (
        config.image_size == 0 and source_ext in EXTENSIONS and image.mode in ("RGB", "L")
        and "transparency" not in image.info and config.encode_format in ("auto", source_ext)
    )
    if keep_bytes:
        payload, ext = data, source_ext
    else:
        opaque = image.mode in ("RGB", "L") and "transparency" not in image.info
        converted = image if opaque else to_rgb(image, config.background)
        converted = resize_to_fit(converted, config.image_size, config.resize_mode, config.background)
        payload, ext = encode(converted, target_ext, config.encode_quality), target_ext
    return Sample(key=key, image=payload, ext=ext, original_size=original_size, label=label, text=text,
                  content_hash=content_hash or hashlib.sha256(data).hexdigest(), meta=meta or {})


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def folder_label_map(root: Path) -> dict[str, int]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {name: index for index, name in enumerate(classes)}


def caption_from_filename(path: Path) -> str:
    """``red_sports-car.01.png`` -> ``red sports car``: words of the file name, digits-only parts dropped."""
    words = re.split(r"[\s_\-.]+", path.stem)
    return " ".join(word for word in words if word and not word.isdigit())


def decode_caption(data: bytes) -> tuple[str, bool]:
    """Caption bytes as text, and whether they were not UTF-8 (then decoded with U+FFFD and counted
    in the manifest, never rewritten silently)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def iter_folder(root: Path, config: IngestConfig) -> Iterator[Record]:
    """Every image file below ``root`` is a row (a sample, or a failure if it does not decode); other
    files are counted as ``skipped_non_image``.

    Labels come from the first-level sub-folder (when there are sub-folders); a sidecar
    ``name.txt`` next to ``name.jpg`` becomes the caption, else (``filename_captions``) the file
    name itself.
    """
    labels = folder_label_map(root)
    seen_keys: set[str] = set()
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    image_stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    if config.shuffle:  # seeded: a rerun after a crash sees the same order and skips finished shards
        random.Random(config.seed).shuffle(files)
    for path in files:
        relative = path.relative_to(root)
        suffix = path.suffix.lower()
        if suffix == ".txt" and path.with_suffix("") in image_stems:
            continue  # a caption sidecar, read with its image: never a row of its own
        if suffix not in IMAGE_SUFFIXES:
            yield Skipped("skipped_non_image", str(relative))
            continue
        label = labels.get(relative.parts[0]) if len(relative.parts) > 1 else None
        key = sanitize_key(str(relative.with_suffix("")))
        while key in seen_keys:
            key += "_"
        seen_keys.add(key)
        caption_path = path.with_suffix(".txt")
        caption, repaired = decode_caption(caption_path.read_bytes()) if caption_path.exists() else (None, False)
        caption = caption.strip() if caption is not None else None
        if caption is None and config.filename_captions:
            caption = caption_from_filename(path)
        ext = {"jpeg": "jpg"}.get(suffix[1:], suffix[1:])
        try:
            yield make_sample(path.read_bytes(), key, config, ext, label=label, text=caption,
                              meta={"source": str(relative), **({"caption_utf8_repaired": True} if repaired else {})})
        except ImageRejected as err:
            yield Failure(err.reason, str(relative), str(err))


# ---------------------------------------------------------------------------------------------
# IDX (MNIST format)
# ---------------------------------------------------------------------------------------------


def _open_maybe_gz(path: str | Path):
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array; raises ConfigError on a bad header."""
    with _open_maybe_gz(path) as handle:
        header = handle.read(4)
        if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
            raise ConfigError(f"{path}: not an unsigned-byte IDX file")
        ndim = header[3]
        shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
        data = np.frombuffer(handle.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(shape))} values)")
    return data.reshape(shape)


def iter_idx(images_path: str, labels_path: str | None, config: IngestConfig, split: str | None,
             prefix: str) -> Iterator[Record]:
    images = read_idx(images_path)
    labels = read_idx(labels_path) if labels_path else None
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
    from PIL import Image

    order = np.random.default_rng(config.seed).permutation(len(images)) if config.shuffle else range(len(images))
    for index in map(int, order):
        pixels = images[index]
        image = Image.fromarray(pixels, "L")
        resized = resize_to_fit(image, config.image_size, config.resize_mode, config.background)
        ext = config.encode_format if config.encode_format != "auto" else "png"
        yield Sample(
            key=f"{prefix}{index:06d}", image=encode(resized, ext, config.encode_quality), ext=ext,
            content_hash=hashlib.sha256(pixels.tobytes()).hexdigest(), original_size=image.size,
            label=None if labels is None else int(labels[index]), split=split,
            meta={"source": f"{Path(images_path).name}[{index}]"},
        )


def iter_fashion_mnist(split: str, config: IngestConfig) -> Iterator[Record]:
    files = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    for name in (["train", "test"] if split == "all" else [split]):
        images, labels = files[name]
        yield from iter_idx(str(FASHION_MNIST_DIR / images), str(FASHION_MNIST_DIR / labels), config,
                            split=name, prefix=f"{name}_")


