"""Nearest neighbours with FAISS: weighted k-NN classification and a saved retrieval index.

Features are L2-normalized, so inner product = cosine similarity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vitpipe.config import ConfigError


def normalize(features: np.ndarray) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32).copy()
    faiss.normalize_L2(features)
    return features


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 ks: tuple[int, ...] = (10, 20, 200), temperature: float = 0.07) -> dict[int, float]:
    """Weighted k-NN (votes exp(cos / T)) top-1 accuracy for each k (as in DINO's evaluation)."""
    train, test = normalize(train_x), normalize(test_x)
    classes = int(max(train_y.max(), test_y.max())) + 1
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    kmax = min(max(ks), len(train))
    similarity, neighbours = index.search(test, kmax)
    neighbour_labels = train_y[neighbours]
    weights = np.exp(similarity.astype(np.float64) / temperature)
    results = {}
    for k in ks:
        k_eff = min(k, kmax)
        votes = np.zeros((len(test), classes))
        np.add.at(votes, (np.arange(len(test))[:, None], neighbour_labels[:, :k_eff]), weights[:, :k_eff])
        results[k] = float((votes.argmax(axis=1) == test_y).mean())
    return results


@dataclass
class IndexSettings:
    kind: str = "flat"
    """flat (exact) | ivf (inverted lists) | hnsw (graph)."""
    nlist: int = 100
    """IVF: number of k-means cells."""
    nprobe: int = 8
    """IVF: cells visited per query."""
    hnsw_m: int = 32
    """HNSW: neighbours per node."""
    ef_search: int = 64
    """HNSW: candidate list size at query time."""

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise ConfigError("--index-type must be flat, ivf or hnsw")


def build_index(features: np.ndarray, settings: IndexSettings = IndexSettings()) -> faiss.Index:
    vectors = normalize(features)
    dim = vectors.shape[1]
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif settings.kind == "ivf":
        nlist = max(1, min(settings.nlist, len(vectors) // 39))  # faiss wants ~39 points per centroid
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(settings.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = settings.ef_search
    index.add(vectors)
    return index


def save_index(index: faiss.Index, keys: list[str], labels: np.ndarray | None, directory: Path,
               meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, directory / "index.faiss")
    ids = {"keys": keys, "labels": None if labels is None else labels.tolist(), **meta}
    (directory / "ids.json.tmp").write_text(json.dumps(ids))
    os.replace(directory / "ids.json.tmp", directory / "ids.json")


def load_index(directory: Path) -> tuple[faiss.Index, dict]:
    if not (directory / "index.faiss").is_file():
        raise ConfigError(f"no retrieval index in {directory}; build it with `vitpipe eval retrieval RUN --index SHARDS`")
    return faiss.read_index(str(directory / "index.faiss")), json.loads((directory / "ids.json").read_text())


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids), each [Q, k]."""
    return index.search(normalize(queries), k)


def recall_at_k(index: faiss.Index, features: np.ndarray, labels: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Leave-one-out label-match recall: a query counts when one of its k nearest others shares its label."""
    kmax = min(max(ks) + 1, index.ntotal)
    _, neighbours = search(index, features, kmax)
    own = np.arange(len(features))[:, None]
    results = {}
    for k in ks:
        hits = []
        for row, ids in enumerate(neighbours):
            others = [i for i in ids if i != own[row, 0] and i >= 0][:k]
            hits.append(bool(others) and bool(np.any(labels[others] == labels[row])))
        results[k] = float(np.mean(hits))
    return results
