"""Tar shards: atomic writing and safe reading (never extracted to disk, never unpickled)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

MTIME = 1_700_000_000  # fixed member mtime: identical samples give byte-identical shards


def write_tar_atomic(path: Path, samples: Iterable[dict[str, bytes]]) -> tuple[int, str]:
    """Write samples (``__key__`` + extension -> bytes) to ``path``; return (bytes, sha256)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext in sorted(k for k in sample if k != "__key__"):
                    data = sample[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), MTIME, 0o444
                    info.uname = info.gname = "vitpipe"
                    tar.addfile(info, io.BytesIO(data))
        handle.flush()
        os.fsync(handle.fileno())
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return size, digest


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def iter_tar_samples(fileobj) -> Iterator[dict[str, bytes]]:
    """Group consecutive tar members into samples, reading bytes into memory only."""
    current: dict[str, bytes] | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current
