"""manifest.json and sizes.json: what a shard set holds, where it came from, how to check it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from vitpipe import __version__
from vitpipe.atomic import write_bytes_atomic, write_json_atomic  # noqa: F401 (importable from here)
from vitpipe.config import ConfigError


def build_manifest(*, source, settings, settings_full, rows, written, failures, filtered, duplicates,
                   splits, failure_examples, label_map, seconds) -> dict[str, Any]:
    return {
        "vitpipe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "settings": settings,
        "settings_full": settings_full,
        "rows": rows,
        "written": written,
        "failed": sum(failures.values()),
        "failures": dict(sorted(failures.items())),
        "filtered": dict(sorted(filtered.items())),
        "duplicates": duplicates,
        "splits": splits,
        "label_map": label_map,
        "failure_examples": failure_examples,
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 1) if seconds > 0 else None,
    }


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no manifest.json in {directory} (not written by vitpipe ingest?)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def find_manifest(shard_dir: Path) -> Path | None:
    """The manifest of a shard directory: in it, or one level up for split sub-directories."""
    for candidate in (shard_dir / "manifest.json", shard_dir.parent / "manifest.json"):
        if candidate.is_file():
            return candidate
    return None


def label_map_of(shard_dir: Path | None) -> dict[str, int] | None:
    """Class name -> label of the shards in ``shard_dir``, from their manifest (None: none recorded)."""
    path = find_manifest(Path(shard_dir)) if shard_dir else None
    return json.loads(path.read_text()).get("label_map") if path else None


def manifest_hash(shard_dir: Path) -> str | None:
    """sha256 of the manifest file: the identity of the data a run trained on."""
    path = find_manifest(Path(shard_dir))
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else None


def shard_hashes(shard_dir: Path) -> dict[str, str]:
    """File name -> sha256 of the shards of ``shard_dir`` as its manifest recorded them (the split
    of that directory only: two splits have the same file names)."""
    shard_dir = Path(shard_dir)
    path = find_manifest(shard_dir)
    if path is None:
        return {}
    try:
        splits = json.loads(path.read_text()).get("splits", {})
    except (OSError, json.JSONDecodeError):
        return {}
    wanted = "." if path.parent == shard_dir else shard_dir.name
    for name, split in splits.items():
        if split.get("dir", name) == wanted:
            return {entry["file"]: entry["sha256"] for entry in split.get("shards", []) if "sha256" in entry}
    return {}
