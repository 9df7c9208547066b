"""Frozen features, extracted once and cached on disk.

The cache key covers the encoder weights (their sha256), the data (every shard's resolved path,
size, mtime and manifest sha256), the layer, the pooling and the input transform, so a stale cache
is never read. Every extraction counts samples expected, read and skipped by reason (ReadTally):
a warning line when any were lost, a DataError above ``max_skipped``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitpipe.config import ConfigError, PretrainConfig, to_dict
from vitpipe.pipeline.loader import DataError, LoaderSpec, ReadTally, counted, make_loader
from vitpipe.pipeline.shardset import ShardSet, resolve_shards
from vitpipe.pipeline.tario import sha256_file
from vitpipe.pipeline.transforms import TransformSpec
from vitpipe.ssl import registry
from vitpipe.ssl.rundir import read_run_info
from vitpipe.ssl.runs import build_run_objective, load_run_encoder, locate_run, run_dir_of

PIXELS = "pixels"


@dataclass
class FeatureSet:
    features: dict[str, np.ndarray]
    """Layer name ("last", "block3", or "pixels") -> [N, D] float32."""
    labels: np.ndarray | None
    """[N] int64, or None when the shards have no labels."""
    keys: list[str]
    tally: ReadTally = field(default_factory=lambda: ReadTally(None))
    """Samples expected, read and skipped while extracting."""


@dataclass(frozen=True)
class EncoderSource:
    """What produces features: a trained encoder, a random one of the same shape, or raw pixels."""

    kind: str
    """trained | random | pixels"""
    config: PretrainConfig
    """The run's resolved config (shape, image size, normalization)."""
    run: Path
    """Run directory or checkpoint directory."""
    weights: Path | None = None
    """File holding the trained encoder (identifies the cache)."""
    seed: int = 0

    @classmethod
    def resolve(cls, run: Path, kind: str = "trained", seed: int = 0) -> "EncoderSource":
        if kind not in ("trained", "random", "pixels"):
            raise ConfigError(f"unknown encoder source {kind!r}")
        if kind == "pixels":  # raw pixels need the run's input settings, not its weights
            config_file = run_dir_of(run) / "config.yaml"
            if not config_file.is_file():
                raise ConfigError(f"{run} is neither a run directory nor a checkpoint")
            return cls(kind, registry.run_config(config_file), Path(run), None, seed)
        config, weights = locate_run(run)  # the weights are read once, by build()
        return cls(kind, config, Path(run), weights if kind == "trained" else None, seed)

    @property
    def baseline_suffix(self) -> str:
        return {"trained": "", "random": ".random", "pixels": ".pixels"}[self.kind]

    def identity(self) -> str:
        if self.kind == "trained":
            return sha256_file(self.weights)
        if self.kind == "random":
            shape = {k: v for k, v in to_dict(self.config).items() if k not in ("data", "optim", "train")}
            return f"random-{self.seed}-{self.config.data.image_size}-{json.dumps(shape, sort_keys=True)}"
        return "pixels"

    def depth(self) -> int:
        """Blocks of the encoder, known without building it (recorded with the exported encoder)."""
        if self.kind == "pixels":
            return 1
        info = read_run_info(run_dir_of(self.run))
        return int(info.get("encoder_depth") or self.config.model.depth)

    def build(self) -> nn.Module | None:
        """The encoder (``Encoder`` protocol), built through the run's registry entry."""
        if self.kind == "pixels":
            return None
        if self.kind == "trained":
            return load_run_encoder(self.run)[0]
        return build_run_objective(self.run, self.config, seed=self.seed).encoder().eval()


def layer_names(layers: list[int] | None) -> list[str]:
    return ["last"] if not layers else [f"block{layer}" for layer in layers]


def cache_key(source: EncoderSource, shards: ShardSet, name: str, pool: str, image_size: int) -> str:
    """One cache file per layer, so probing blocks 3,7,11 together serves a later k-NN on block 7."""
    payload = json.dumps({"encoder": source.identity(), "shards": shards.identity(), "layer": name, "pool": pool, "image_size": image_size,
                          "mean": source.config.data.mean, "std": source.config.data.std}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _canonical(name: str, depth: int) -> str:
    """"last", "block-1" and "block11" of a 12-block encoder are the same features: one cache file."""
    if name == PIXELS:
        return name
    return f"block{depth - 1 if name == 'last' else int(name.removeprefix('block')) % depth}"


@torch.no_grad()
def extract(source: EncoderSource, shard_spec: str, *, layers: list[int] | None = None, pool: str | None = None,
            batch_size: int = 256, num_workers: int = 2, cache_dir: Path | None = None,
            need_labels: bool = True, device: str | None = None, max_skipped: float = 0.01) -> FeatureSet:
    """Features of every sample of ``shard_spec`` (each exactly once, in a fixed order).
    ``max_skipped``: the fraction of expected samples that may be unreadable before this fails."""
    config = source.config
    shards = resolve_shards(shard_spec)
    names = [PIXELS] if source.kind == "pixels" else layer_names(layers)
    depth = source.depth()
    if source.kind != "pixels" and any(not -depth <= layer < depth for layer in layers or []):
        raise ConfigError(f"--layers: the encoder has blocks 0..{depth - 1}; got {layers}")
    cache_paths: dict[str, Path] = {}
    if cache_dir is not None:
        cache_paths = {name: Path(cache_dir) / f"{cache_key(source, shards, _canonical(name, depth), pool or 'default', config.data.image_size)}.npz"
                       for name in names}
        if all(path.is_file() for path in cache_paths.values()):
            cached = _load_cache(cache_paths)
            if cached.tally.expected == shards.expected and len(cached.keys) == cached.tally.read:
                return check_tally(shard_spec, cached, max_skipped)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = source.build()
    pool = pool or getattr(getattr(encoder, "config", None), "pool", None)  # a ViT's configured pooling
    if encoder is not None:
        encoder.to(device)
        if pool == "map" and getattr(encoder, "attn_pool", None) is None:
            raise ConfigError("--pool map needs an encoder trained with model.pool=map")
    fields = ("image", "label", "key") if need_labels else ("image", "key")
    transform = TransformSpec.for_eval(config.data)
    spec = LoaderSpec(shards, batch_size, transform, train=False, fields=fields)
    _, loader = make_loader(spec, num_workers)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    labels, keys = [], []
    tally = ReadTally(shards.expected)
    for batch in counted(loader, tally):
        images = batch["image"].to(device)
        if encoder is None:
            chunks[PIXELS].append(images.flatten(1).cpu().numpy())
        elif not layers:
            chunks["last"].append(encoder.pool(encoder.forward_features(images), pool).cpu().numpy())
        else:
            for name, tokens in zip(names, encoder.intermediate_layers(images, layers)):
                # attention pooling was trained on the last block only; average the others
                chunks[name].append(encoder.pool(tokens, "gap" if pool == "map" else pool).cpu().numpy())
        if need_labels:
            labels.append(batch["label"].numpy())
        keys.extend(batch["key"])
    if not keys:
        if tally.lost:
            raise DataError(f"{shard_spec}: no sample could be read; {tally.summary()}")
        raise ConfigError(f"no samples in {shard_spec}")
    result = FeatureSet({name: np.concatenate(parts).astype(np.float32) for name, parts in chunks.items()},
                        np.concatenate(labels).astype(np.int64) if need_labels else None, keys, tally)
    for name, path in cache_paths.items():
        _save_cache(path, FeatureSet({name: result.features[name]}, result.labels, result.keys, tally))
    return check_tally(shard_spec, result, max_skipped)


def check_tally(shard_spec: str, features: FeatureSet, max_skipped: float) -> FeatureSet:
    """Warn on stderr when any sample was lost; fail above ``max_skipped`` of those expected."""
    tally = features.tally
    if tally.lost:
        base = tally.expected or (tally.read + tally.lost)
        if tally.lost > max_skipped * base:
            raise DataError(f"{shard_spec}: {tally.summary()}: {tally.lost / base:.1%} lost, more than the allowed "
                            f"{max_skipped:.1%} (--max-skipped)")
        print(f"warning: {shard_spec}: {tally.summary()}", file=sys.stderr)
    return features


def _save_cache(path: Path, features: FeatureSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {f"feat__{k}": v for k, v in features.features.items()}
    if features.labels is not None:
        arrays["labels"] = features.labels
    arrays["keys"] = np.array(features.keys)  # a unicode array; never an object array (no pickle)
    arrays["tally"] = np.array(json.dumps(features.tally.as_dict()))
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_cache(paths: dict[str, Path]) -> FeatureSet:
    """Layer name -> its cache file (one feature array each; "last" may be stored as "block11")."""
    features: dict[str, np.ndarray] = {}
    for name, path in paths.items():
        with np.load(path, allow_pickle=False) as data:
            (stored,) = [entry for entry in data.files if entry.startswith("feat__")]
            features[name] = data[stored]
            labels = data["labels"] if "labels" in data.files else None
            keys = data["keys"].tolist()
            tally = ReadTally.from_dict(json.loads(str(data["tally"]))) if "tally" in data.files else None
    if tally is None:  # written before samples were counted: cannot vouch for it
        return FeatureSet(features, labels, keys, ReadTally(-1))
    return FeatureSet(features, labels, keys, tally)
