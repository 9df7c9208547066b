"""The contamination figure: every eval counts test images with a near-copy (re-encoded, brightened)
in the run's pretraining shards or in its own training shards, from fingerprints kept beside the
shards, and refuses to report a number above --max-contamination."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from test_trainer import RUN_ARGS
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.downstream.contamination import measure
from vitpipe.pipeline import fingerprints
from vitpipe.pipeline.ingest import ingest
from vitpipe.pipeline.shardset import resolve_shards


def picture(index: int, size: int = 32) -> Image.Image:
    """A smooth, photo-like image (bicubic-upsampled 4x4 colours), distinct per index."""
    rng = np.random.default_rng(10_000 + index)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    return small.resize((size, size), Image.BICUBIC)


def jpeg(image: Image.Image, quality: int = 60) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def folder_of(root, images: dict[str, list[Image.Image]]):
    for label, pictures in images.items():
        (root / label).mkdir(parents=True)
        for i, image in enumerate(pictures):
            image.save(root / label / f"{i}.png")
    return root


def shards_of(tmp_path, name: str, images: dict[str, list[Image.Image]]):
    folder_of(tmp_path / f"{name}-images", images)
    ingest(str(tmp_path / f"{name}-images"), tmp_path / name, IngestConfig(shard_size=10, val_fraction=0.0),
           progress=False)
    return resolve_shards(str(tmp_path / name)).directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """test: 20 pictures; train: 40 others plus 3 re-encoded (JPEG q60) and 1 brightened copy of test
    pictures 0-3; pretrain: 40 others; leaky pretrain: the same plus 2 JPEG copies of test pictures 4-5."""
    root = tmp_path_factory.mktemp("contamination")
    test = shards_of(root, "test", {"a": [picture(i) for i in range(10)], "b": [picture(i) for i in range(10, 20)]})
    copies = [jpeg(picture(0)), jpeg(picture(1)), jpeg(picture(2)), ImageEnhance.Brightness(picture(3)).enhance(1.1)]
    train = shards_of(root, "train", {"a": [picture(i) for i in range(100, 120)] + copies[:2],
                                      "b": [picture(i) for i in range(120, 140)] + copies[2:]})
    clean = shards_of(root, "clean", {"a": [picture(i) for i in range(200, 220)], "b": [picture(i) for i in range(220, 240)]})
    pretrain = shards_of(root, "pretrain", {"x": [picture(i) for i in range(300, 340)]})
    leaky = shards_of(root, "leaky", {"x": [picture(i) for i in range(300, 340)] + [jpeg(picture(4)), jpeg(picture(5))]})
    for name, data in (("run", pretrain), ("leaky-run", leaky)):
        assert main(["pretrain", "mae", "--data", str(data), "--out", str(root / name), *RUN_ARGS,
                     "train.max_steps=1"]) == 0
    return {"root": root, "test": test, "train": train, "clean": clean, "pretrain": pretrain, "leaky": leaky}


def test_ingest_keeps_each_shards_fingerprints_beside_it(world):
    for tar in sorted(world["test"].glob("*.tar")):
        stored = fingerprints.read_sidecar(tar, None)
        with tarfile.open(tar) as handle:
            keys = list(dict.fromkeys(member.name.split(".")[0] for member in handle.getmembers()))
        assert stored is not None and stored.keys == keys and stored.valid.all()


def test_re_encoded_and_brightened_copies_are_counted_and_distinct_pictures_are_not(world, tmp_path):
    found = measure(str(world["test"]), {"train": str(world["train"]), "clean": str(world["clean"])}, tmp_path)
    assert (found.test_images, found.contaminated) == (20, 4)
    assert found.by_reference == {"train": 4, "clean": 0}
    assert found.hashed == 0  # every set had its fingerprints stored: no image decoded


def test_an_eval_above_the_limit_is_one_line_and_exit_2(world, capsys):
    code = main(["eval", "knn", str(world["root"] / "run"), "--train", str(world["train"]), "--test", str(world["test"])])
    err = capsys.readouterr().err
    assert code == 2
    assert "4 of 20 test images (20.00%)" in err and "--max-contamination" in err and "Traceback" not in err


def test_the_same_shards_as_train_and_test_are_refused(world, capsys):
    code = main(["eval", "linear-probe", str(world["root"] / "run"), "--train", str(world["test"]),
                 "--test", str(world["test"]), "--epochs", "1"])
    assert code == 2 and "20 of 20 test images" in capsys.readouterr().err


def test_the_figure_is_recorded_and_printed_beside_the_number(world, capsys):
    assert main(["eval", "knn", str(world["root"] / "run"), "--train", str(world["train"]), "--test", str(world["test"]),
                 "--max-contamination", "0.25"]) == 0
    assert "contamination" in capsys.readouterr().out
    result = json.loads((world["root"] / "run" / "eval" / "knn.json").read_text())
    assert result["contamination"]["contaminated"] == 4 and result["contamination"]["fraction"] == 0.2
    assert result["contamination"]["by_reference"] == {"pretraining": 0, "train": 4}
    examples = result["contamination"]["examples"]
    assert len(examples) == 4 and all(e["reference"] == "train" and e["bits"] <= 12 for e in examples)


def test_pretraining_copies_count_for_the_trained_encoder_not_for_its_baselines(world):
    run = world["root"] / "leaky-run"
    assert main(["eval", "knn", str(run), "--train", str(world["clean"]), "--test", str(world["test"])]) == 2
    assert main(["eval", "knn", str(run), "--train", str(world["clean"]), "--test", str(world["test"]),
                 "--max-contamination", "0.1"]) == 0
    trained = json.loads((run / "eval" / "knn.json").read_text())["contamination"]
    assert trained["by_reference"] == {"pretraining": 2, "train": 0} and trained["fraction"] == 0.1
    assert main(["eval", "knn", str(run), "--init", "random", "--train", str(world["clean"]),
                 "--test", str(world["test"])]) == 0
    random = json.loads((run / "eval" / "knn.random.json").read_text())["contamination"]
    assert random["by_reference"] == {"train": 0}


def test_shards_without_stored_fingerprints_are_hashed_once_then_read(world, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for index, tar in enumerate(sorted(world["train"].glob("*.tar"))):
        shutil.copyfile(tar, bare / f"foreign-{index}.tar")  # no manifest, no fingerprints
    cache = tmp_path / "cache"
    first = measure(str(world["test"]), {"train": str(bare)}, cache)
    again = measure(str(world["test"]), {"train": str(bare)}, cache)
    assert first.contaminated == again.contaminated == 4
    assert first.hashed == 44 and again.hashed == 0


def test_a_stale_sidecar_is_not_trusted(world, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(world["clean"], copy)
    victim = sorted(copy.glob("*.tar"))[0]
    other = sorted(world["train"].glob("*.tar"))
    shutil.copyfile(next(t for t in other if t.stat().st_size != victim.stat().st_size), victim)  # new tar, old sidecar
    assert fingerprints.read_sidecar(victim, None) is None
    lookup = fingerprints.of_shards(resolve_shards(str(copy)), None)
    assert lookup.stored == 30 and lookup.hashed == 4  # the three untouched shards read; the replacement (4 samples) hashed


def test_near_pairs_equals_the_rule_checked_pair_by_pair():
    """Every (query, reference) pair, brute force: pHash and dHash within the radius and the
    mean-removed thumbnails' cosine at least the threshold (flat thumbnails: cosine 0)."""
    rng = np.random.default_rng(0)
    base_hashes = rng.integers(0, 256, (300, 2, 8), dtype=np.uint8)
    base_thumbs = rng.integers(0, 256, (300, 256), dtype=np.uint8)
    base_thumbs[:5] = 77  # flat
    pick = rng.integers(0, 300, 200)
    flips = rng.random((200, 2, 64)) < 0.08
    query_hashes = np.packbits(np.unpackbits(base_hashes[pick], axis=2) ^ flips, axis=2)
    noise = rng.normal(0, rng.choice([2.0, 40.0], (200, 1)), (200, 256))
    query_thumbs = np.clip(base_thumbs[pick] + noise, 0, 255).astype(np.uint8)
    query_thumbs[:3] = base_thumbs[:3]
    got = fingerprints.near_pairs((query_hashes, query_thumbs), (base_hashes, base_thumbs), 8, 0.99)

    def centred(t):
        t = t.astype(np.float64) - t.mean()
        return t / np.linalg.norm(t) if np.linalg.norm(t) else t
    bits = np.unpackbits(query_hashes[:, None] ^ base_hashes[None], axis=3).sum(axis=3)  # [Q, B, 2]
    want = [(q, b, int(bits[q, b].sum())) for q in range(200) for b in range(300)
            if bits[q, b].max() <= 8 and centred(query_thumbs[q]) @ centred(base_thumbs[b]) >= 0.99]
    assert 20 < len(want) < 200  # both outcomes exercised
    assert sorted(zip(*(part.tolist() for part in got))) == sorted(want)
