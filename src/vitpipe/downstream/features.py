"""Frozen features, extracted once and cached on disk.

The cache key covers the encoder weights (their sha256), the data (every shard's resolved path,
size, mtime and manifest sha256), the layer, the pooling and the input transform, so a stale cache
is never read. Every extraction counts samples expected, read and skipped by reason (ReadTally):
a warning line when any were lost, a DataError above ``max_skipped``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError, PretrainConfig, to_dict
from vitpipe.downstream import featurestore
from vitpipe.downstream.featurestore import Processes
from vitpipe.pipeline.census import UNLABELLED, require
from vitpipe.pipeline.loader import DataError, ReadTally, counted, eval_loader
from vitpipe.pipeline.shardset import ShardSet, resolve_shards
from vitpipe.pipeline.tario import sha256_file
from vitpipe.ssl import registry
from vitpipe.ssl.engine.rundir import read_run_info
from vitpipe.ssl.runs import build_run_objective, checkpoint_step, load_run_encoder, locate_run

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
    """File holding the trained encoder (identifies the cache); a checkpoint's is pinned against
    its run's pruning for as long as this process lives."""
    seed: int = 0
    step: int | None = None
    """The training step of a checkpoint's weights (None: the run's exported final encoder)."""
    precision: str = "fp32"
    """fp32 | bf16 | auto: the autocast of the encoder's forward passes (features are stored as
    fp32); auto is decided by ``resolved()`` when the work starts, after the cheap refusals."""

    @classmethod
    def resolve(cls, run: Path, kind: str = "trained", seed: int = 0) -> "EncoderSource":
        if kind not in ("trained", "random", "pixels"):
            raise ConfigError(f"unknown encoder source {kind!r}")
        if kind == "pixels":  # raw pixels need the run's input settings, not its weights
            config_file = RunLayout.of(run).config
            if not config_file.is_file():
                raise ConfigError(f"{run} is neither a run directory nor a checkpoint")
            return cls(kind, registry.run_config(config_file), Path(run), None, seed)
        config, weights = locate_run(run)  # the weights are read once, by build()
        step = checkpoint_step(weights) if kind == "trained" else None
        if step is not None:  # no final encoder: a run still training (or stopped) is scored as it stands
            print(f"note: {run}: scoring the checkpoint of step {step} of {config.train.max_steps}", file=sys.stderr)
        return cls(kind, config, Path(run), weights if kind == "trained" else None, seed, step)

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
        info = read_run_info(RunLayout.of(self.run).root)
        return int(info.get("encoder_depth") or self.config.model.depth)

    def build(self) -> nn.Module | None:
        """The encoder (``Encoder`` protocol), built through the run's registry entry."""
        if self.kind == "pixels":
            return None
        if self.kind == "trained":  # exactly the weights identified (a run in training has newer ones)
            return load_run_encoder(self.weights.parent if self.step is not None else self.run)[0]
        return build_run_objective(self.run, self.config, seed=self.seed).encoder().eval()

    def with_precision(self, requested: str) -> "EncoderSource":
        """This source at ``requested`` (auto | fp32 | bf16); raw pixels are fp32 whatever is asked."""
        if requested not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16; got {requested!r}")
        from vitpipe.ssl.engine.precision import emulated_bf16, warn_emulated_bf16

        if self.kind != "pixels" and emulated_bf16(requested):
            warn_emulated_bf16("--precision")
        return dataclasses.replace(self, precision="fp32" if self.kind == "pixels" else requested)

    def resolved(self) -> "EncoderSource":
        """This source with auto decided (ssl/engine/precision.py's for_eval: measured once per encoder and
        CPU, kept in RUN/eval/cache/precision.json)."""
        if self.precision != "auto":
            return self
        from vitpipe.ssl.engine.precision import for_eval

        memo = RunLayout.of(self.run).cache / "precision.json"
        return dataclasses.replace(self, precision=for_eval("auto", self.build, self.config.data, memo, self.identity()))

    def autocast(self, device: str):
        """bf16 autocast for a resolved bf16 source, nothing otherwise."""
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


@dataclasses.dataclass(frozen=True)
class LayerKey:
    """What features a per-layer result names, as its string in results and caches: the output
    ("last"), raw pixels ("pixels"), one block ("block3") or several side by side
    ("block0+block1", --concat). The one place these names are made and read."""

    blocks: tuple[int, ...] = ()
    """Block indices; empty = the output (or pixels)."""
    pixels: bool = False

    @classmethod
    def parse(cls, name: str) -> LayerKey:
        if name in ("last", PIXELS):
            return cls(pixels=name == PIXELS)
        parts = name.split("+")
        if not all(part.startswith("block") and part[5:].lstrip("-").isdigit() for part in parts):
            raise ValueError(f"not a layer name: {name!r}")
        return cls(tuple(int(part[5:]) for part in parts))

    def __str__(self) -> str:
        return PIXELS if self.pixels else "+".join(f"block{b}" for b in self.blocks) or "last"

    @property
    def block(self) -> int | None:
        """The block of a single-block key, else None."""
        return self.blocks[0] if len(self.blocks) == 1 else None

    @property
    def joined(self) -> bool:
        return len(self.blocks) > 1

    def label(self) -> str:
        """For people: "block0+...+block11" reads "blocks 0-11 concatenated"."""
        if not self.joined:
            return str(self)
        blocks = list(self.blocks)
        if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            return f"blocks {blocks[0]}-{blocks[-1]} concatenated"
        return f"blocks {', '.join(map(str, blocks))} concatenated"


def layer_names(layers: list[int] | None) -> list[str]:
    return ["last"] if not layers else [str(LayerKey((layer,))) for layer in layers]


def layer_label(name: str) -> str:
    """A probe candidate for people (``LayerKey.label``)."""
    return LayerKey.parse(name).label()


def single_blocks(per_layer: dict[str, Any]) -> dict[int, Any]:
    """Per-layer entries of single blocks by index ("block3" -> 3), in block order; the output
    ("last"), pixels and concatenations ("block0+block1") left out."""
    keys = {name: LayerKey.parse(name) for name in per_layer}
    return dict(sorted((key.block, per_layer[name]) for name, key in keys.items() if key.block is not None))


def cache_key(source: EncoderSource, shards: ShardSet, name: str, pool: str, image_size: int) -> str:
    """One cache file per layer, so probing blocks 3,7,11 together serves a later k-NN on block 7."""
    payload = json.dumps({"encoder": source.identity(), "shards": shards.identity(), "layer": name, "pool": pool, "image_size": image_size,
                          "mean": source.config.data.mean, "std": source.config.data.std,
                          **({"precision": source.precision} if source.precision != "fp32" else {})}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _canonical(name: str, depth: int) -> str:
    """"last", "block-1" and "block11" of a 12-block encoder are the same features: one cache file."""
    key = LayerKey.parse(name)
    if key.pixels:
        return name
    return str(LayerKey((depth - 1 if key.block is None else key.block % depth,)))


@torch.no_grad()
def extract(source: EncoderSource, shard_spec: str, *, layers: list[int] | None = None, pool: str | None = None,
            batch_size: int = 256, num_workers: int = 2, cache_dir: Path | None = None,
            need_labels: bool = True, device: str | None = None, max_skipped: float = 0.01,
            processes: Processes = Processes()) -> FeatureSet | None:
    """Features of every sample of ``shard_spec`` (each exactly once, rows in key order).
    ``max_skipped``: the fraction of expected samples that may be unreadable before this fails.
    With several ``processes`` (torchrun), each reads its share of the shards; the first returns
    the merged features, the others None."""
    config = source.config
    shards = resolve_shards(shard_spec)
    if need_labels:
        require(shards, shard_spec, ("label",), "a labelled evaluation")
    names = [PIXELS] if source.kind == "pixels" else layer_names(layers)
    depth = source.depth()
    if source.kind != "pixels" and any(not -depth <= layer < depth for layer in layers or []):
        raise ConfigError(f"block(s) {layers} out of range: the encoder has blocks 0..{depth - 1} "
                          f"(-{depth}..-1 count from the last)")  # --layer of knn, --layers of the probe
    source = source.resolved()  # past the refusals: the work starts here
    if cache_dir is None:
        if processes.world > 1:
            raise ConfigError("extraction on several processes needs a cache directory to meet in")
        with tempfile.TemporaryDirectory(prefix="vitpipe-features-") as scratch:
            found = extract(source, shard_spec, layers=layers, pool=pool, batch_size=batch_size,
                            num_workers=num_workers, cache_dir=Path(scratch), need_labels=need_labels,
                            device=device, max_skipped=max_skipped)
            return FeatureSet({k: np.array(v) for k, v in found.features.items()}, found.labels, found.keys, found.tally)
    targets = {name: Path(cache_dir) / cache_key(source, shards, _canonical(name, depth), pool or "default",
                                                 config.data.image_size) for name in names}
    parts = Path(cache_dir) / (hashlib.sha256("".join(map(str, targets.values())).encode()).hexdigest()[:24] + ".parts")
    with featurestore.cache_lock(parts, processes):  # a second eval of the same features waits, then reads them
        if not all(featurestore.is_complete(target, need_labels) for target in targets.values()):
            _extract_parts(source, shards, names, layers, pool, batch_size, num_workers, need_labels,
                           device or processes.device(), parts, processes)
            processes.barrier()
            if not processes.first:
                return None
            tally = featurestore.merge(parts, processes.world, targets, shards.expected)
            if not tally.read:
                if tally.lost:
                    raise DataError(f"{shard_spec}: no sample could be read; {tally.summary()}")
                raise ConfigError(f"no samples in {shard_spec}")
    if not processes.first:
        return None
    stores = {name: featurestore.load(target) for name, target in targets.items()}
    _, labels, keys, tally = next(iter(stores.values()))
    result = FeatureSet({name: store[0] for name, store in stores.items()}, labels if need_labels else None, keys, tally)
    return check_tally(shard_spec, result, max_skipped)


def _extract_parts(source: EncoderSource, shards, names: list[str], layers: list[int] | None, pool: str | None,
                   batch_size: int, num_workers: int, need_labels: bool, device: str, parts: Path,
                   processes: Processes) -> None:
    """This process's share of the shards -> numbered feature parts in ``parts``."""
    encoder = source.build()
    pool = pool or getattr(getattr(encoder, "config", None), "pool", None)  # a ViT's configured pooling
    if encoder is not None:
        encoder.to(device)
        if pool == "map" and getattr(encoder, "attn_pool", None) is None:
            raise ConfigError("--pool map needs an encoder trained with model.pool=map")
    fields = ("image", "label", "key") if need_labels else ("image", "key")
    loader = eval_loader(shards, source.config.data, fields, num_workers, batch_size, processes.rank, processes.world)
    writer = featurestore.PartWriter(parts, processes.rank, names)
    tally = ReadTally(None)  # what this process read; the merge sets the expected total
    for batch in counted(loader, tally):
        images = batch["image"].to(device)
        with source.autocast(device):
            if encoder is None:
                features = {PIXELS: images.flatten(1)}
            elif not layers:
                features = {"last": encoder.pool(encoder.forward_features(images), pool)}
            else:
                # attention pooling was trained on the last block only; average the others
                features = {name: encoder.pool(tokens, "gap" if pool == "map" else pool)
                            for name, tokens in zip(names, encoder.intermediate_layers(images, layers))}
        features = {name: value.float().cpu().numpy() for name, value in features.items()}
        writer.add(features, list(batch["key"]), batch["label"].numpy() if need_labels else None)
    writer.close(tally, need_labels)


def check_tally(shard_spec: str, features: FeatureSet, max_skipped: float) -> FeatureSet:
    """Warn on stderr when any sample was lost; fail above ``max_skipped`` of those expected."""
    tally = features.tally
    if tally.lost:
        base = tally.expected or (tally.read + tally.lost)
        if tally.lost > max_skipped * base:
            raise DataError(f"{shard_spec}: {tally.summary()}: {tally.lost / base:.1%} lost, more than the allowed "
                            f"{max_skipped:.1%} (--max-skipped)")
        print(f"warning: {shard_spec}: {tally.summary()}", file=sys.stderr)
    elif tally.skipped.get(UNLABELLED):
        print(f"note: {shard_spec}: {tally.skipped[UNLABELLED]} unlabelled samples left out", file=sys.stderr)
    return features
