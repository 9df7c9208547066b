"""What a shard set can serve, told before any work: how many samples carry an image, a caption,
a usable label. Reads tar headers only (plus the few bytes of each ``cls``), seeking past image
data, so a census of Fashion-MNIST's 60,000 training samples costs well under a second.

An evaluation that needs labels leaves unlabelled samples out and counts them (``unlabelled``); a
command whose data cannot serve it at all (no caption anywhere for CLIP, no label anywhere for a
probe) stops here with one line that says which field is missing in how many samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from vitpipe.config import ConfigError
from vitpipe.pipeline.images import EXTENSIONS
from vitpipe.pipeline.shardset import ShardSet, is_local, open_shard
from vitpipe.pipeline.tario import split_member_name

UNLABELLED = "unlabelled"
"""The skip reason of a sample a labelled eval leaves out: no ``cls``, or a negative one."""
FIELD_WORDS = {"text": "caption (txt)", "label": "label (cls)", "image": "image"}


def parse_label(raw: bytes) -> int | None:
    """A ``cls`` member's label; None for "no label" (negative, as Hugging Face writes -1).
    Raises ValueError for anything that is not an integer."""
    value = int(raw.strip() or b"x")
    return value if value >= 0 else None


@dataclass
class Census:
    samples: int = 0
    image: int = 0
    text: int = 0
    label: int = 0
    """Samples whose label is a non-negative integer."""
    unlabelled: int = 0
    """Samples without ``cls``, or with a negative one (Hugging Face's -1)."""
    bad_label: int = 0
    max_label: int = -1
    """The largest label seen (-1: none)."""

    def count(self, members: dict[str, bytes | None]) -> None:
        self.samples += 1
        self.image += any(ext in members for ext in EXTENSIONS)
        self.text += "txt" in members
        if "cls" not in members:
            self.unlabelled += 1
            return
        try:
            label = parse_label(members["cls"] or b"")
        except ValueError:
            self.bad_label += 1
            return
        self.label += label is not None
        self.unlabelled += label is None
        self.max_label = max(self.max_label, -1 if label is None else label)


def take_census(shards: ShardSet) -> Census | None:
    """The census of every local shard; None when a shard is remote (reading it would cost the
    whole download: such sets are checked as they are read)."""
    if not all(is_local(url) for url in shards.urls):
        return None
    census = Census()
    for url in shards.urls:
        try:
            with open_shard(url) as handle:
                _count_shard(handle, census)
        except (OSError, ValueError):  # a damaged shard is the reader's to count, not this check's
            continue
    return census


def _count_shard(handle, census: Census) -> None:
    for members in sample_members(handle, ("cls",)):
        census.count(members)


def sample_members(handle, read: tuple[str, ...]):
    """Each sample of an uncompressed tar as {ext: bytes for ``read`` exts, else (offset, size)},
    plus "__key__": its name, seeking past everything else."""
    key, members = None, {}
    while True:
        header = handle.read(512)
        if len(header) < 512 or header == b"\0" * 512:
            break
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        padded = size + (-size % 512)
        if kind in (b"x", b"g", b"L", b"K"):  # long names: this quick count reads the short ones
            handle.seek(padded, 1)
            continue
        sample, ext = split_member_name(name)
        if key is not None and sample != key:
            yield members
            members = {}
        key = sample
        members["__key__"] = sample
        if ext in read:
            members[ext] = handle.read(size)
            handle.seek(padded - size, 1)
        else:
            members[ext] = (handle.tell(), size)
            handle.seek(padded, 1)
    if key is not None:
        yield members


def sample_hashes(shards: ShardSet) -> set[str]:
    """What identifies each sample of local ``shards`` whatever file holds it: the sha256 of its
    source bytes that ingest writes into every sample's json, or (shards from elsewhere) the sha256
    of its image bytes. Remote shards are skipped."""
    hashes: set[str] = set()
    for url in shards.urls:
        if not is_local(url):
            continue
        try:
            with open_shard(url) as handle:
                for members in sample_members(handle, ("json",)):
                    digest = _sample_hash(handle, members)
                    if digest:
                        hashes.add(digest)
        except (OSError, ValueError):
            continue
    return hashes


def _sample_hash(handle, members: dict) -> str | None:
    try:
        digest = json.loads(members["json"]).get("sha256") if "json" in members else None
    except ValueError:
        digest = None
    if isinstance(digest, str) and digest:
        return digest
    image = next((members[ext] for ext in EXTENSIONS if ext in members), None)
    if image is None:
        return None
    offset, size = image
    here = handle.tell()
    handle.seek(offset)
    digest = hashlib.sha256(handle.read(size)).hexdigest()
    handle.seek(here)
    return digest


def require(shards: ShardSet, spec: str, fields: tuple[str, ...], what: str, every: bool = False) -> Census | None:
    """Stop with one line when ``shards`` cannot serve ``what``: no sample carries a needed field
    (or, ``every``, some sample lacks it: CLIP trains on pairs only)."""
    census = take_census(shards)
    if census is None or census.samples == 0:
        return census
    for name in fields:
        if name not in FIELD_WORDS or name == "image":
            continue
        have = census.label if name == "label" else census.text
        missing = census.samples - have
        if have == 0 or (every and missing):
            if name == "label" and census.bad_label:
                raise ConfigError(f"{spec}: {census.bad_label} of {census.samples} samples have a label (cls) that "
                                  "is not an integer; re-ingest with integer labels")
            raise ConfigError(f"{spec}: {missing} of {census.samples} samples have no {FIELD_WORDS[name]}; "
                              f"{what} needs {'every sample to have' if every else 'samples with'} one")
    return census


def require_needs(shards: ShardSet, spec: str, needs: tuple[str, ...], what: str) -> None:
    """``require`` for an objective's ``needs``: a caption on every sample (pairs), a label on some
    (unlabelled samples are left out)."""
    for name in needs:
        require(shards, spec, (name,), what, every=name == "text")
