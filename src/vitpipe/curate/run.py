"""`vitpipe curate SHARDS --out DIR`: read the samples once to hash them, run the recipe's steps,
then copy the kept samples byte for byte into new shards.

    DIR/00000.tar ...       kept samples, members unchanged, in input order
    DIR/sizes.json          samples per shard
    DIR/manifest.json       parent (sha256 of the input's manifest), the recipe, rows, kept,
                            removed by reason; rows == kept + sum(removed) always
    DIR/curation.jsonl      one line per removed key: reason, score, the key it duplicates
    DIR/curation/index.html counts per reason; removed images beside the ones they repeat

The output is built beside DIR (.tmp-curate-DIR-PID) and renamed into place, so an interrupted curate leaves
no half-made DIR; the input shards are only ever read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator


from vitpipe import __version__
from vitpipe.config import ConfigError
from vitpipe.curate.embedded import (
    clip_scores, embeddings, encoder_source, run_balance, run_clip_score, run_embedding_decontaminate, run_semantic_dedup,
)
from vitpipe.curate.page import examples_wanted, keys_wanted, thumbnail, write_page
from vitpipe.curate.recipe import Recipe
from vitpipe.curate.steps import Item, Removal, run_decontaminate, run_filter, run_near_dup
from vitpipe.downstream.featurestore import Processes
from vitpipe.pipeline.fingerprints import Fingerprints, keep, of_crops, of_image, of_shards, sample_image, stored_prints, write_sidecar
from vitpipe.pipeline.manifest import find_manifest, manifest_hash, shard_hashes, write_json_atomic
from vitpipe.pipeline.shardset import ShardSet, open_shard, resolve_shards
from vitpipe.pipeline.tario import iter_tar_samples, write_tar_atomic
from vitpipe.ssl import registry

SHARD_SIZE = 1000


def curate(spec: str, out: Path, recipe: Recipe, overwrite: bool = False) -> dict[str, Any] | None:
    """Curate the shards ``spec`` names into ``out``; returns the output manifest (None on a
    torchrun process other than the first, once its share of the embeddings is extracted)."""
    start = time.monotonic()
    shards = resolve_shards(spec)
    out = Path(out).resolve()
    inputs = {Path(url).resolve().parent for url in shards.urls if "://" not in url}
    if out in inputs or any(out == p or out in p.parents for p in inputs):
        raise ConfigError(f"--out {out} holds the input shards; curate writes a new shard set elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()):
        _check_replaceable(out, overwrite)
    sources = {path: encoder_source(path, name) for name, path in _encoders(recipe)}  # bad runs fail first
    for name, step in recipe.steps:
        if name == "clip_score" and registry.get(sources[step.model].config.objective).towers != ("image", "text"):
            raise ConfigError(f"clip_score.model: {step.model} is a {sources[step.model].config.objective} run; "
                              "it needs an image-text objective (clip)")
    against = {(test, step.flips) for name, step in recipe.steps if name == "decontaminate" for test in step.against}
    evaluation = {key: _evaluation_hashes(*key) for key in sorted(against)}  # bad paths fail before any work
    cache, processes = out.parent / f".curate-fingerprints-{out.name}", Processes.from_env()
    if processes.world > 1:
        _hash_share(shards, cache, processes)
    looked = _embed(recipe, spec, sources)  # under torchrun every process extracts its share
    if looked is None or not processes.first:
        return None  # its share of the hashes and embeddings is written
    items = list(_items(shards, cache))
    removed: dict[int, Removal] = {}
    for name, step in recipe.steps:
        remaining = [item for item in items if item.position not in removed]
        removed.update(_run_step(name, step, remaining, evaluation, looked))
    tmp = _fresh_tmp(out)
    shown = examples_wanted(items, removed)
    thumbs = _evaluation_thumbs(shown)
    written = _write_kept(shards.urls, items, removed, tmp, keys_wanted(shown), thumbs)
    _write_log(tmp / "curation.jsonl", items, removed)
    manifest = _manifest(spec, recipe, items, removed, written, shards, time.monotonic() - start)
    write_json_atomic(tmp / "manifest.json", manifest)
    write_page(tmp, manifest, shown, thumbs)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    shutil.rmtree(cache, ignore_errors=True)  # the output keeps its own fingerprints
    return manifest


OUTPUT_NAME = re.compile(r"\d+\.tar|\d+\.fp\.npz|\d+_stats\.json|sizes\.json|manifest\.json|curation\.jsonl|curation")
"""Every name a curate writes in its --out (the shards, their fingerprints, the log and the page)."""


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """A non-empty --out is replaced only with ``overwrite`` and only when it is an earlier curate
    and nothing else: ``--out ~ --overwrite`` must not delete a home folder."""
    try:
        kind = json.loads((out / "manifest.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "curate":
        raise ConfigError(f"{out} holds files vitpipe curate did not write; choose another --out "
                          "(--overwrite only replaces an earlier curate)")
    if not overwrite:
        raise ConfigError(f"{out} holds an earlier curate; pass --overwrite to replace it")
    foreign = sorted(path.name for path in out.iterdir() if not OUTPUT_NAME.fullmatch(path.name))
    if foreign:
        raise ConfigError(f"{out} holds an earlier curate and files it did not write ({', '.join(foreign[:5])}); "
                          "move them or choose another --out")


def _encoders(recipe: Recipe) -> list[tuple[str, str]]:
    """(step name, run) of every step that looks through an encoder, each run once."""
    seen: dict[str, str] = {}
    for name, step in recipe.steps:
        path = step.model if name == "clip_score" else getattr(step, "encoder", "")
        if path:
            seen.setdefault(path, name)
    return [(name, path) for path, name in seen.items()]


def _embed(recipe: Recipe, spec: str, sources: dict[str, Any]) -> dict | None:
    """run -> key -> embedding (clip_score: score) of the input, and (run, evaluation set) -> key ->
    embedding for decontaminate's encoder; None on a torchrun process other than the first."""
    looked: dict = {}
    for name, path in _encoders(recipe):
        looked[path] = clip_scores(sources[path], spec) if name == "clip_score" else embeddings(sources[path], spec)
        if looked[path] is None:
            return None  # not the first process: its share of the embeddings is in the store
    for name, step in recipe.steps:
        for test in step.against if name == "decontaminate" and step.encoder else ():
            looked[step.encoder, test] = embeddings(sources[step.encoder], test)
    return looked


def _run_step(name: str, step: Any, items: list[Item], evaluation: dict, looked: dict) -> dict[int, Removal]:
    if name == "filter":
        return run_filter(items, step)
    if name == "near_dup":
        return run_near_dup(items, step)
    if name == "decontaminate":
        found = run_decontaminate(items, step, {test: evaluation[test, step.flips] for test in step.against})
        if step.encoder:  # what the hashes missed, by embedding
            rest = [item for item in items if item.position not in found]
            found.update(run_embedding_decontaminate(rest, step, looked[step.encoder],
                                                     {test: looked[step.encoder, test] for test in step.against}))
        return found
    if name == "semantic_dedup":
        return run_semantic_dedup(items, step, looked[step.encoder])
    if name == "balance":
        return run_balance(items, step, looked[step.encoder])
    return run_clip_score(items, step, looked[step.model])


def _fresh_tmp(out: Path) -> Path:
    """This process's build directory beside ``out``; those of killed curates are removed (a
    live one's, another curate at work, is left alone)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".tmp-curate-{out.name}-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".tmp-curate-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _samples(urls: list[str]) -> Iterator[dict[str, bytes]]:
    for url in urls:
        with open_shard(url) as handle:
            yield from iter_tar_samples(handle)


def _items(shards: ShardSet, cache: Path) -> Iterator[Item]:
    """Pass 1: each sample's key, size, caption length and fingerprints: read from the shard's
    sidecar (or ``cache``, where an earlier or parallel hashing kept them) without decoding an
    image, else hashed here and kept in ``cache`` (a rerun after a kill hashes nothing twice)."""
    recorded = shard_hashes(shards.directory) if shards.directory else {}
    position = 0
    for url in shards.urls:
        known = stored_prints(url, recorded.get(Path(url).name), cache)
        items = []
        with open_shard(url) as handle:
            for index, sample in enumerate(iter_tar_samples(handle)):
                items.append(_item(position + index, sample, known, index))
        if known is None:
            keep(url, Fingerprints.of([i.key for i in items], [(i.hashes, i.thumb) if i.hashes is not None else None
                                                               for i in items]), cache)
        position += len(items)
        yield from items


def _hash_share(shards: ShardSet, cache: Path, processes: Processes) -> None:
    """Under torchrun: this process hashes its share of the shards that have no fingerprints into
    ``cache``; past the barrier the first process reads them all from there."""
    share = [url for index, url in enumerate(shards.urls) if index % processes.world == processes.rank]
    of_shards(dataclasses.replace(shards, urls=share), cache)
    processes.barrier()


def _item(position: int, sample: dict[str, bytes], stored: Fingerprints | None, index: int) -> Item:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    words = len(sample["txt"].decode("utf-8", errors="replace").split()) if "txt" in sample else 0
    width, height = meta.get("original_width"), meta.get("original_height")
    known = stored is not None and index < len(stored) and stored.keys[index] == sample["__key__"]
    image = None if known and width and height else sample_image(sample)  # decoded only when something is unknown
    if known:
        prints = (stored.hashes[index], stored.thumbs[index]) if stored.valid[index] else (None, None)
    else:
        prints = of_image(image) if image is not None else (None, None)
    if not (width and height):
        width, height = image.size if image is not None else (0, 0)
    return Item(position, sample["__key__"], int(width), int(height), words, *prints)


def _evaluation_hashes(spec: str, flips: bool) -> tuple[list[str], Fingerprints]:
    """Keys of an evaluation set's decodable images and the fingerprints of their 16 crops each
    (32 with flips), image after image."""
    keys, crops = [], []
    for sample in _samples(resolve_shards(spec).urls):
        image = sample_image(sample)
        if image is None:
            continue
        keys.append(sample["__key__"])
        crops.extend(of_crops(image, flips))
    return keys, Fingerprints.of([f"{key}#{i}" for key in keys for i in range(len(crops) // max(len(keys), 1))], crops)


def _evaluation_thumbs(shown: dict) -> dict[str, str]:
    """"SET/KEY" -> thumbnail of each evaluation image the page shows beside its copy."""
    wanted: dict[str, set[str]] = {}
    for pairs in shown.values():
        for _, removal in pairs:
            if "against" in removal.extra:
                wanted.setdefault(removal.extra["against"], set()).add(removal.duplicate_of)
    thumbs = {}
    for name, keys in wanted.items():
        for sample in _samples(resolve_shards(name).urls):
            if sample["__key__"] in keys:
                thumbs[f"{name}/{sample['__key__']}"] = thumbnail(sample)
    return thumbs


def _write_kept(urls: list[str], items: list[Item], removed: dict[int, Removal], directory: Path,
                wanted: set[str], thumbs: dict[str, str]) -> list[dict[str, Any]]:
    """Pass 2: the kept samples, byte for byte, SHARD_SIZE to a shard, each with its fingerprints;
    on the way, the thumbnails of the ``wanted`` keys (the page's) into ``thumbs``."""
    entries, batch, prints = [], [], []

    def flush() -> None:
        name = f"{len(entries):05d}.tar"
        size, digest = write_tar_atomic(directory / name, batch)
        write_sidecar(directory / name, Fingerprints.of([s["__key__"] for s in batch], prints), size, digest)
        entries.append({"file": name, "samples": len(batch), "bytes": size, "sha256": digest})
        batch.clear()
        prints.clear()

    for position, sample in enumerate(_samples(urls)):
        if sample["__key__"] in wanted:
            thumbs[sample["__key__"]] = thumbnail(sample)
        if position not in removed:
            item = items[position]
            batch.append(sample)
            prints.append((item.hashes, item.thumb) if item.hashes is not None else None)
            if len(batch) == SHARD_SIZE:
                flush()
    if batch:
        flush()
    write_json_atomic(directory / "sizes.json", {entry["file"]: entry["samples"] for entry in entries})
    return entries


def _write_log(path: Path, items: list[Item], removed: dict[int, Removal]) -> None:
    with open(path, "w") as handle:
        for item in items:
            if item.position in removed:
                r = removed[item.position]
                handle.write(json.dumps({"key": item.key, "reason": r.reason, "score": r.score,
                                         "duplicate_of": r.duplicate_of, **r.extra}) + "\n")


def _manifest(spec: str, recipe: Recipe, items: list[Item], removed: dict[int, Removal],
              written: list[dict[str, Any]], shards, seconds: float) -> dict[str, Any]:
    parent_path = find_manifest(shards.directory) if shards.directory else None
    parent = json.loads(parent_path.read_text()) if parent_path else {}
    reasons = Counter(r.reason for r in removed.values())
    against = Counter(r.extra["against"] for r in removed.values() if "against" in r.extra)
    kept = sum(entry["samples"] for entry in written)
    assert len(items) == kept + sum(reasons.values())  # every row is kept or removed for one reason
    return {
        "vitpipe_version": __version__, "kind": "curate",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"kind": "shards", "location": spec}, "parent": manifest_hash(shards.directory) if shards.directory else None,
        "settings": {"steps": recipe.settings()}, "rows": len(items), "written": kept,
        "removed": dict(sorted(reasons.items())), "contaminated_by_set": dict(sorted(against.items())),
        "undecodable": sum(item.hashes is None for item in items),
        "splits": {"curated": {"dir": ".", "written": kept, "shards": written}},
        "label_map": parent.get("label_map"), "seconds": round(seconds, 3),
    }


def read_log(path: Path) -> list[dict[str, Any]]:
    """curation.jsonl as records (tests and the page read it)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
