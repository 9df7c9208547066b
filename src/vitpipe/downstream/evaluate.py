"""One function per `vitpipe eval` command: features -> numbers -> RUN/eval/<name>[.baseline].json."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vitpipe.runlayout import RunLayout
from vitpipe import __version__
from vitpipe.config import ConfigError, to_dict
from vitpipe.downstream import contamination
from vitpipe.downstream.featurestore import Processes
from vitpipe.downstream.features import PIXELS, EncoderSource, FeatureSet, extract, layer_names
from vitpipe.downstream.probe import ProbeSettings, probe_sets
from vitpipe.downstream.retrieval import (
    IndexSettings, build_index, knn_classify, load_index, recall_at_k, save_index, search,
)
from vitpipe.pipeline.shardset import has_labels, label_remap, resolve_shards
from vitpipe.pipeline.manifest import manifest_hash, write_json_atomic
from vitpipe.ssl.engine.rundir import git_revision


def source_for(run: Path, init: str, pixels: bool, precision: str = "fp32") -> EncoderSource:
    """The encoder an eval scores, at ``precision`` (auto | fp32 | bf16, recorded in its result)."""
    if pixels and init != "trained":
        raise ConfigError("--pixels and --init random are separate baselines; pass one")
    return EncoderSource.resolve(run, "pixels" if pixels else init).with_precision(precision)


def data_id(spec: str) -> dict[str, Any]:
    """What an eval was run on: the spec as given, the shards it named (local ones as absolute
    paths, so "fm/train" and "/data/fm/train" are one data set) and the manifest's sha256."""
    shards = resolve_shards(spec)
    return {"shards": spec, "paths": [url if "://" in url else str(Path(url).resolve()) for url in shards.urls],
            "manifest_sha256": manifest_hash(shards.directory) if shards.directory else None,
            "samples": shards.total}


def result_path(source: EncoderSource, name: str) -> Path:
    """RUN/eval/<name>[.random|.pixels].json"""
    return RunLayout.of(source.run).result(f"{name}{source.baseline_suffix}")


def write_result(source: EncoderSource, name: str, payload: dict[str, Any], data: dict[str, str],
                 seconds: float) -> Path:
    result = {
        "task": name, "baseline": {"trained": None, "random": "random-init", "pixels": "raw-pixels"}[source.kind],
        **payload,
        "seconds": round(seconds, 2),
        "provenance": {
            "encoder": str(source.weights) if source.weights else source.kind, "step": source.step,
            "precision": source.resolved().precision,
            "config": to_dict(source.config), "data": {k: data_id(v) for k, v in data.items()},
            "git_revision": git_revision(), "vitpipe_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    path = result_path(source, name)
    write_json_atomic(path, result)
    return path


def checked_contamination(source: EncoderSource, test: str, limit: float, **references: str) -> dict[str, Any]:
    """The contamination figure of an eval of ``source`` on ``test`` (refused above ``limit``): the
    run's pretraining shards count for its trained encoder only (a baseline never saw them), the
    eval's own training / reference shards (``references``) for every encoder."""
    if source.kind == "trained" and source.config.data.shards:
        references = {"pretraining": source.config.data.shards, **references}
    cache = RunLayout.of(source.run).cache / "fingerprints"
    return contamination.checked(test, references, cache, limit).as_dict()


def _features(source: EncoderSource, spec: str, layers: list[int] | None, pool: str | None, workers: int,
              need_labels: bool = True, max_skipped: float = 0.01) -> FeatureSet | None:
    """Under torchrun / accelerate launch every process extracts its share; only the first gets the
    features back (None elsewhere: those processes are done)."""
    cache = RunLayout.of(source.run).cache
    return extract(source, spec, layers=layers, pool=pool, num_workers=workers, cache_dir=cache,
                   need_labels=need_labels, max_skipped=max_skipped, processes=Processes.from_env())


def _labels_for(train: str, test: str) -> Callable[[FeatureSet], FeatureSet]:
    """Refuses (before any extraction) a test set with classes the train set has not; gives what
    puts the test set's labels in the train set's numbering where the two were ingested apart."""
    remap = label_remap(train, test)
    if remap is None:
        return lambda features: features
    table = np.asarray(remap, dtype=np.int64)
    return lambda features: dataclasses.replace(features, labels=table[features.labels])


def _read_counts(**sets: FeatureSet) -> dict[str, Any]:
    """Samples expected, read and skipped by reason, per data argument: no eval drops data silently."""
    return {name: features.tally.as_dict() for name, features in sets.items()}


def _names(source: EncoderSource, layers: list[int] | None) -> list[str]:
    return [PIXELS] if source.kind == "pixels" else layer_names(layers)


def _probe_layers(names: list[str], train_set, test_set, settings: ProbeSettings, concat: bool) -> dict[str, Any]:
    """Each layer's probe, and with ``concat`` (more than one layer) the probe of all of them side by
    side under the name "a+b+...": layers of one width are trained together in one pass."""
    widths: dict[int, list[str]] = {}
    for name in names:
        widths.setdefault(train_set.features[name].shape[1], []).append(name)
    joined = concat and len(names) > 1
    results = {}
    for group in widths.values():
        together = joined and len(widths) == 1  # the concatenation rides along in the same pass
        found = probe_sets([train_set.features[n] for n in group], train_set.labels,
                           [test_set.features[n] for n in group], test_set.labels, settings, joined=together)
        results.update(zip(group + (["+".join(names)] if together else []), found))
    if joined and len(widths) > 1:
        stacked = [np.concatenate([s.features[name] for name in names], axis=1) for s in (train_set, test_set)]
        results["+".join(names)] = probe_sets([stacked[0]], train_set.labels, [stacked[1]], test_set.labels, settings)[0]
    return {name: results[name] for name in [*names, *(["+".join(names)] if joined else [])]}


def eval_linear_probe(source: EncoderSource, train: str, test: str, layers: list[int] | None = None,
                      pool: str | None = None, settings: ProbeSettings = ProbeSettings(),
                      workers: int = 2, concat: bool = False, max_skipped: float = 0.01,
                      max_contamination: float = contamination.DEFAULT_MAX) -> tuple[Path | None, dict[str, Any]]:
    """``concat`` adds one more candidate: the probed layers' features side by side (as DINO probes
    its last blocks); the validation split picks among all candidates."""
    start = time.monotonic()
    leaks = checked_contamination(source, test, max_contamination, train=train)
    in_train_labels = _labels_for(train, test)
    train_set = _features(source, train, layers, pool, workers, max_skipped=max_skipped)
    test_set = _features(source, test, layers, pool, workers, max_skipped=max_skipped)
    if train_set is None or test_set is None:
        return None, {}
    test_set = in_train_labels(test_set)
    per_layer = {name: asdict(result) for name, result in
                 _probe_layers(_names(source, layers), train_set, test_set, settings, concat).items()}
    best_layer = max(per_layer, key=lambda n: per_layer[n]["val_top1"])
    best = per_layer[best_layer]
    payload = {"top1": best["top1"], "top5": best["top5"], "val_top1": best["val_top1"], "layer": best_layer,
               "folds": best["folds"], "judged": best["judged"],
               "lr": best["lr"], "weight_decay": best["weight_decay"], "pool": pool or source.config.model.pool,
               "per_layer": per_layer, "settings": asdict(settings),
               "train_samples": len(train_set.keys), "test_samples": len(test_set.keys),
               "samples": _read_counts(train=train_set, test=test_set), "contamination": leaks}
    path = write_result(source, "linear-probe", payload, {"train": train, "test": test}, time.monotonic() - start)
    return path, payload


def eval_knn(source: EncoderSource, train: str, test: str, ks: tuple[int, ...] = (10, 20, 200),
             temperature: float = 0.07, pool: str | None = None, workers: int = 2,
             layer: int | None = None, max_skipped: float = 0.01,
             index: IndexSettings = IndexSettings(),
             max_contamination: float = contamination.DEFAULT_MAX) -> tuple[Path | None, dict[str, Any]]:
    if not temperature > 0:  # 0 makes every vote inf (ties), a negative one weights the farthest most
        raise ConfigError(f"--temperature must be > 0, got {temperature:g}")
    start = time.monotonic()
    leaks = checked_contamination(source, test, max_contamination, train=train)
    layers = None if layer is None or source.kind == "pixels" else [layer]
    in_train_labels = _labels_for(train, test)
    train_set = _features(source, train, layers, pool, workers, max_skipped=max_skipped)
    test_set = _features(source, test, layers, pool, workers, max_skipped=max_skipped)
    if train_set is None or test_set is None:
        return None, {}
    test_set = in_train_labels(test_set)
    name = _names(source, layers)[0]
    accuracy = knn_classify(train_set.features[name], train_set.labels, test_set.features[name], test_set.labels,
                            ks, temperature, index)
    best_k = 20 if 20 in accuracy else max(accuracy, key=accuracy.get)
    payload = {"top1": accuracy[best_k], "k": best_k, "per_k": {str(k): v for k, v in accuracy.items()},
               "temperature": temperature, "pool": pool or source.config.model.pool, "layer": name,
               "index": asdict(index),
               "train_samples": len(train_set.keys), "test_samples": len(test_set.keys),
               "samples": _read_counts(train=train_set, test=test_set), "contamination": leaks}
    path = write_result(source, "knn", payload, {"train": train, "test": test}, time.monotonic() - start)
    return path, payload


def eval_retrieval(source: EncoderSource, index_shards: str, settings: IndexSettings = IndexSettings(),
                   pool: str | None = None, workers: int = 2, max_skipped: float = 0.01) -> tuple[Path | None, dict[str, Any]]:
    """Build (and save) the index over ``index_shards``; report label-match recall@1/5/10 when labelled."""
    start = time.monotonic()
    shards = resolve_shards(index_shards)
    labelled = has_labels(shards.urls[0])
    features = _features(source, index_shards, None, pool, workers, need_labels=labelled, max_skipped=max_skipped)
    if features is None:
        return None, {}
    name = _names(source, None)[0]
    index = build_index(features.features[name], settings)
    directory = RunLayout.of(source.run).eval / f"retrieval{source.baseline_suffix}"
    save_index(index, features.keys, features.labels, directory,
               {"shards": index_shards, "shards_identity": shards.identity(), "settings": asdict(settings), "pool": pool or source.config.model.pool,
                "source": source.kind})
    recall = recall_at_k(index, features.features[name], features.labels) if labelled else {}
    payload = {"recall": {str(k): v for k, v in recall.items()}, "index": str(directory / "index.faiss"),
               "index_type": settings.kind, "size": index.ntotal, "labelled": labelled,
               "samples": _read_counts(index=features)}
    path = write_result(source, "retrieval", payload, {"index": index_shards}, time.monotonic() - start)
    return path, payload


def query_image(source: EncoderSource, image_path: Path, top_k: int, pool: str | None = None) -> list[tuple[str, float]]:
    """Nearest keys of one image in the saved index (built by eval_retrieval with the same source)."""
    import torch

    from vitpipe.pipeline.images import ImageRejected, decode_rgb
    from vitpipe.pipeline.transforms import TransformSpec, build_transform

    directory = RunLayout.of(source.run).eval / f"retrieval{source.baseline_suffix}"
    index, ids = load_index(directory)
    if not Path(image_path).is_file():
        raise ConfigError(f"query image not found: {image_path}")
    try:
        image = decode_rgb(as_ingested(Path(image_path), ids["shards"]))
    except ImageRejected as err:
        raise ConfigError(f"query image {image_path}: {err}") from None
    config = source.config
    transform = build_transform(TransformSpec.for_eval(config.data))
    tensor = transform(image).unsqueeze(0)
    encoder = source.build()
    with torch.no_grad():
        feature = tensor.flatten(1) if encoder is None else encoder.pool(encoder.forward_features(tensor),
                                                                           pool or ids.get("pool"))
    similarity, neighbours = search(index, feature.numpy(), min(top_k, index.ntotal))
    return [(ids["keys"][i], float(s)) for i, s in zip(neighbours[0], similarity[0]) if i >= 0]


def as_ingested(image_path: Path, index_shards: str) -> bytes:
    """The query image's bytes after the same ingest-time processing (transparency on the
    background, resize mode and size, encoding) the indexed images had, read from their manifest:
    an image that is in the index then finds itself. Shards without a vitpipe manifest: unchanged."""
    from vitpipe.config import IngestConfig, from_dict
    from vitpipe.pipeline.manifest import find_manifest
    from vitpipe.pipeline.sources import make_sample

    data = image_path.read_bytes()
    shards = resolve_shards(index_shards)
    manifest = find_manifest(shards.directory) if shards.directory else None
    settings = json.loads(manifest.read_text()).get("settings") if manifest else None
    if not settings:
        return data
    ext = {"jpeg": "jpg"}.get(image_path.suffix.lower().lstrip("."), image_path.suffix.lower().lstrip("."))
    return make_sample(data, "query", from_dict(IngestConfig, settings), ext or None).image


def hit_grid(query: Path | str, hits: list[tuple[str, float]], shard_spec: str, out: Path) -> Path:
    """A PNG: the query (an image file, or a text), then its hits with their similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitpipe.pipeline.images import decode_rgb
    from vitpipe.pipeline.shardset import images_by_key

    images = images_by_key(shard_spec, {key for key, _ in hits})
    fig, axes = plt.subplots(1, len(hits) + 1, figsize=(1.6 * (len(hits) + 1), 2.0))
    axes = np.atleast_1d(axes)
    if isinstance(query, Path):
        axes[0].imshow(decode_rgb(query.read_bytes()))
        axes[0].set_title("query", fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "\n".join(textwrap.wrap(query, 14)), ha="center", va="center", fontsize=8)
        axes[0].set_title("text query", fontsize=8)
    for axis, (key, similarity) in zip(axes[1:], hits):
        if key in images:
            axis.imshow(images[key])
        axis.set_title(f"{key}\n{similarity:.3f}", fontsize=6)
    for axis in axes:
        axis.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
