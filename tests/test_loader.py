"""The shard loader: exactly-once evaluation, fixed-length training epochs, corrupt samples, resume."""

import json
from pathlib import Path

import pytest
import torch

from conftest import encode_image, make_image
from vitpipe.config import ConfigError
from vitpipe.pipeline.loader import DataError, LoaderSpec, ReadTally, counted, make_loader
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.pipeline.tario import write_tar_atomic
from vitpipe.pipeline.transforms import TransformSpec

SHARD_SIZES = [7, 3, 5, 1, 4]  # five uneven shards, 20 samples


def write_shards(directory: Path, sizes=SHARD_SIZES, corrupt_every: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard, count in enumerate(sizes):
        samples = []
        for _ in range(count):
            image = encode_image(make_image(index, size=12))
            if corrupt_every and index % corrupt_every == 0:
                image = image[:40]
            samples.append({"__key__": f"s{index:04d}", "png": image, "cls": str(index % 3).encode()})
            index += 1
        write_tar_atomic(directory / f"{shard:05d}.tar", samples)
    (directory / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": n for i, n in enumerate(sizes)}))
    return directory


def eval_keys(directory, rank, world, workers, batch_size=3):
    spec = LoaderSpec(resolve_shards(directory), batch_size, TransformSpec("eval", 8), train=False,
                      fields=("image", "key"), rank=rank, world_size=world)
    _, loader = make_loader(spec, workers)
    return [k for batch in loader for k in batch["key"]]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (4, 2)])
def test_eval_mode_reads_each_sample_exactly_once(tmp_path, world, workers):
    directory = write_shards(tmp_path / "shards")
    keys = [k for rank in range(world) for k in eval_keys(directory, rank, world, workers)]
    assert sorted(keys) == [f"s{i:04d}" for i in range(20)]


def train_batches(directory, epoch=0, skip=0, workers=2, seed=0, rank=0, world=1, batch_size=4, fields=("image", "key")):
    spec = LoaderSpec(resolve_shards(directory), batch_size, TransformSpec("mae", 8), train=True, fields=fields,
                      seed=seed, shuffle_buffer=6, rank=rank, world_size=world)
    dataset, loader = make_loader(spec, workers)
    dataset.set_position(epoch, skip)
    return list(loader)


def test_training_epoch_has_fixed_length_and_is_deterministic(tmp_path):
    directory = write_shards(tmp_path / "shards")
    first = train_batches(directory)
    assert len(first) == 5 and all(b["image"].shape == (4, 3, 8, 8) for b in first)
    again = train_batches(directory)
    assert [b["key"] for b in first] == [b["key"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    other_epoch = train_batches(directory, epoch=1)
    assert [b["key"] for b in first] != [b["key"] for b in other_epoch]


def test_resume_position_gives_identical_batches(tmp_path):
    directory = write_shards(tmp_path / "shards")
    full = train_batches(directory)
    resumed = train_batches(directory, skip=3)
    assert len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_training_ranks_read_disjoint_samples(tmp_path):
    directory = write_shards(tmp_path / "shards", sizes=[5] * 8)
    keys = [set(k for b in train_batches(directory, rank=r, world=2, workers=1) for k in b["key"]) for r in range(2)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    directory = write_shards(tmp_path / "shards", sizes=[10, 10], corrupt_every=10)  # 2 of 20 corrupt
    spec = LoaderSpec(resolve_shards(directory), 4, TransformSpec("eval", 8), train=False, fields=("image", "key"))
    _, loader = make_loader(spec, 0)
    tally = ReadTally(20)
    batches = list(counted(loader, tally, "key"))
    assert sum(len(b["key"]) for b in batches) == 18 == tally.read
    assert sum(tally.skipped.values()) == 2 and tally.missing == 0


def test_error_rate_above_limit_aborts_training(tmp_path):
    directory = write_shards(tmp_path / "shards", sizes=[60, 60], corrupt_every=5)  # 20% corrupt
    spec = LoaderSpec(resolve_shards(directory), 4, TransformSpec("eval", 8), train=True, fields=("image",),
                      max_error_rate=0.05)
    _, loader = make_loader(spec, 0)
    with pytest.raises(DataError, match="failed to decode"):
        list(loader)


def test_truncated_tar_is_counted_not_fatal(tmp_path):
    directory = write_shards(tmp_path / "shards", sizes=[6, 6])
    shard = directory / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    spec = LoaderSpec(resolve_shards(directory), 100, TransformSpec("eval", 8), train=False, fields=("key",))
    _, loader = make_loader(spec, 0)
    tally = ReadTally(resolve_shards(directory).total)
    batches = list(counted(loader, tally, "key"))
    assert 6 <= sum(len(b["key"]) for b in batches) == tally.read < 12
    assert len(tally.shard_errors) == 1 and tally.missing == 12 - tally.read


def test_unlabelled_samples_are_counted_and_left_out_and_no_label_at_all_is_told_first(tmp_path):
    from vitpipe.pipeline.census import require

    directory = tmp_path / "nolabel"
    directory.mkdir()
    write_tar_atomic(directory / "00000.tar", [{"__key__": "a", "png": encode_image(make_image(1))},
                                               {"__key__": "b", "png": encode_image(make_image(2)), "cls": b"-1"},
                                               {"__key__": "c", "png": encode_image(make_image(3)), "cls": b"1"}])
    spec = LoaderSpec(resolve_shards(directory), 4, TransformSpec("eval", 8), train=False, fields=("image", "label"))
    _, loader = make_loader(spec, 0)
    batches = list(loader)
    assert [b["label"].tolist() for b in batches] == [[1]] and batches[0]["skipped"] == {"unlabelled": 2}
    require(resolve_shards(directory), "x", ("label",), "an eval")  # one label is enough to serve
    write_tar_atomic(directory / "00000.tar", [{"__key__": "a", "png": encode_image(make_image(1))}])
    with pytest.raises(ConfigError, match="1 of 1 samples have no label"):
        require(resolve_shards(directory), "x", ("label",), "an eval")


def test_resolve_shards_forms(tmp_path):
    directory = write_shards(tmp_path / "root" / "train")
    assert len(resolve_shards(tmp_path / "root").urls) == 5  # picks train/
    assert len(resolve_shards(str(directory / "{00000..00002}.tar")).urls) == 3
    assert resolve_shards(directory).total == 20
    with pytest.raises(ConfigError):
        resolve_shards(str(directory / "{00000..00009}.tar"))
    with pytest.raises(ConfigError):
        resolve_shards(tmp_path / "empty_dir_that_does_not_exist")


def test_label_subset_is_drawn_independently_of_the_val_split():
    """Ingest assigns val by the key's hash under the seed; the label subset used the same hash, so
    train keys (hash >= val_fraction) never fell in a subset smaller than val_fraction."""
    from vitpipe.pipeline.ingest import split_of_key
    from vitpipe.pipeline.loader import in_subset

    train = [k for k in (f"img_{i}" for i in range(20000)) if split_of_key(k, 0.3, seed=0) == "train"]
    for fraction in (0.1, 0.5):
        chosen = sum(in_subset(k, fraction, seed=0) for k in train) / len(train)
        assert abs(chosen - fraction) < 0.02, (fraction, chosen)


def cut_shard(shard: Path, keep: float) -> None:
    """Truncate a tar to ``keep`` of its bytes, as a copy cut short by a full disk would be."""
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_a_cut_shard_counts_its_lost_samples(tmp_path, workers):
    """A shard cut to a few of the samples sizes.json lists: those lost count against
    max_error_rate, so training stops instead of looping over the few left."""
    directory = write_shards(tmp_path / "shards", sizes=[60, 60])
    cut_shard(directory / "00001.tar", 0.1)
    spec = LoaderSpec(resolve_shards(directory), 4, TransformSpec("eval", 8), train=True, fields=("image",),
                      max_error_rate=0.05)
    _, loader = make_loader(spec, workers)
    lost = r"lost to damaged shards .*00001\.tar: .* of the 60 samples sizes\.json lists"
    with pytest.raises(Exception, match=lost):
        list(loader)


def test_a_resampled_stream_counts_a_damaged_shard_once_a_round(tmp_path):
    """Shards drawn with replacement: a shard losing 2.5% of the set drawn three times in one round
    is still 2.5% lost, not 7.5% (which stopped training over the 5% limit at random)."""
    directory = write_shards(tmp_path / "shards", sizes=[40] * 10)
    cut_shard(directory / "00003.tar", 0.7)  # 10 of its 40 lost: 2.5% of the 400
    spec = LoaderSpec(resolve_shards(directory), 8, TransformSpec("eval", 8), train=True, fields=("image",),
                      max_error_rate=0.05, resampled=True, samples_per_epoch=4000)
    _, loader = make_loader(spec, 0)
    assert sum(len(batch["image"]) for batch in loader) == 4000  # 10 rounds of 10 draws, none stopped


def test_a_damaged_shard_within_the_error_rate_trains_on_and_is_warned_once(tmp_path, capsys):
    """1 of 10 shards cut short loses under 5% of the samples: the run finishes (loader workers on)
    and says so once, not once per pass."""
    from test_models import TINY

    from vitpipe.cli import main

    directory = write_shards(tmp_path / "shards", sizes=[40] * 10)
    cut_shard(directory / "00003.tar", 0.7)
    args = ["pretrain", "mae", "--data", str(directory), "--out", str(tmp_path / "run"), *TINY,
            "train.batch_size=8", "train.max_steps=60", "data.num_workers=2", "data.shuffle_buffer=0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("warning: damaged shard") == 1 and "00003.tar" in err
