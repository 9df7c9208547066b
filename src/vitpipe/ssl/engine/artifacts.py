"""Artefacts an objective fits from the data before training (a tokenizer, a colour palette).

They live in ``RUN/artifacts/`` (written to a temp dir, fsynced, renamed), their sha256 in
``RUN/run.json`` under ``artifacts``; every later command (resume, eval, export, report) loads
and verifies them instead of fitting again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from vitpipe.runlayout import RunLayout
from vitpipe.ssl.engine.checkpoints import CheckpointError



def save(run_dir: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Write ``files`` atomically as RUN/artifacts/; return their sha256 by name."""
    final = RunLayout(run_dir).artifacts
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"artefact name {name!r} must be a plain file name")
        with open(tmp / name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def recorded(run_dir: Path) -> dict[str, str] | None:
    """The checksums run.json holds, or None when the run has no artefacts recorded."""
    path = RunLayout(run_dir).info
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("artifacts")


def load(run_dir: Path) -> dict[str, bytes]:
    """The run's artefacts, each checked against run.json; {} for an objective without any."""
    expected = recorded(run_dir)
    if not expected:
        return {}
    directory = RunLayout(run_dir).artifacts
    files = {}
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"artefact {path} is missing; it was fitted before training and cannot be "
                                  "refitted without changing the run")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"artefact {path} does not match the sha256 in run.json (damaged)")
        files[name] = data
    return files


def read_samples(data, fields: tuple[str, ...], limit: int):
    """Decoded batches of the training shards (``data``: the run's DataConfig), each sample once,
    no augmentation, until ``limit`` samples: what a fitter reads."""
    from vitpipe.pipeline.loader import ReadTally, counted, eval_loader
    from vitpipe.pipeline.shardset import resolve_shards

    seen = 0
    for batch in counted(eval_loader(resolve_shards(data.shards), data, fields, data.num_workers), ReadTally(None),
                         fields[0]):
        yield batch
        seen += len(batch[fields[0]])
        if seen >= limit:
            return
