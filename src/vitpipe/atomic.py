"""The one way vitpipe writes a file another process may read: readers see the old file or the
new one, never a part; two writers at once each write their own temp file (pid-named; the last
rename wins). The file gets the umask's ordinary mode."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def ordinary_mode(path: Path) -> None:
    """Give a file a library wrote the mode ``open()`` would have (0666 less the umask):
    safetensors' ``save_file`` makes its files 0600, unreadable to the rest of a team."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """A temporary path for a library that writes files itself (faiss, safetensors, numpy): on a
    clean exit it is fsynced and renamed to ``path``; on an error it is removed, ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        ordinary_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with writing(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
