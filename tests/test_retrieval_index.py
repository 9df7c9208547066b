"""k-NN and the FAISS retrieval index: votes as a brute-force numpy k-NN counts them, indexes that
save, load, refuse what they cannot build, and search alike on CPU and GPU."""

import faiss
import numpy as np
import pytest

from test_downstream import separable
from vitpipe.config import ConfigError
from vitpipe.downstream.retrieval import (IndexSettings, build_index, gpu_count, knn_classify, load_index, recall_at_k,
                                          save_index, search)


def brute_knn(train_x, train_y, test_x, k, temperature, classes):
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = b @ a.T
    preds = []
    for row in sims:
        top = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(classes)
        for j in top:
            votes[train_y[j]] += np.exp(row[j] / temperature)
        preds.append(votes.argmax())
    return np.array(preds)


def test_knn_matches_numpy_brute_force():
    train_x, train_y = separable(n=400, seed=2)
    train_x += np.random.default_rng(3).normal(size=train_x.shape).astype(np.float32) * 3  # make it imperfect
    test_x, test_y = separable(n=100, seed=4)
    result = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20, 200), temperature=0.07)
    for k in (10, 20, 200):
        expected = (brute_knn(train_x, train_y, test_x, k, 0.07, 4) == test_y).mean()
        assert result[k] == pytest.approx(expected)


def test_knn_at_a_tiny_temperature_votes_like_the_nearest_neighbour():
    """exp(cos / T) overflowed to inf at T = 0.0005 (tied votes, argmax 0): 0.54 where 1-NN gave 0.62.
    As T -> 0 the weighted vote must become the nearest neighbour's label."""
    train_x, train_y = separable(n=400, seed=2)
    train_x += np.random.default_rng(3).normal(size=train_x.shape).astype(np.float32) * 3
    test_x, test_y = separable(n=100, seed=4)
    nearest = knn_classify(train_x, train_y, test_x, test_y, ks=(1,), temperature=0.07)[1]
    with np.errstate(over="raise", invalid="raise"):
        tiny = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 200), temperature=0.0005)
    assert tiny == {10: nearest, 200: nearest}
    expected = (brute_knn(train_x, train_y, test_x, 10, 0.07, 4) == test_y).mean()  # ratios unchanged at 0.07
    assert knn_classify(train_x, train_y, test_x, test_y, ks=(10,), temperature=0.07)[10] == pytest.approx(expected)


def test_retrieval_index_save_load_and_recall(tmp_path):
    x, y = separable(n=300, seed=6)
    index = build_index(x)
    save_index(index, [f"k{i}" for i in range(300)], y, tmp_path / "idx", {"pool": "cls"})
    loaded, ids = load_index(tmp_path / "idx")
    s1, n1 = search(index, x[:20], 5)
    s2, n2 = search(loaded, x[:20], 5)
    assert np.array_equal(n1, n2) and np.allclose(s1, s2) and ids["keys"][7] == "k7"
    normed = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = normed @ normed.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)
    recall = recall_at_k(index, x, y, ks=(1, 5))
    for k in (1, 5):
        expected = np.mean([np.any(y[order[i, :k]] == y[i]) for i in range(300)])
        assert recall[k] == pytest.approx(expected)
    for kind in ("ivf", "ivfpq", "hnsw"):
        approx = build_index(x, IndexSettings(kind=kind, nlist=4, nprobe=4, pq_m=8))
        assert recall_at_k(approx, x, y, ks=(1,))[1] > 0.9
        assert knn_classify(x, y, x[:50], y[:50], ks=(10,), settings=IndexSettings(kind=kind, nlist=4, pq_m=8))[10] > 0.9


def test_vectorised_recall_counts_like_the_loop_it_replaced():
    """Neighbour lists with the query itself in any position and IVF's -1 padding."""
    from vitpipe.downstream.retrieval import recall_at_k as vectorised

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=60)
    neighbours = np.stack([rng.permutation(60)[:12] for _ in range(60)])
    neighbours[rng.random(neighbours.shape) < 0.15] = -1
    neighbours[np.arange(0, 60, 4), rng.integers(0, 12, size=15)] = np.arange(0, 60, 4)  # itself

    class Fixed:
        ntotal = 60

        def search(self, queries, k):
            return np.zeros((60, k), np.float32), neighbours[:, :k]

    recall = vectorised(Fixed(), np.ones((60, 4), np.float32), labels, ks=(1, 5, 10))
    for k in (1, 5, 10):
        hits = []
        for row, ids in enumerate(neighbours[:, :11]):  # the search asks for max(ks) + 1
            others = [i for i in ids if i != row and i >= 0][:k]
            hits.append(bool(others) and bool(np.any(labels[others] == labels[row])))
        assert recall[k] == pytest.approx(np.mean(hits))


def test_ivfpq_refuses_what_it_cannot_build():
    x, _ = separable(n=300, seed=1)
    with pytest.raises(ConfigError, match="must divide"):
        build_index(x, IndexSettings(kind="ivfpq", pq_m=7))
    with pytest.raises(ConfigError, match="at least 256"):
        build_index(x[:100], IndexSettings(kind="ivfpq", pq_m=8))


@pytest.mark.skipif(gpu_count() == 0, reason="faiss sees no GPU (CPU build or no device)")
def test_gpu_search_equals_cpu_search():
    x, y = separable(n=2000, seed=7)
    cpu = build_index(x)
    gpu = build_index(x, keep_on_gpus=True)
    assert not isinstance(gpu, faiss.IndexFlatIP)  # really moved
    _, n_cpu = search(cpu, x[:100], 10)
    _, n_gpu = search(gpu, x[:100], 10)
    assert (n_cpu == n_gpu).mean() > 0.99
    assert knn_classify(x, y, x[:200], y[:200], ks=(10,))[10] == pytest.approx(
        (brute_knn(x, y, x[:200], 10, 0.07, int(y.max()) + 1) == y[:200]).mean())
