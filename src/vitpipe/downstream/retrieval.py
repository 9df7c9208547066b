"""Nearest neighbours with FAISS: weighted k-NN classification and a saved retrieval index.

Features are L2-normalized, so inner product = cosine similarity. Searches run on every GPU
faiss sees (a faiss-gpu install; `index_cpu_to_all_gpus`), else on the CPU; saved indexes are
always CPU indexes, so they load anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vitpipe.atomic import write_text_atomic, writing
from vitpipe.config import ConfigError


def normalize(features: np.ndarray) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32).copy()
    faiss.normalize_L2(features)
    return features


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 ks: tuple[int, ...] = (10, 20, 200), temperature: float = 0.07,
                 settings: "IndexSettings | None" = None) -> dict[int, float]:
    """Weighted k-NN (votes exp(cos / T)) top-1 accuracy for each k (as in DINO's evaluation),
    exact by default; an approximate index (``settings``) for reference sets too large for it."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    index = build_index(train_x, settings or IndexSettings(), keep_on_gpus=True)
    kmax = min(max(ks), len(train_x))
    similarity, neighbours = search(index, test_x, kmax)
    found = neighbours >= 0  # an IVF search may find fewer than k
    neighbour_labels = train_y[np.where(found, neighbours, 0)]
    # exp(cos / T) relative to each query's nearest: the same votes' ratios, and no overflow to
    # inf (and tied votes) at a small T (cos 1 / T 0.0005 = exp(2000))
    nearest = np.where(found[:, :1], similarity[:, :1], 0.0).astype(np.float64)  # searches sort by similarity
    weights = np.where(found, np.exp(np.where(found, similarity - nearest, 0.0) / temperature), 0.0)
    results = {}
    for k in ks:
        k_eff = min(k, kmax)
        votes = np.zeros((len(test_x), classes))
        np.add.at(votes, (np.arange(len(test_x))[:, None], neighbour_labels[:, :k_eff]), weights[:, :k_eff])
        results[k] = float((votes.argmax(axis=1) == test_y).mean())
    return results


def gpu_count() -> int:
    """GPUs faiss can use (0 with the CPU build, which has no GPU functions at all)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def on_gpus(index: faiss.Index) -> faiss.Index:
    """``index`` replicated (sharded when large) over every GPU, or itself without one. HNSW has
    no GPU version in faiss and stays on the CPU."""
    if gpu_count() == 0 or isinstance(index, faiss.IndexHNSW):
        return index
    return faiss.index_cpu_to_all_gpus(index)


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if gpu_count() and not isinstance(index, faiss.IndexHNSW) else index


@dataclass
class IndexSettings:
    kind: str = "flat"
    """flat (exact) | ivf (inverted lists) | ivfpq (inverted lists of product-quantised codes, pq_m
    bytes a vector: for indexes that do not fit in memory flat) | hnsw (graph)."""
    nlist: int = 100
    """IVF: number of k-means cells."""
    nprobe: int = 8
    """IVF: cells visited per query."""
    hnsw_m: int = 32
    """HNSW: neighbours per node."""
    ef_search: int = 64
    """HNSW: candidate list size at query time."""
    pq_m: int = 16
    """IVF-PQ: sub-quantisers (bytes per vector); must divide the feature dimension."""

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "ivfpq", "hnsw"):
            raise ConfigError("--index-type must be flat, ivf, ivfpq or hnsw")
        for name, value, low in (("nlist", self.nlist, 1), ("nprobe", self.nprobe, 1), ("hnsw-m", self.hnsw_m, 2),
                                 ("ef-search", self.ef_search, 1), ("pq-m", self.pq_m, 1)):
            if value < low:  # faiss fails on them only at search time, after the features are extracted
                raise ConfigError(f"--{name} must be >= {low}, got {value}")


def build_index(features: np.ndarray, settings: IndexSettings = IndexSettings(),
                keep_on_gpus: bool = False) -> faiss.Index:
    """An index over ``features``, trained and filled on the GPUs when there are some; returned as
    a CPU index (to save) unless ``keep_on_gpus`` (to search right away)."""
    vectors = normalize(features)
    dim = vectors.shape[1]
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif settings.kind in ("ivf", "ivfpq"):
        nlist = max(1, min(settings.nlist, len(vectors) // 39))  # faiss wants ~39 points per centroid
        if settings.kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if dim % settings.pq_m:
                raise ConfigError(f"--pq-m {settings.pq_m} must divide the feature dimension {dim}")
            if len(vectors) < 256:  # 8-bit codebooks: 256 centroids per sub-quantiser
                raise ConfigError(f"ivfpq needs at least 256 vectors to train its codebooks; got {len(vectors)}")
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, settings.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(settings.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = settings.ef_search
    index = on_gpus(index)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index if keep_on_gpus else to_cpu(index)


def save_index(index: faiss.Index, keys: list[str], labels: np.ndarray | None, directory: Path,
               meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with writing(directory / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    ids = {"keys": keys, "labels": None if labels is None else labels.tolist(), **meta}
    write_text_atomic(directory / "ids.json", json.dumps(ids))


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
    _, neighbours = search(on_gpus(index), features, kmax)
    others = (neighbours >= 0) & (neighbours != np.arange(len(features))[:, None])
    rank = np.cumsum(others, axis=1)  # 1-based rank among the others, per column
    same = labels[np.where(neighbours >= 0, neighbours, 0)] == labels[:, None]
    return {k: float(np.any(others & (rank <= k) & same, axis=1).mean()) for k in ks}
