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
    with open(tmp, "wb") as raw:
        handle = _HashingWriter(raw)
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext in sorted(k for k in sample if k != "__key__"):
                    data = sample[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), MTIME, 0o444
                    info.uname = info.gname = "vitpipe"
                    tar.addfile(info, io.BytesIO(data))
        raw.flush()
        os.fsync(raw.fileno())
    digest, size = handle.digest.hexdigest(), handle.size
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return size, digest


class _HashingWriter:
    """File wrapper that hashes what is written, so a shard is not read back to get its sha256."""

    def __init__(self, raw) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


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


class TarFormatError(ValueError):
    """A corrupt or truncated tar stream."""


def _read_exact(fileobj, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = fileobj.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records, position = {}, 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", errors="replace")
        position += length
    return records


def iter_tar_members(fileobj) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in a tar stream, in order.

    A small streaming reader instead of ``tarfile``: shards are read once per epoch by every
    worker and ``tarfile``'s Python-level header parsing was the ingest's largest cost. It
    checks header checksums, sizes and the end-of-archive blocks, so corrupt or truncated shards
    (cut within a member or between two) raise TarFormatError.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(fileobj, 512)
        if header == b"\0" * 512:
            return
        if not header:  # every tar writer ends with zero blocks: a file cut between two members has none
            raise TarFormatError("truncated: the file ends without tar's end-of-archive blocks")
        if len(header) < 512:
            raise TarFormatError("truncated header")
        if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarFormatError("header checksum mismatch")
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        data = _read_exact(fileobj, size)
        if len(data) < size:
            raise TarFormatError(f"truncated member ({len(data)} of {size} bytes)")
        padding = -size % 512
        if padding and len(_read_exact(fileobj, padding)) < padding:
            raise TarFormatError("truncated padding")
        kind = header[156:157]
        if kind == b"x":
            pax = _pax_records(data)
            continue
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", errors="replace")
            continue
        if kind in (b"g", b"K"):
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
            prefix = header[345:500].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and prefix:
                name = prefix.decode("utf-8", errors="replace") + "/" + name
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def iter_tar_samples(fileobj) -> Iterator[dict[str, bytes]]:
    """Group consecutive tar members into samples (``__key__`` + extension -> bytes), in memory."""
    current: dict[str, bytes] | None = None
    for name, data in iter_tar_members(fileobj):
        key, ext = split_member_name(name)
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield current
