"""`vitpipe shards verify`: every byte and every image of a shard set checked against its manifest."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from vitpipe.pipeline.images import EXTENSIONS, ImageRejected, decode_rgb
from vitpipe.pipeline.manifest import read_manifest
from vitpipe.pipeline.tario import TarFormatError, iter_tar_samples, sha256_file


@dataclass
class ShardReport:
    path: str
    samples: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not any(s.problems for s in self.shards)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def verify_shard(path: Path, expected_sha256: str | None, expected_samples: int | None) -> ShardReport:
    report = ShardReport(str(path))
    if not path.is_file():
        report.problems.append("missing")
        return report
    if expected_sha256 and sha256_file(path) != expected_sha256:
        report.problems.append("sha256 differs from the manifest")
    try:
        with open(path, "rb") as handle:
            for sample in iter_tar_samples(handle):
                report.samples += 1
                ext = next((e for e in EXTENSIONS if e in sample), None)
                if ext is None:
                    report.problems.append(f"{sample['__key__']}: no image member")
                    continue
                try:
                    decode_rgb(sample[ext])
                except ImageRejected as err:
                    report.problems.append(f"{sample['__key__']}: {err}")
                if "cls" in sample and not sample["cls"].strip().lstrip(b"-").isdigit():
                    report.problems.append(f"{sample['__key__']}: cls is not an integer")
    except (TarFormatError, tarfile.TarError, OSError, EOFError) as err:
        report.problems.append(f"corrupt or truncated tar after {report.samples} samples: {err}")
    if expected_samples is not None and report.samples != expected_samples:
        report.problems.append(f"{report.samples} samples, sizes.json says {expected_samples}")
    return report


def verify(directory: Path) -> VerifyReport:
    directory = Path(directory)
    result = VerifyReport()
    manifest = read_manifest(directory)
    for split in manifest["splits"].values():
        shard_dir = directory / split["dir"]
        sizes_path = shard_dir / "sizes.json"
        sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
        if not sizes:
            result.problems.append(f"{sizes_path}: missing or empty")
        for entry in split["shards"]:
            if sizes and sizes.get(entry["file"]) != entry["samples"]:
                result.problems.append(f"{entry['file']}: sizes.json and manifest disagree on the count")
            result.shards.append(verify_shard(shard_dir / entry["file"], entry["sha256"], entry["samples"]))
        listed = {e["file"] for e in split["shards"]}
        for extra in sorted(p.name for p in shard_dir.glob("*.tar")):
            if extra not in listed:
                result.problems.append(f"{shard_dir / extra}: not in the manifest")
    if sum(s.samples for s in result.shards) != manifest["written"] and not result.problems:
        result.problems.append(f"{result.samples} samples read, manifest says {manifest['written']}")
    return result
