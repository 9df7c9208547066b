"""The curation steps that look through an encoder: semantic dedup, CLIP-score filtering and
cluster-balanced sampling. Embeddings come from the feature store (cached under the encoder's
RUN/eval/cache, extracted on many processes under torchrun like any eval); k-means is faiss's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError
from vitpipe.curate.recipe import BalanceStep, ClipScoreStep, DecontaminateStep, SemanticDedupStep
from vitpipe.curate.steps import Item, Removal
from vitpipe.downstream.features import EncoderSource, extract
from vitpipe.downstream.featurestore import Processes


def encoder_source(run: str, what: str) -> EncoderSource:
    """The trained encoder of ``run``, refused in one line when it is missing or damaged."""
    if not Path(run).exists():
        raise ConfigError(f"{what}: {run} does not exist (a vitpipe run directory)")
    return EncoderSource.resolve(Path(run), "trained")


def embeddings(source: EncoderSource, spec: str, workers: int = 2) -> dict[str, np.ndarray] | None:
    """Key -> L2-normalised output embedding of every sample of ``spec`` (None on a torchrun
    process other than the first: its share is in the store)."""
    cache = RunLayout.of(source.run).cache
    found = extract(source, spec, need_labels=False, num_workers=workers, cache_dir=cache,
                    processes=Processes.from_env())
    if found is None:
        return None
    vectors = np.asarray(found.features["last"], dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return dict(zip(found.keys, vectors))


def kmeans(vectors: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, D], assignment [N]) by faiss k-means on cosine (spherical), k <= N; the best of
    5 random starts (one start often merges two true clusters and splits a third)."""
    import faiss

    clusters = max(1, min(clusters, len(vectors)))
    model = faiss.Kmeans(vectors.shape[1], clusters, niter=20, nredo=5, seed=seed, spherical=True, verbose=False,
                         gpu=faiss.get_num_gpus() > 0, min_points_per_centroid=1)
    model.train(np.ascontiguousarray(vectors, dtype=np.float32))
    _, assignment = model.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return model.centroids, assignment[:, 0]


def _matrix(items: list[Item], vectors: dict[str, np.ndarray], step: str) -> np.ndarray:
    missing = [item.key for item in items if item.key not in vectors]
    if missing:
        raise ConfigError(f"{step}: no embedding for {len(missing)} samples (e.g. {missing[0]}): they could not be read")
    return np.stack([vectors[item.key] for item in items])


def run_semantic_dedup(items: list[Item], step: SemanticDedupStep, vectors: dict[str, np.ndarray]) -> dict[int, Removal]:
    """Inside each k-means cluster, samples in order of falling distance to the centroid; one is
    kept unless its cosine to an already kept one is above 1 - eps."""
    if not items:
        return {}
    matrix = _matrix(items, vectors, "semantic_dedup")
    centroids, assignment = kmeans(matrix, step.clusters or round(math.sqrt(len(items))), step.seed)
    removed = {}
    for cluster in range(len(centroids)):
        members = np.flatnonzero(assignment == cluster)
        order = members[np.argsort(matrix[members] @ centroids[cluster], kind="stable")]  # least typical first
        kept: list[int] = []
        for index in order.tolist():
            if kept:
                cosines = matrix[kept] @ matrix[index]
                best = int(np.argmax(cosines))
                if cosines[best] > 1 - step.eps:
                    removed[items[index].position] = Removal("semantic_duplicate", float(cosines[best]),
                                                             items[kept[best]].key, {"cluster": cluster})
                    continue
            kept.append(index)
    return removed


def run_balance(items: list[Item], step: BalanceStep, vectors: dict[str, np.ndarray]) -> dict[int, Removal]:
    """Hierarchical k-means, then ``target`` samples drawn evenly at every level from the top down:
    each top cluster an equal share, each of its sub-clusters an equal share of that, and so on."""
    if len(items) <= step.target:
        return {}
    matrix = _matrix(items, vectors, "balance")
    rng = np.random.default_rng(step.seed)
    # children[level][node] = the nodes one level down (level 0: item rows) that make up this node
    children: list[list[list[int]]] = []
    points, members = matrix, [[i] for i in range(len(items))]
    for level, count in enumerate(list(step.levels) or [round(math.sqrt(len(items)))]):
        _, assignment = kmeans(points, count, step.seed + level)
        nodes = [np.flatnonzero(assignment == c).tolist() for c in range(int(assignment.max()) + 1)]
        nodes = [node for node in nodes if node]
        children.append(nodes)
        members = [[row for child in node for row in members[child]] for node in nodes]
        points = np.stack([matrix[m].mean(axis=0) for m in members])
    sizes = _sizes(children)
    chosen = _draw(children, sizes, len(children), list(range(len(children[-1]))), step.target, rng)
    leaf_of = {row: leaf for leaf, rows in enumerate(children[0]) for row in rows}
    return {items[i].position: Removal("balance", None, None, {"cluster": leaf_of[i]})
            for i in range(len(items)) if i not in chosen}


def _sizes(children: list[list[list[int]]]) -> list[list[int]]:
    """sizes[level][node]: how many items sit under each node."""
    sizes = [[len(node) for node in children[0]]]
    for level in range(1, len(children)):
        sizes.append([sum(sizes[level - 1][child] for child in node) for node in children[level]])
    return sizes


def _draw(children, sizes, level: int, nodes: list[int], budget: int, rng: np.random.Generator) -> set[int]:
    """``budget`` item rows from ``nodes`` (of ``level``; items when level is 0), shared evenly."""
    if level == 0:
        return set(rng.choice(nodes, size=min(budget, len(nodes)), replace=False).tolist())
    capacity = np.array([sizes[level - 1][node] for node in nodes])
    share = np.zeros(len(nodes), dtype=np.int64)
    left = min(budget, int(capacity.sum()))
    while left > 0:  # equal shares; a node smaller than its share gives all it has, the rest goes round again
        open_nodes = np.flatnonzero(share < capacity)
        each = max(1, left // len(open_nodes))
        for node in rng.permutation(open_nodes):
            take = int(min(each, capacity[node] - share[node], left))
            share[node] += take
            left -= take
    chosen: set[int] = set()
    for node, n in zip(nodes, share.tolist()):
        if n:
            chosen |= _draw(children, sizes, level - 1, children[level - 1][node], n, rng)
    return chosen


def run_clip_score(items: list[Item], step: ClipScoreStep, scores: dict[str, float]) -> dict[int, Removal]:
    """Remove pairs below ``min_score``, then all but the best ``top_fraction`` of those left."""
    missing = [item.key for item in items if item.key not in scores]
    if missing:
        raise ConfigError(f"clip_score: no score for {len(missing)} samples (e.g. {missing[0]}): each needs an image and a caption")
    removed = {item.position: Removal("low_clip_score", scores[item.key]) for item in items
               if scores[item.key] < step.min_score}
    left = sorted((item for item in items if item.position not in removed), key=lambda i: (-scores[i.key], i.position))
    keep = math.ceil(step.top_fraction * len(left)) if step.top_fraction < 1 else len(left)
    removed.update({item.position: Removal("low_clip_score", scores[item.key], None, {"rank": rank})
                    for rank, item in enumerate(left) if rank >= keep})
    return removed


@torch.no_grad()
def clip_scores(source: EncoderSource, spec: str, workers: int = 2) -> dict[str, float]:
    """Key -> cosine of its image and caption embeddings under the CLIP run."""
    from vitpipe.downstream.imagetext import embed_pairs, load_image_text_model

    model = load_image_text_model(source)
    model.eval()
    images, texts, keys, _ = embed_pairs(model, source, spec, workers, max_skipped=0.01)
    cosines = (torch.nn.functional.normalize(images, dim=-1) * torch.nn.functional.normalize(texts, dim=-1)).sum(dim=-1)
    return dict(zip(keys, cosines.tolist()))


def run_embedding_decontaminate(items: list[Item], step: DecontaminateStep, vectors: dict[str, np.ndarray],
                                evaluation: dict[str, dict[str, np.ndarray]]) -> dict[int, Removal]:
    """Samples whose embedding is at least ``min_embedding_cosine`` to an evaluation image's
    (``evaluation``: set -> key -> embedding), by faiss inner-product search."""
    import faiss

    removed: dict[int, Removal] = {}
    if not items:
        return removed
    queries = _matrix(items, vectors, "decontaminate")
    for name, keyed in evaluation.items():
        keys = list(keyed)
        index = faiss.IndexFlatIP(queries.shape[1])
        index.add(np.stack([keyed[k] for k in keys]).astype(np.float32))
        scores, nearest = index.search(queries.astype(np.float32), 1)
        for row, (score, hit) in enumerate(zip(scores[:, 0].tolist(), nearest[:, 0].tolist())):
            position = items[row].position
            if score >= step.min_embedding_cosine and (position not in removed or score > removed[position].score):
                removed[position] = Removal("contaminated", float(score), keys[hit], {"against": name, "by": "embedding"})
    return removed
