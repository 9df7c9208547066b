"""iGPT: palette, causal masking, BERT masks, completion, and the commands around them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitpipe.cli import main
from vitpipe.ssl import registry
from vitpipe.ssl.objectives.igpt.objective import PALETTE, dequantize, fit_palette, load_palette, palette_bytes, quantize

ARGS = ["model.size=micro", "model.depth=3", "data.image_size=16", "igpt.resolution=8", "igpt.palette_size=8",
        "train.batch_size=8", "train.log_every=1", "data.num_workers=0", "data.shuffle_buffer=10",
        "train.tensorboard=false", "igpt.palette_images=64"]


def synthetic_read(fields, limit):
    generator = torch.Generator().manual_seed(0)
    for _ in range(0, limit, 16):
        yield {"image": torch.rand(16, 3, 16, 16, generator=generator) * 2 - 1}


def tiny_igpt(*overrides: str):
    config = registry.pretrain_config("igpt", None, [*ARGS, *overrides])
    torch.manual_seed(0)
    return registry.build_objective(config, registry.get("igpt").fit_artifacts(config, synthetic_read))


def test_palette_is_deterministic_under_a_seed_and_round_trips():
    pixels = np.random.default_rng(0).uniform(-1, 1, size=(5000, 3)).astype(np.float32)
    first, again, other = fit_palette(pixels, 16, seed=1), fit_palette(pixels, 16, seed=1), fit_palette(pixels, 16, seed=2)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert (np.diff(first.sum(axis=1)) >= 0).all()  # ordered by brightness
    palette = torch.from_numpy(first)
    indices = torch.arange(16)
    assert torch.equal(quantize(dequantize(indices, palette), palette), indices)
    near = dequantize(indices, palette) + 1e-3
    assert torch.equal(quantize(near, palette), indices)
    assert torch.equal(load_palette(palette_bytes(first, "test"), 3, "p"), palette)


def test_a_palette_for_other_channels_is_refused():
    grey = palette_bytes(np.linspace(-1, 1, 4, dtype=np.float32)[:, None], "grey")
    with pytest.raises(Exception, match="1-channel colours, but this run's images have 3"):
        load_palette(grey, 3, "grey.json")


def test_changing_token_t_never_changes_logits_before_t():
    model = tiny_igpt().eval()
    tokens = torch.randint(0, 8, (2, 64))
    changed = tokens.clone()
    changed[:, 40] = (tokens[:, 40] + 1) % 8
    with torch.no_grad():
        before, after = model.logits(tokens), model.logits(changed)
    assert torch.allclose(before[:, :40], after[:, :40], atol=1e-6)
    assert not torch.allclose(before[:, 40:], after[:, 40:])


def test_bert_masks_an_exact_fraction_and_predicts_only_those():
    model = tiny_igpt("igpt.task=bert")
    batch = model.batch_hook()({"image": torch.rand(4, 3, 16, 16) * 2 - 1}, torch.Generator().manual_seed(0))
    assert batch["pixels"].shape == (4, 64) and batch["masked"].sum(dim=1).tolist() == [10] * 4  # round(64 * 0.15)
    assert model(batch).loss.isfinite()
    with torch.no_grad():  # bidirectional: a later token changes earlier logits
        tokens = batch["pixels"].clone()
        changed = tokens.clone()
        changed[:, 40] = (tokens[:, 40] + 1) % 8
        assert not torch.allclose(model.logits(tokens)[:, :40], model.logits(changed)[:, :40])


def test_completion_keeps_the_prompt_and_is_deterministic_under_a_seed():
    model = tiny_igpt().eval()
    pixels = torch.randint(0, 8, (3, 64))
    first = model.complete(pixels, 32, generator=torch.Generator().manual_seed(0))
    again = model.complete(pixels, 32, generator=torch.Generator().manual_seed(0))
    greedy = model.complete(pixels, 32, top_k=1, generator=torch.Generator().manual_seed(5))
    assert first.shape == (3, 64) and torch.equal(first[:, :32], pixels[:, :32]) and torch.equal(first, again)
    assert ((first >= 0) & (first < 8)).all()
    assert torch.equal(greedy, model.complete(pixels, 32, top_k=1, generator=torch.Generator().manual_seed(6)))


def test_memory_budget_refuses_with_the_numbers(tmp_path, tiny_shards, capsys):
    code = main(["pretrain", "igpt", "--data", str(tiny_shards), "--out", str(tmp_path / "run"), *ARGS,
                 "igpt.resolution=16", "train.batch_size=512", "igpt.memory_budget_gb=0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "train.batch_size=512 x 256 tokens (16x16)" in err[0] and "0.0 GiB budget" in err[0]


def test_igpt_end_to_end_through_the_cli(labelled_shards, tmp_path, capsys):
    train, test = labelled_shards / "train", labelled_shards / "val"
    run = tmp_path / "run"
    assert main(["pretrain", "igpt", "--data", str(train), "--out", str(run), *ARGS, "train.max_steps=4"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert set(info["artifacts"]) == {PALETTE}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bits_per_dim"] == pytest.approx(r["loss"] / np.log(2), rel=1e-5) for r in records)
    common = ["--test", str(test), "--workers", "0"]
    assert main(["eval", "linear-probe", str(run), "--train", str(train), *common, "--layers", "all",
                 "--epochs", "2", "--lrs", "0.1", "--wds", "0"]) == 0
    probe = json.loads((run / "eval" / "linear-probe.json").read_text())
    assert sorted(probe["per_layer"]) == ["block0", "block1", "block2"]
    assert main(["eval", "knn", str(run), "--train", str(train), *common]) == 0
    assert main(["eval", "bits-per-dim", str(run), *common]) == 0
    bits = json.loads((run / "eval" / "bits-per-dim.json").read_text())
    assert 0 < bits["bits_per_dim"] < 10 and bits["test_samples"] == bits["samples"]["test"]["read"]
    assert main(["sample", str(run), "--prompt", str(test), "--n", "3", "--out", str(tmp_path / "grid.png"),
                 "--seed", "1", "--workers", "0"]) == 0
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 64, 3 * 64)  # 3 rows of (given | completion | original), 64 px each
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "Linear probe by layer" in page and "Completions" in page and "bits per dim" in page


def test_finetune_reads_a_chosen_layer(labelled_shards, tmp_path):
    train, test = labelled_shards / "train", labelled_shards / "val"
    run = tmp_path / "run"
    assert main(["pretrain", "igpt", "--data", str(train), "--out", str(run), *ARGS, "train.max_steps=2"]) == 0
    assert main(["eval", "finetune", str(run), "--train", str(train), "--test", str(test), "train.max_steps=2",
                 "finetune.layer=1", "data.num_workers=0", "train.batch_size=8"]) == 0
    result = json.loads((run / "eval" / "finetune.json").read_text())
    assert 0 <= result["top1"] <= 1


def test_sample_refuses_other_objectives_and_bert(tiny_shards, tmp_path, capsys):
    mae = tmp_path / "mae"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(mae), "model.size=micro",
                 "data.image_size=16", "model.patch_size=4", "train.max_steps=1", "train.batch_size=4",
                 "data.num_workers=0", "train.tensorboard=false"]) == 0
    capsys.readouterr()
    assert main(["sample", str(mae), "--prompt", str(tiny_shards), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an igpt run" in err[0] and "is a mae run" in err[0]
    bert = tmp_path / "bert"
    assert main(["pretrain", "igpt", "--data", str(tiny_shards), "--out", str(bert), *ARGS, "train.max_steps=1",
                 "igpt.task=bert"]) == 0
    capsys.readouterr()
    assert main(["sample", str(bert), "--prompt", str(tiny_shards), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "igpt.task=ar" in err[0]
    # a run written when the key was igpt.objective reads as igpt.task
    saved = bert / "config.yaml"
    saved.write_text(saved.read_text().replace("task: bert", "objective: bert"))
    assert "objective: bert" in saved.read_text() and registry.run_config(saved).igpt.task == "bert"


def test_palette_fit_command_and_reuse(tiny_shards, tmp_path, capsys):
    palette = tmp_path / "palette.json"
    assert main(["palette", "fit", str(tiny_shards), "--out", str(palette), "--size", "8", "--resolution", "8"]) == 0
    assert len(json.loads(palette.read_text())["colours"]) == 8
    run = tmp_path / "run"
    assert main(["pretrain", "igpt", "--data", str(tiny_shards), "--out", str(run), *ARGS, "train.max_steps=1",
                 f"igpt.palette={palette}"]) == 0
    assert (run / "artifacts" / PALETTE).read_bytes() == palette.read_bytes()
    grey = tmp_path / "grey.json"
    assert main(["palette", "fit", str(tiny_shards), "--out", str(grey), "--size", "4", "--channels", "1"]) == 0
    capsys.readouterr()
    assert main(["pretrain", "igpt", "--data", str(tiny_shards), "--out", str(tmp_path / "r2"), *ARGS,
                 "igpt.palette_size=4", f"igpt.palette={grey}"]) == 2
    assert "1-channel colours" in capsys.readouterr().err


@pytest.mark.parametrize("options, words", [
    (["--size", "1"], "--size must be in 2..4096"), (["--resolution", "0"], "--resolution must be >= 4"),
    (["--channels", "2"], "--channels must be 1 or 3"), (["--pixels", "5"], "--pixels >= --size"),
    (["--out-is-a-folder"], "is a directory")])
def test_palette_fit_refusals_name_its_options(tiny_shards, tmp_path, capsys, options, words):
    out = tmp_path / "palette.json"
    if options == ["--out-is-a-folder"]:
        out, options = tmp_path, []
    assert main(["palette", "fit", str(tiny_shards), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert words in err and "igpt." not in err and "data." not in err and "Traceback" not in err


def test_finetune_layer_drops_the_blocks_after_it():
    from vitpipe.ssl.objectives.classify.objective import Classifier, FinetuneConfig

    encoder = tiny_igpt().encoder()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = encoder.pool(encoder.intermediate_layers(images, [1])[0])
        classifier = Classifier(encoder, FinetuneConfig(num_classes=3, layer=1))
        assert classifier.backbone.depth == 2 and torch.allclose(classifier.backbone(images), expected, atol=1e-6)
    with pytest.raises(Exception, match="finetune.layer=5: the encoder has blocks 0..2"):
        Classifier(tiny_igpt().encoder(), FinetuneConfig(num_classes=3, layer=5))
