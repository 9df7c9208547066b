"""`vitpipe curate`'s steps that look through an encoder: semantic dedup (SemDeDup), the CLIP-score
filter (DataComp) and cluster-balanced sampling (ssl-data-curation), on their own with known
embeddings and end to end through the CLI with real runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import test_clip
from conftest import make_image
from test_trainer import RUN_ARGS

from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.curate.embedded import run_balance, run_clip_score, run_semantic_dedup
from vitpipe.curate.recipe import BalanceStep, ClipScoreStep, SemanticDedupStep
from vitpipe.curate.run import read_log
from vitpipe.curate.steps import Item
from vitpipe.pipeline.ingest import ingest

CLIP_ARGS = test_clip.ARGS
caption_shards = test_clip.caption_shards  # the CLIP tests' captioned shapes (a fixture)


def items_of(n: int) -> list[Item]:
    return [Item(i, f"k{i}", 8, 8, 0) for i in range(n)]


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_semantic_dedup_removes_what_is_within_eps_of_a_kept_sample_and_nothing_else():
    rng = np.random.default_rng(0)
    distinct = unit(rng.normal(size=(20, 16)))
    twins = unit(distinct[:5] + 0.01 * rng.normal(size=(5, 16)))  # cosine ~0.9999 to their originals
    vectors = dict(zip([f"k{i}" for i in range(25)], np.concatenate([distinct, twins])))
    removed = run_semantic_dedup(items_of(25), SemanticDedupStep(encoder="x", eps=0.01, clusters=4), vectors)
    pairs = {frozenset((f"k{p}", r.duplicate_of)) for p, r in removed.items()}
    assert len(removed) == 5 and pairs == {frozenset((f"k{i}", f"k{i + 20}")) for i in range(5)}
    assert all(r.reason == "semantic_duplicate" and r.score > 0.99 for r in removed.values())
    assert run_semantic_dedup(items_of(25), SemanticDedupStep(encoder="x", eps=1e-6, clusters=4), vectors) == {}


def test_balance_draws_evenly_across_clusters_whatever_their_sizes():
    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(3, 8))) * 10
    sizes = (100, 10, 2)
    rows = np.concatenate([centres[c] + 0.1 * rng.normal(size=(n, 8)) for c, n in enumerate(sizes)])
    vectors = dict(zip([f"k{i}" for i in range(len(rows))], unit(rows)))
    items = items_of(len(rows))
    removed = run_balance(items, BalanceStep(encoder="x", target=12, levels=[3]), vectors)
    kept = [i for i in range(len(rows)) if i not in removed]
    per_cluster = sorted(np.bincount(np.repeat(np.arange(3), sizes)[kept], minlength=3).tolist())
    assert len(kept) == 12 and per_cluster == [2, 5, 5]  # the small cluster gives all it has
    again = run_balance(items, BalanceStep(encoder="x", target=12, levels=[3]), vectors)
    assert again.keys() == removed.keys()  # seeded
    two_levels = run_balance(items, BalanceStep(encoder="x", target=12, levels=[6, 3]), vectors)
    assert len(items) - len(two_levels) == 12


def test_clip_score_threshold_and_top_fraction():
    scores = {f"k{i}": s for i, s in enumerate([0.9, 0.1, 0.5, 0.3, 0.7, -0.2])}
    removed = run_clip_score(items_of(6), ClipScoreStep(model="x", min_score=0.2), scores)
    assert sorted(removed) == [1, 5]
    removed = run_clip_score(items_of(6), ClipScoreStep(model="x", min_score=0.2, top_fraction=0.5), scores)
    assert sorted(set(range(6)) - set(removed)) == [0, 4]  # of the 4 above 0.2, the best 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    (root / "imgs" / "a").mkdir(parents=True)
    for i in range(16):
        image = make_image(i, size=16)
        image.save(root / "imgs" / "a" / f"p{i}.png")
        if i < 4:
            image.save(root / "imgs" / "a" / f"p{i}_again.png")  # a second file, byte-identical
    ingest(str(root / "imgs"), root / "shards", IngestConfig(shard_size=8, dedup=False, val_fraction=0.0),
           progress=False)
    assert main(["pretrain", "mae", "--data", str(root / "shards"), "--out", str(root / "mae"), *RUN_ARGS,
                 "train.max_steps=2"]) == 0
    return root


def test_semantic_dedup_and_balance_through_the_cli(world, tmp_path):
    out = tmp_path / "curated"
    assert main(["curate", str(world / "shards"), "--out", str(out), f"semantic_dedup.encoder={world / 'mae'}",
                 "semantic_dedup.eps=1e-5", "semantic_dedup.clusters=2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 20 and manifest["removed"].get("semantic_duplicate", 0) >= 4
    assert manifest["rows"] == manifest["written"] + sum(manifest["removed"].values())
    assert all(r["reason"] == "semantic_duplicate" and r["duplicate_of"] for r in read_log(out / "curation.jsonl"))
    balanced = tmp_path / "balanced"
    assert main(["curate", str(world / "shards"), "--out", str(balanced), f"balance.encoder={world / 'mae'}",
                 "balance.target=10", "balance.levels=[3]"]) == 0
    assert json.loads((balanced / "manifest.json").read_text())["written"] == 10


def test_encoder_steps_refuse_bad_runs_before_any_work(world, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(world / "mae", damaged)
    for weights in damaged.rglob("*.safetensors"):
        weights.write_bytes(b"not weights")
    cases = [([f"semantic_dedup.encoder={tmp_path / 'nowhere'}"], "does not exist", 2),
             ([f"balance.encoder={world / 'mae'}"], "balance.target", 2),
             ([f"clip_score.model={world / 'mae'}"], "image-text objective", 2),
             ([f"semantic_dedup.encoder={damaged}"], "damaged", 1)]  # a runtime failure, like any eval of it
    for overrides, message, code in cases:
        capsys.readouterr()
        assert main(["curate", str(world / "shards"), "--out", str(tmp_path / "out"), *overrides]) == code, overrides
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists()


def test_clip_score_through_the_cli_with_a_clip_run(caption_shards, tmp_path):
    pairs = caption_shards / "train"
    assert main(["pretrain", "clip", "--data", str(pairs), "--out", str(tmp_path / "clip"), *CLIP_ARGS,
                 "train.max_steps=2"]) == 0
    out = tmp_path / "curated"
    assert main(["curate", str(pairs), "--out", str(out), f"clip_score.model={tmp_path / 'clip'}",
                 "clip_score.top_fraction=0.5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["removed"] == {"low_clip_score": manifest["rows"] - manifest["written"]}
    assert manifest["written"] == -(-manifest["rows"] // 2)  # the best half, rounded up
    log = read_log(out / "curation.jsonl")
    assert all(isinstance(r["score"], float) and -1 <= r["score"] <= 1 for r in log)


def test_curate_on_two_processes_equals_one(world, tmp_path):
    """Under torchrun each process hashes its share of the fingerprint-less shards and extracts its
    share of the embeddings; the first curates: the same kept samples, the same log, one report."""
    import os
    import subprocess

    from test_distributed import LAUNCHERS

    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in sorted(world.joinpath("shards").glob("*.tar")):
        shutil.copyfile(tar, bare / tar.name)  # no manifest, no fingerprints: hashing is split too
    mae = tmp_path / "mae"
    shutil.copytree(world / "mae", mae)  # its own feature cache
    steps = ["near_dup.radius=2", f"semantic_dedup.encoder={mae}", "semantic_dedup.eps=1e-5",
             "semantic_dedup.clusters=2"]
    assert main(["curate", str(bare), "--out", str(tmp_path / "one"), *steps]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*LAUNCHERS["torchrun"], "curate", str(bare), "--out", str(tmp_path / "two"), *steps],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("curated 20 samples") == 1
    one, two = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two"))
    assert (one["written"], one["removed"]) == (two["written"], two["removed"])
    assert read_log(tmp_path / "one" / "curation.jsonl") == read_log(tmp_path / "two" / "curation.jsonl")
    assert not list(tmp_path.glob(".curate-fingerprints-*"))  # the hashing cache goes with success


def test_embedding_decontamination_removes_what_is_close_to_an_evaluation_image():
    from vitpipe.curate.embedded import run_embedding_decontaminate
    from vitpipe.curate.recipe import DecontaminateStep

    rng = np.random.default_rng(2)
    pool, tests = unit(rng.normal(size=(10, 16))), unit(rng.normal(size=(3, 16)))
    pool[4] = unit(tests[1:2] + 0.01 * rng.normal(size=(1, 16)))[0]  # an augmented copy of test image 1
    vectors = dict(zip([f"k{i}" for i in range(10)], pool))
    step = DecontaminateStep(against=["t"], encoder="x", min_embedding_cosine=0.99)
    removed = run_embedding_decontaminate(items_of(10), step, vectors, {"t": {f"t{i}": v for i, v in enumerate(tests)}})
    assert list(removed) == [4] and removed[4].duplicate_of == "t1" and removed[4].extra == {"against": "t", "by": "embedding"}


def test_decontaminate_with_an_encoder_through_the_cli(world, tmp_path):
    test = tmp_path / "test"
    (test / "imgs" / "a").mkdir(parents=True)
    for i in range(4):
        make_image(i, size=16).transpose(0).save(test / "imgs" / "a" / f"t{i}.png")  # mirrored: the hashes miss them
    ingest(str(test / "imgs"), test / "shards", IngestConfig(val_fraction=0.0), progress=False)
    out = tmp_path / "out"
    assert main(["curate", str(world / "shards"), "--out", str(out), f"decontaminate.against=[{test / 'shards'}]",
                 f"decontaminate.encoder={world / 'mae'}", "decontaminate.min_embedding_cosine=0.5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    log = read_log(out / "curation.jsonl")
    by_embedding = [r for r in log if r.get("by") == "embedding"]
    assert by_embedding and all(r["score"] >= 0.5 and r["against"] == str(test / "shards") for r in by_embedding)
    assert manifest["rows"] == manifest["written"] + sum(manifest["removed"].values())
