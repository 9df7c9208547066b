"""Shard sets: where the shards of a spec are (local, http(s), fsspec), how many samples
sizes.json promises, and their identity for caches."""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
from PIL import Image

from vitpipe.config import ConfigError
from vitpipe.pipeline.images import EXTENSIONS, decode_rgb
from vitpipe.pipeline.manifest import label_map_of, shard_hashes
from vitpipe.pipeline.tario import iter_tar_samples


@dataclass
class ShardSet:
    urls: list[str]
    sizes: dict[str, int] = field(default_factory=dict)
    directory: Path | None = None
    """Local directory of the shards (for manifest lookup); None for remote or mixed sets."""

    @property
    def total(self) -> int | None:
        if not self.sizes:
            return None
        return sum(self.sizes.get(Path(u).name, 0) for u in self.urls)

    @property
    def expected(self) -> int | None:
        """Samples sizes.json promises for exactly these shards (None if it does not list them all)."""
        names = [Path(u).name for u in self.urls]
        return sum(self.sizes[n] for n in names) if self.sizes and all(n in self.sizes for n in names) else None

    def identity(self) -> list[dict[str, Any]]:
        """Each shard's full location and content (size, mtime, the manifest's sha256): changes
        when any shard does, and differs between two splits that use the same file names."""
        hashes = shard_hashes(self.directory) if self.directory else {}
        out = []
        for url in self.urls:
            if _is_remote(url) or _is_fsspec(url):
                out.append({"url": url, "samples": self.sizes.get(Path(url).name)})
                continue
            path = Path(url.removeprefix("file://")).resolve()
            stat = path.stat()
            out.append({"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "sha256": hashes.get(path.name)})
        return out


def _is_remote(url: str) -> bool:
    return bool(re.match(r"^https?://", url))


def resolve_shards(spec: str | Path, split: str | None = None) -> ShardSet:
    """A directory (shards in it, or in its ``train``/``split`` sub-folder), a brace pattern
    (``dir/{00000..00009}.tar``), one tar, or an http(s) URL pattern."""
    text = str(spec)
    if not text:
        raise ConfigError("no shards given (--data / data.shards)")
    if _is_remote(text):
        urls = list(braceexpand.braceexpand(text))
        sizes = _remote_sizes(urls)
        return ShardSet(urls, sizes)
    if _is_fsspec(text):
        return _resolve_fsspec(text, split)
    path = Path(text)
    if path.is_dir():
        if split:
            path = path / split
        elif not list(path.glob("*.tar")) and (path / "train").is_dir():
            path = path / "train"
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise ConfigError(f"no .tar shards in {path}")
    else:
        urls = list(braceexpand.braceexpand(text))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ConfigError(f"shard not found: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        path = Path(urls[0]).parent
    sizes_path = path / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    return ShardSet(urls, sizes, path)


def is_local(url: str) -> bool:
    """A shard on this machine's filesystem (a path or file://), cheap to seek through."""
    return not _is_remote(url) and not _is_fsspec(url)


def _is_fsspec(url: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", url)) and not _is_remote(url) and not url.startswith("file://")


def _resolve_fsspec(text: str, split: str | None) -> ShardSet:
    """Shards on any fsspec filesystem (s3://, gs://, hdfs://, ...): a folder or a brace pattern."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"cannot open {text}: {err}") from None
    protocol = text.split("://", 1)[0]
    if fs.isdir(path):
        folder = f"{path}/{split}" if split else path
        urls = [f"{protocol}://{p}" for p in sorted(fs.glob(f"{folder}/*.tar"))]
        sizes_path = f"{folder}/sizes.json"
    else:
        urls = list(braceexpand.braceexpand(text))
        sizes_path = f"{path.rsplit('/', 1)[0]}/sizes.json"
    if not urls:
        raise ConfigError(f"no .tar shards at {text}")
    sizes = json.loads(fs.cat(sizes_path)) if fs.exists(sizes_path) else {}
    return ShardSet(urls, sizes)


def _remote_sizes(urls: list[str]) -> dict[str, int]:
    base = urls[0].rsplit("/", 1)[0]
    try:
        with urllib.request.urlopen(f"{base}/sizes.json", timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return {}


def open_shard(url: str):
    if _is_remote(url):
        return urllib.request.urlopen(url, timeout=60)
    if _is_fsspec(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def images_by_key(shard_spec: str, keys: set[str]) -> dict[str, Image.Image]:
    """Decoded RGB images of the given sample keys (a scan over the shards; for small lookups)."""
    found = {}
    for url in resolve_shards(shard_spec).urls:
        with open_shard(url) as handle:
            for sample in iter_tar_samples(handle):
                ext = next((e for e in EXTENSIONS if e in sample), None)
                if sample["__key__"] in keys and ext is not None:
                    found[sample["__key__"]] = decode_rgb(sample[ext])
        if len(found) == len(keys):
            break
    return found


def has_labels(shard_url: str) -> bool:
    """Does the shard's first sample carry a ``cls`` label (shards are labelled throughout or not at all)?"""
    from vitpipe.pipeline.tario import iter_tar_samples

    with open_shard(shard_url) as handle:
        for sample in iter_tar_samples(handle):
            return "cls" in sample
    return False


def label_remap(train: str, test: str) -> list[int] | None:
    """The train label of each test label, by class name, when the two shard sets were ingested
    with different label maps (a test folder with a subset of the classes numbers them from 0):
    ``remap[test_label]``. None when both agree or either has no names. A test class the train
    set does not have is refused: nothing trained on ``train`` can name it."""
    train_map, test_map = (label_map_of(resolve_shards(spec).directory) for spec in (train, test))
    if not train_map or not test_map or all(train_map.get(name) == label for name, label in test_map.items()):
        return None
    unknown = sorted(set(test_map) - set(train_map))
    if unknown:
        raise ConfigError(f"{test} has classes {train} has not ({', '.join(unknown[:5])}"
                          f"{', ...' if len(unknown) > 5 else ''}); an eval trained on {train} cannot name them")
    remap = [-1] * (max(test_map.values()) + 1)
    for name, label in test_map.items():
        remap[label] = train_map[name]
    return remap
