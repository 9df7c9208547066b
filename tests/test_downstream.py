"""Downstream evaluation against brute-force references, and the eval CLI end to end."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from vitpipe.cli import main
from vitpipe.downstream.probe import ProbeSettings, linear_probe, train_heads
from vitpipe.downstream.retrieval import knn_classify


def separable(n=600, dim=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 4
    labels = rng.integers(0, classes, size=n)
    return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_linear_probe_separable_reaches_100():
    x, y = separable(n=800, seed=0)
    result = linear_probe(x[:600], y[:600], x[600:], y[600:], ProbeSettings(epochs=10, batch_size=64))
    assert result.top1 >= 0.99 and result.top5 == 1.0
    assert len(result.sweep) == 21


def test_sweep_in_one_pass_equals_each_head_alone():
    x, y = separable(n=300)
    lrs, wds = [0.01, 0.1, 1.0], [0.0, 1e-3, 1e-4]
    together = train_heads(x, y, 4, lrs, wds, epochs=3, batch_size=32, seed=7)
    for index, (lr, wd) in enumerate(zip(lrs, wds)):
        alone = train_heads(x, y, 4, [lr], [wd], epochs=3, batch_size=32, seed=7)
        assert torch.allclose(alone.head(0)[0], together.head(index)[0], atol=1e-6)
        assert torch.allclose(alone.head(0)[1], together.head(index)[1], atol=1e-6)
    assert not torch.allclose(together.head(0)[0], together.head(2)[0])


def test_heads_train_exactly_like_torch_sgd():
    """The hand-applied update is torch.optim.SGD(momentum=0.9, weight_decay) under a cosine LambdaLR."""
    import math
    import torch.nn.functional as F

    x, y = separable(n=200)
    lr, wd, epochs, batch = 0.3, 1e-3, 2, 32
    ours = train_heads(x, y, 4, [lr], [wd], epochs=epochs, batch_size=batch, seed=5)
    norm = torch.nn.BatchNorm1d(16, affine=False)
    weight, bias = torch.zeros(16, 4, requires_grad=True), torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9, weight_decay=wd)
    total = epochs * (len(x) // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    rng = torch.Generator().manual_seed(5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=rng)
        for step in range(len(x) // batch):
            index = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(norm(xt[index]) @ weight + bias, yt[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    assert torch.allclose(ours.head(0)[0], weight, atol=1e-5) and torch.allclose(ours.head(0)[1], bias, atol=1e-5)


def test_fitted_head_folds_batchnorm_exactly():
    from vitpipe.downstream.probe import fit_linear_head

    x, y = separable(n=400)
    x = x * 3 + 5  # the fold has to undo a real mean and scale
    settings = ProbeSettings(lrs=(0.1,), weight_decays=(0.0,), epochs=3, batch_size=32, val_fraction=0.1, folds=1)
    linear, info = fit_linear_head(x, y, 4, settings)
    from vitpipe.downstream.probe import split_train_val
    fit_idx, _ = split_train_val(len(x), 0.1, 0)
    heads = train_heads(x[fit_idx], y[fit_idx], 4, [0.1], [0.0], 3, 32, 0)
    with torch.no_grad():
        expected = heads(torch.from_numpy(x))[0][0]
        assert torch.allclose(linear(torch.from_numpy(x)), expected, atol=1e-4)
    assert info["val_top1"] >= 0.95


@pytest.fixture
def tiny_run(tmp_path, tiny_labelled_shards):
    run = tmp_path / "run"
    args = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
            "mae.decoder_depth=1", "train.batch_size=8", "train.max_steps=3", "data.num_workers=0",
            "train.tensorboard=false"]
    assert main(["pretrain", "mae", "--data", str(tiny_labelled_shards / "train"), "--out", str(run), *args]) == 0
    return run


@pytest.fixture
def tiny_labelled_shards(tmp_path):
    from conftest import write_image_folder
    from vitpipe.config import IngestConfig
    from vitpipe.pipeline.ingest import ingest

    folder = write_image_folder(tmp_path / "imgs", per_class=20, classes=("a", "b", "c"))
    ingest(str(folder), tmp_path / "shards", IngestConfig(shard_size=16, val_fraction=0.3, image_size=16),
           progress=False)
    return tmp_path / "shards"


def test_eval_cli_with_baselines(tiny_run, tiny_labelled_shards, tmp_path, capsys):
    train, test = str(tiny_labelled_shards / "train"), str(tiny_labelled_shards / "val")
    common = ["--train", train, "--test", test, "--workers", "0"]
    assert main(["eval", "linear-probe", str(tiny_run), *common, "--epochs", "2"]) == 0
    assert main(["eval", "linear-probe", str(tiny_run), *common, "--epochs", "2", "--init", "random"]) == 0
    assert main(["eval", "linear-probe", str(tiny_run), *common, "--epochs", "2", "--pixels"]) == 0
    assert main(["eval", "linear-probe", str(tiny_run), *common, "--epochs", "2", "--layers", "0,1", "--concat"]) == 0
    assert main(["eval", "knn", str(tiny_run), *common]) == 0
    assert main(["eval", "knn", str(tiny_run), *common, "--pixels"]) == 0
    names = sorted(p.name for p in (tiny_run / "eval").glob("*.json"))
    assert names == ["knn.json", "knn.pixels.json", "linear-probe.json", "linear-probe.pixels.json",
                     "linear-probe.random.json"]
    result = json.loads((tiny_run / "eval" / "linear-probe.json").read_text())
    assert 0 <= result["top1"] <= 1 and set(result["per_layer"]) == {"block0", "block1", "block0+block1"}
    # a small train split: 3 folds judged the pick on every train image (auto), and the result says so
    assert (result["folds"], result["judged"]) == (3, result["train_samples"])
    assert main(["eval", "linear-probe", str(tiny_run), *common, "--epochs", "2", "--folds", "-1"]) == 2
    assert main(["eval", "linear-probe", str(tiny_run), *common, "--epochs", "2", "--folds", "1"]) == 0
    one_split = json.loads((tiny_run / "eval" / "linear-probe.json").read_text())
    assert one_split["folds"] == 1 and one_split["judged"] == round(one_split["train_samples"] * 0.1)
    assert result["provenance"]["data"]["train"]["manifest_sha256"]
    assert result["provenance"]["encoder"].endswith("encoder.safetensors")
    assert list((tiny_run / "eval" / "cache").glob("*/features.npy"))

    query = next((tmp_path / "imgs" / "a").glob("*.png"))
    assert main(["eval", "retrieval", str(tiny_run), "--index", train, "--workers", "0"]) == 0
    retrieval = json.loads((tiny_run / "eval" / "retrieval.json").read_text())
    assert set(retrieval["recall"]) == {"1", "5", "10"}
    capsys.readouterr()
    assert main(["eval", "retrieval", str(tiny_run), "--index", train, "--query", str(query), "--top-k", "3",
                 "--workers", "0"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l[:1].isdigit()]
    assert len(lines) == 3 and lines[0].split("\t")[1].startswith("a_")
    assert list((tiny_run / "eval" / "retrieval").glob("query_*.png"))
    # a checkpoint directory works as well as a run directory, and is what the result names
    checkpoint = sorted((tiny_run / "checkpoints").iterdir())[-1]
    assert main(["eval", "knn", str(checkpoint), *common]) == 0
    result = json.loads((tiny_run / "eval" / "knn.json").read_text())
    assert result["provenance"]["encoder"] == str(checkpoint / "model.safetensors")


def test_knn_on_a_probed_layer_reads_the_probe_cache(tiny_run, tiny_labelled_shards, monkeypatch):
    from vitpipe.downstream.features import EncoderSource, extract

    train, test = str(tiny_labelled_shards / "train"), str(tiny_labelled_shards / "val")
    common = ["--train", train, "--test", test, "--workers", "0", "--precision", "fp32"]  # compared with fp32 below
    assert main(["eval", "linear-probe", str(tiny_run), *common, "--epochs", "1", "--layers", "0,1"]) == 0

    def no_encoder(self):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(EncoderSource, "build", no_encoder)
    assert main(["eval", "knn", str(tiny_run), *common]) == 0  # the output is block 1 of 2: cached too
    assert main(["eval", "knn", str(tiny_run), *common, "--layer", "0"]) == 0
    result = json.loads((tiny_run / "eval" / "knn.json").read_text())
    assert result["layer"] == "block0"
    monkeypatch.undo()
    source = EncoderSource.resolve(tiny_run)
    fresh_train = extract(source, train, layers=[0], num_workers=0)
    fresh_test = extract(source, test, layers=[0], num_workers=0)
    expected = knn_classify(fresh_train.features["block0"], fresh_train.labels, fresh_test.features["block0"],
                            fresh_test.labels)
    assert result["per_k"] == {str(k): v for k, v in expected.items()}


def test_eval_bad_inputs_exit_2(tiny_run, tiny_labelled_shards, tmp_path, capsys):
    from vitpipe.pipeline.tario import write_tar_atomic
    from conftest import encode_image, make_image

    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    write_tar_atomic(unlabeled / "00000.tar", [{"__key__": "x", "png": encode_image(make_image(1, size=16))}])
    train = str(tiny_labelled_shards / "train")
    cases = [
        (["eval", "knn", str(tmp_path / "missing"), "--train", train, "--test", train], "neither a run"),
        (["eval", "linear-probe", str(tiny_run), "--train", str(unlabeled), "--test", train, "--workers", "0",
          "--max-contamination", "1"], "no label"),
        (["eval", "knn", str(tiny_run), "--train", train, "--test", train, "--pool", "max"], "--pool"),
        (["eval", "retrieval", str(tiny_run), "--index", train, "--index-type", "lsh"], "index-type"),
        # refused before any feature is extracted: faiss would fail only at search time, T <= 0 votes nonsense
        (["eval", "knn", str(tiny_run), "--train", train, "--test", train, "--index-type", "ivf", "--nprobe", "0"],
         "--nprobe must be >= 1"),
        (["eval", "retrieval", str(tiny_run), "--index", train, "--index-type", "hnsw", "--hnsw-m", "0"],
         "--hnsw-m must be >= 2"),
        (["eval", "knn", str(tiny_run), "--train", train, "--test", train, "--layer", "99", "--workers", "0",
          "--max-contamination", "1"], "block(s) [99] out of range: the encoder has blocks 0..1"),
        (["eval", "linear-probe", str(tiny_run), "--train", train, "--test", train, "--epochs", "0"],
         "probe epochs and batch size must be >= 1"),
        (["eval", "knn", str(tiny_run), "--train", train, "--test", train, "--temperature", "0"],
         "--temperature must be > 0"),
        (["eval", "knn", str(tiny_run), "--train", train, "--test", train, "--temperature", "-0.1"],
         "--temperature must be > 0"),
        (["eval", "linear-probe", str(tiny_run), "--train", train, "--test", train, "--layers", "0,5",
          "--workers", "0", "--max-contamination", "1"], "blocks 0..1"),
        # -1 passed every eval that lost nothing; 2 let a whole lost set by
        *[([*command, "--max-skipped", value], "--max-skipped must be a fraction in [0, 1]")
          for command in (["eval", "knn", str(tiny_run), "--train", train, "--test", train],
                          ["eval", "linear-probe", str(tiny_run), "--train", train, "--test", train],
                          ["eval", "retrieval", str(tiny_run), "--index", train],
                          ["eval", "finetune", str(tiny_run), "--train", train, "--test", train])
          for value in ("-1", "2")],
        (["eval", "linear-probe", str(tiny_run), "--train", train, "--test", train, "--layers", " , "],
         "--layers: expected comma-separated block numbers"),
        # --top-k 0 ended in an AssertionError after the index was built; a folder was "not found"
        (["eval", "retrieval", str(tiny_run), "--index", train, "--query", str(tmp_path / "x.png"), "--top-k", "0"],
         "--top-k must be >= 1"),
        (["eval", "retrieval", str(tiny_run), "--index", train, "--query", str(tmp_path)], "is a folder"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_freezing_really_freezes():
    from vitpipe.config import ModelConfig
    from vitpipe.ssl.objectives.classify.objective import Classifier, FinetuneConfig
    from vitpipe.ssl.engine.optim import param_groups
    from vitpipe.ssl.vit import VisionTransformer

    torch.manual_seed(0)
    encoder = VisionTransformer(ModelConfig(patch_size=4, embed_dim=64, depth=3, num_heads=2), image_size=16)
    model = Classifier(encoder, FinetuneConfig(num_classes=3, freeze_blocks=2, freeze_patch_embed=True))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith(("backbone.patch_embed", "backbone.blocks.0.", "backbone.blocks.1.", "backbone.cls_token"))}
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, 1e-2))
    for _ in range(3):
        out = model({"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([0, 1, 2, 0])})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert params[name].grad is None and torch.equal(params[name], before), name
    assert not torch.equal(params["backbone.blocks.2.attn.qkv.weight"], torch.zeros(1))
    assert params["backbone.blocks.2.attn.qkv.weight"].grad is not None
    scales = {model.lr_scale(n) for n, p in model.named_parameters() if p.requires_grad}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.75 ** 1)  # block 2 of 3


def test_finetune_cli_trained_and_scratch(tiny_run, tiny_labelled_shards):
    train, test = str(tiny_labelled_shards / "train"), str(tiny_labelled_shards / "val")
    common = ["--train", train, "--test", test, "train.max_steps=4", "train.batch_size=8", "train.tensorboard=false",
              "data.num_workers=0"]
    assert main(["eval", "finetune", str(tiny_run), *common, "data.image_size=24"]) == 0
    assert main(["eval", "finetune", str(tiny_run), *common, "--init", "random", "data.subset_fraction=0.5"]) == 0
    result = json.loads((tiny_run / "eval" / "finetune.json").read_text())
    assert 0 <= result["top1"] <= 1 and result["steps"] == 4 and result["test_samples"] > 0
    assert result["finetune_config"]["finetune"]["layer_decay"] == 0.75  # the recipe, from a pretrained encoder
    assert result["finetune_config"]["finetune"]["num_classes"] == 3  # from the manifest's label map
    scratch = json.loads((tiny_run / "eval" / "finetune-labels0.5.random.json").read_text())
    assert scratch["baseline"] == "random-init" and scratch["label_fraction"] == 0.5
    # rerunning resumes the finished run instead of training again
    assert main(["eval", "finetune", str(tiny_run), *common, "data.image_size=24"]) == 0
    runs = sorted(p.name for p in (tiny_run / "finetune").iterdir())
    assert len(runs) == 2  # the rerun reused its directory
    # other settings never resume the finished run of different ones
    assert main(["eval", "finetune", str(tiny_run), *common, "data.image_size=24", "optim.lr=3e-4"]) == 0
    assert len(list((tiny_run / "finetune").iterdir())) == 3
    assert json.loads((tiny_run / "eval" / "finetune.json").read_text())["finetune_config"]["optim"]["lr"] == 3e-4
    assert main(["eval", "finetune", str(tiny_run), *common, "--probe-init", "--init", "random"]) == 0
    lpft = json.loads((tiny_run / "eval" / "finetune.random.json").read_text())
    assert lpft["probe_init"]["samples"] > 0 and lpft["finetune_config"]["finetune"]["layer_decay"] == 1.0
    assert main(["eval", "finetune", str(tiny_run), *common, "finetune.nope=1"]) == 2


def test_finetune_probe_init_starts_from_the_subset_probe(tiny_run, tiny_labelled_shards):
    from vitpipe.config import ConfigError
    from vitpipe.downstream.features import EncoderSource, extract
    from vitpipe.downstream.finetune import classifier_builder, finetune_config, probe_head
    from vitpipe.pipeline.loader import in_subset

    train = str(tiny_labelled_shards / "train")
    for kind in ("trained", "random"):
        source = EncoderSource.resolve(tiny_run, kind)
        config = finetune_config(source, train, ["data.subset_fraction=0.5", "train.max_steps=2",
                                                 "train.batch_size=4", "train.seed=3", "data.num_workers=0"])
        head, info = probe_head(source, train, config)
        features = extract(EncoderSource.resolve(tiny_run, kind, seed=3), train, num_workers=0)
        keep = [in_subset(k, 0.5, 3) for k in features.keys]
        assert info["samples"] == sum(keep) and 0 < sum(keep) < len(keep)
        # the classifier starts exactly where the probe ends: same encoder, the folded head on top
        model = classifier_builder(source, head)(config, {}).eval()
        images = torch.randn(3, 3, 16, 16)
        with torch.no_grad():
            frozen = EncoderSource.resolve(tiny_run, kind, seed=3).build()
            assert torch.allclose(model.logits(images), head(frozen(images)), atol=1e-5)
    assert finetune_config(source, train, ["data.crop_scale_min=0.5"]).data.crop_scale_min == 0.5
    from vitpipe.pipeline.transforms import TransformSpec, build_transform
    crop = build_transform(TransformSpec("finetune", 16, crop_scale_min=0.5)).transforms[0].crop
    assert crop.scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="pretraining resolution"):
        probe_head(source, train, finetune_config(source, train, ["data.image_size=24"]))


def test_an_indexed_image_queried_by_its_own_file_is_found_first(tmp_path, capsys):
    """The query goes through the index's own ingest-time processing (here: letterboxed to 16 px on
    grey), not the eval resize-and-centre-crop, so non-square images find themselves at rank 1."""
    import numpy as np
    from PIL import Image

    from vitpipe.config import IngestConfig, save_config
    from vitpipe.pipeline.ingest import ingest
    from vitpipe.ssl import registry

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = [(40, 24), (24, 40), (30, 18), (18, 30), (32, 32), (50, 20)]
    for index, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    ingest(str(folder), tmp_path / "shards", IngestConfig(image_size=16, resize_mode="border", background="gray"),
           progress=False)
    run = tmp_path / "run"
    save_config(registry.pretrain_config("mae", None, ["data.image_size=16", "model.size=micro"]), run / "config.yaml")
    for index in range(len(sizes)):
        capsys.readouterr()
        assert main(["eval", "retrieval", str(run), "--index", str(tmp_path / "shards"), "--pixels", "--workers", "0",
                     "--query", str(folder / f"p{index}.png"), "--top-k", "2"]) == 0
        hits = [line.split("\t") for line in capsys.readouterr().out.splitlines() if line.count("\t") == 2]
        assert hits[0][1] == f"p{index}" and float(hits[0][2]) > 0.9999, (index, hits)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_extraction_on_two_processes_equals_one(tiny_run, tiny_labelled_shards, tmp_path, launcher):
    """Under a launcher each process reads half the shards into numbered parts; the first merges
    them in key order: the same features, labels, keys and read counts as one process, and the
    same k-NN result, printed once."""
    import shutil

    from test_distributed import LAUNCHERS

    train, test = str(tiny_labelled_shards / "train"), str(tiny_labelled_shards / "val")
    single, multi = tmp_path / "single", tmp_path / "multi"
    shutil.copytree(tiny_run, single)
    shutil.copytree(tiny_run, multi)
    # one precision for both (auto measures, and a loaded machine may measure otherwise each time)
    assert main(["eval", "knn", str(single), "--train", train, "--test", test, "--workers", "0",
                 "--precision", "fp32"]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*LAUNCHERS[launcher], "eval", "knn", str(multi), "--train", train, "--test", test,
                             "--workers", "1", "--precision", "fp32"], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("k-NN") == 1  # the first process reports; the other only extracted
    stores, other = ([p.name for p in sorted((run / "eval" / "cache").iterdir()) if p.suffix != ".lock" and p.name != "precision.json"] for run in (single, multi))
    assert stores == other and len(stores) == 2  # no parts left (the cache's lock files aside)
    for name in stores:
        one, two = single / "eval" / "cache" / name, multi / "eval" / "cache" / name
        assert json.loads((one / "index.json").read_text()) == json.loads((two / "index.json").read_text())
        assert np.array_equal(np.load(one / "labels.npy"), np.load(two / "labels.npy"))
        np.testing.assert_allclose(np.load(one / "features.npy"), np.load(two / "features.npy"), atol=1e-5)
    knn = [json.loads((run / "eval" / "knn.json").read_text()) for run in (single, multi)]
    assert knn[0]["per_k"] == knn[1]["per_k"] and knn[0]["samples"] == knn[1]["samples"]


def test_feature_parts_merge_in_key_order_and_a_killed_runs_parts_are_dropped(tmp_path, monkeypatch):
    from vitpipe.downstream import featurestore
    from vitpipe.pipeline.loader import ReadTally

    monkeypatch.setattr(featurestore, "CHUNK_ROWS", 8)  # several numbered parts per process
    parts, store = tmp_path / "parts", tmp_path / "store"
    parts.mkdir()
    np.save(parts / "layer0.r0001.00009.npy", np.ones((3, 4), np.float32))  # left by a killed run
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in rng.permutation(50)]
    features, labels = rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 5, size=50)
    for rank in (0, 1):
        writer = featurestore.PartWriter(parts, rank, ["last"])
        rows = list(range(rank, 50, 2))
        for start in range(0, len(rows), 5):
            batch = rows[start:start + 5]
            writer.add({"last": features[batch]}, [keys[i] for i in batch], labels[batch])
        writer.close(ReadTally(None, read=len(rows)), with_labels=True)
    tally = featurestore.merge(parts, 2, {"last": store}, expected=50)
    merged, merged_labels, merged_keys, stored_tally = featurestore.load(store)
    order = np.argsort(keys)
    assert merged_keys == sorted(keys) and np.array_equal(merged, features[order])
    assert np.array_equal(merged_labels, labels[order]) and not parts.exists()
    assert tally.read == stored_tally.read == 50 and stored_tally.lost == 0
