"""Image-text evaluations: zero-shot classification (class-name prompts as the classifier) and
retrieval both ways between images and their captions."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError
from vitpipe.downstream.contamination import DEFAULT_MAX
from vitpipe.downstream.evaluate import checked_contamination, write_result
from vitpipe.downstream.features import EncoderSource, FeatureSet, check_tally
from vitpipe.pipeline.census import require
from vitpipe.pipeline.loader import ReadTally, counted, eval_loader
from vitpipe.pipeline.manifest import label_map_of
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.ssl import registry
from vitpipe.ssl.runs import load_run_objective

TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a drawing of a {}.",
             "a close-up photo of a {}.", "a photo of the {}.", "a rendering of a {}."]
"""Prompt ensemble (averaged text embeddings per class), after CLIP's ImageNet prompts."""


def class_names(test: str, classes_file: Path | None) -> list[str]:
    """One name per label index: from FILE (one per line), else the test shards' manifest label map."""
    if classes_file is not None:
        names = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
    else:
        label_map = label_map_of(resolve_shards(test).directory)
        if not label_map:
            raise ConfigError(f"{test}: its manifest has no label names; pass --classes FILE (one name per line)")
        names = [name for name, _ in sorted(label_map.items(), key=lambda item: item[1])]
    if len(names) < 2:
        raise ConfigError("zero-shot needs at least 2 class names")
    names = [name.replace("_", " ") for name in names]
    counts = Counter(name.lower() for name in names)
    repeated = sorted({name for name in names if counts[name.lower()] > 1})
    if repeated:
        raise ConfigError(f"class names must differ (one per label); repeated: {', '.join(repeated)}")
    return names


def check_class_count(test: str, names: list[str], census) -> None:
    """One name per label: as many names as the manifest's label map holds, and a name for every
    label the test shards carry (else labels past the list crash, or "chance" silently changes)."""
    label_map = label_map_of(resolve_shards(test).directory)
    if label_map and len(names) != len(label_map):
        raise ConfigError(f"{len(names)} class names for the {len(label_map)} labels of {test}'s label map; "
                          "give one name per label, in label order")
    if census is not None and census.max_label >= len(names):
        raise ConfigError(f"{test} has label {census.max_label} but only {len(names)} class names "
                          f"(labels 0..{len(names) - 1}); give one name per label, in label order")


def load_image_text_model(source: EncoderSource):
    """The whole objective (both towers, projections, tokenizer): trained from the newest verified
    checkpoint, or a random init of the same shape."""
    if source.kind == "pixels":
        raise ConfigError("zero-shot needs an image-text model; --pixels has no text side")
    if registry.get(source.config.objective).towers != ("image", "text"):
        raise ConfigError(f"zero-shot needs an image-text objective (clip); this run is {source.config.objective}")
    return load_run_objective(source.run, source.config, seed=source.seed if source.kind == "random" else None,
                              trained=source.kind == "trained")


@torch.no_grad()
def class_embeddings(model, names: list[str], templates: list[str]) -> torch.Tensor:
    """[classes, E]: each class's prompts embedded, averaged, renormalised."""
    rows = []
    for name in names:
        tokens, _ = model.tokenize.encode([template.format(name) for template in templates])
        rows.append(torch.nn.functional.normalize(model.encode_text(tokens).mean(dim=0), dim=-1))
    return torch.stack(rows)


def read_templates(templates_file: Path | None) -> list[str]:
    """Prompt templates with {} for the class name, one per line (default: ``TEMPLATES``)."""
    if templates_file is None:
        return list(TEMPLATES)
    templates = [line.strip() for line in Path(templates_file).read_text().splitlines() if "{}" in line]
    if not templates:
        raise ConfigError(f"{templates_file}: no template with {{}} in it")
    return templates


@torch.no_grad()
def eval_zero_shot(source: EncoderSource, test: str, classes_file: Path | None = None,
                   templates_file: Path | None = None, workers: int = 2,
                   max_skipped: float = 0.01, max_contamination: float = DEFAULT_MAX) -> tuple[Path, dict[str, Any]]:
    start = time.monotonic()
    names = class_names(test, classes_file)
    leaks = checked_contamination(source, test, max_contamination)
    templates = read_templates(templates_file)
    model = load_image_text_model(source)
    source = source.resolved()
    with source.autocast("cpu"):
        classifier = class_embeddings(model, names, templates).float()
    config = source.config
    shards = resolve_shards(test)
    check_class_count(test, names, require(shards, test, ("label",), "zero-shot"))
    loader = eval_loader(shards, config.data, ("image", "label"), workers)
    tally = ReadTally(shards.expected)
    top1 = top5 = 0
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)  # [true, predicted]
    for batch in counted(loader, tally):
        with source.autocast(str(batch["image"].device)):
            scores = model.encode_image(batch["image"]).float() @ classifier.T
        ranked = scores.topk(min(5, len(names)), dim=1).indices
        top1 += (ranked[:, 0] == batch["label"]).sum().item()
        top5 += (ranked == batch["label"].unsqueeze(1)).any(dim=1).sum().item()
        confusion.index_put_((batch["label"], ranked[:, 0]), torch.ones(len(ranked), dtype=torch.long), accumulate=True)
    check_tally(test, FeatureSet({}, None, [], tally), max_skipped)
    if not tally.read:
        raise ConfigError(f"no test samples in {test}")
    payload = {"top1": top1 / tally.read, "top5": top5 / tally.read, "chance": 1 / len(names), "classes": names,
               "templates": templates, "test_samples": tally.read, "samples": {"test": tally.as_dict()},
               "confusion": confusion.tolist(), "contamination": leaks}
    return write_result(source, "zero-shot", payload, {"test": test}, time.monotonic() - start), payload


@torch.no_grad()
def embed_pairs(model, source: EncoderSource, spec: str, workers: int, max_skipped: float):
    """Image and caption embeddings of every pair in ``spec``: ([N, E], [N, E], keys, tally)."""
    config, source = source.config, source.resolved()
    shards = resolve_shards(spec)
    require(shards, spec, ("text",), "image-text retrieval", every=True)
    loader = eval_loader(shards, config.data, ("image", "text", "key"), workers)
    tally = ReadTally(shards.expected)
    images, texts, keys = [], [], []
    for batch in counted(loader, tally):
        with source.autocast(str(batch["image"].device)):
            images.append(model.encode_image(batch["image"]).float())
            texts.append(model.encode_text(model.tokenize.encode(batch["text"])[0]).float())
        keys.extend(batch["key"])
    check_tally(spec, FeatureSet({}, None, [], tally), max_skipped)
    if not keys:
        raise ConfigError(f"no image-caption pairs in {spec}")
    return torch.cat(images), torch.cat(texts), keys, tally


def paired_recall(queries: torch.Tensor, database: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Fraction of queries whose own pair (the same row) is among their k nearest (cosine)."""
    ranks = (queries @ database.T).argsort(dim=1, descending=True)
    own = (ranks == torch.arange(len(queries)).unsqueeze(1)).float().argmax(dim=1)
    return {str(k): (own < k).float().mean().item() for k in ks}


def eval_text_retrieval(source: EncoderSource, index: str, workers: int = 2,
                        max_skipped: float = 0.01) -> tuple[Path, dict[str, Any]]:
    """recall@1/5/10 image->text and text->image over the pairs of ``index`` (a hit is the pair's
    own caption or image); the embeddings are kept for ``query_text``."""
    import numpy as np

    start = time.monotonic()
    model = load_image_text_model(source)
    images, texts, keys, tally = embed_pairs(model, source, index, workers, max_skipped)
    directory = RunLayout.of(source.run).eval / f"retrieval-text{source.baseline_suffix}"
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "pairs.npz", images=images.numpy(), keys=np.array(keys))
    (directory / "pairs.json").write_text(json.dumps({"shards": index, "shards_identity":
                                                      resolve_shards(index).identity()}))
    payload = {"image_to_text": paired_recall(images, texts), "text_to_image": paired_recall(texts, images),
               "size": len(keys), "samples": {"index": tally.as_dict()}}
    return write_result(source, "retrieval-text", payload, {"index": index}, time.monotonic() - start), payload


@torch.no_grad()
def query_text(source: EncoderSource, text: str, top_k: int) -> list[tuple[str, float]]:
    """Nearest images (keys, cosine) of a caption among those embedded by ``eval_text_retrieval``."""
    import numpy as np

    directory = RunLayout.of(source.run).eval / f"retrieval-text{source.baseline_suffix}"
    with np.load(directory / "pairs.npz", allow_pickle=False) as stored:
        images, keys = torch.from_numpy(stored["images"]), stored["keys"].tolist()
    model = load_image_text_model(source)
    scores = images @ model.encode_text(model.tokenize.encode([text])[0])[0]
    best = scores.topk(min(top_k, len(keys)))
    return [(keys[i], float(s)) for s, i in zip(best.values.tolist(), best.indices.tolist())]
