"""CLIP: tokenizer artefact, global negatives across processes, LiT, zero-shot, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest
from vitpipe.ssl import registry
from vitpipe.ssl.engine.checkpoints import list_checkpoints

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
ARGS = ["model.size=micro", "data.image_size=16", "train.batch_size=8", "train.log_every=1", "data.num_workers=0",
        "data.shuffle_buffer=10", "train.tensorboard=false", "clip.vocab_size=300", "clip.text_width=32",
        "clip.text_depth=1", "clip.text_heads=2", "clip.embed_dim=32", "clip.context_length=8"]


@pytest.fixture
def caption_shards(tmp_path):
    """Coloured shapes in class folders, titled by file name (no sidecar files): image-text pairs."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (tmp_path / "art" / name).mkdir(parents=True)
        for index in range(12):
            image = np.full((16, 16, 3), 255, dtype=np.uint8)
            top, left = rng.integers(0, 8, size=2)
            image[top:top + 8, left:left + 8] = colour
            Image.fromarray(image).save(tmp_path / "art" / name / f"{name}_square_number_{index}.png")
    ingest(str(tmp_path / "art"), tmp_path / "shards", IngestConfig(shard_size=12, val_fraction=0.25,
                                                                     filename_captions=True), progress=False)
    return tmp_path / "shards"


def test_clip_end_to_end_through_the_cli(caption_shards, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(run), *ARGS,
                 "train.max_steps=6", "train.ckpt_every_steps=3"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert set(info["artifacts"]) == {"tokenizer.json"}
    config = (run / "config.yaml").read_text()
    assert "- 0.98" in config and "eps: 1.0e-06" in config and "weight_decay: 0.2" in config  # CLIP's recipe
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["logit_scale"] <= 100 for r in records) and records[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)
    common = ["--test", str(caption_shards / "val"), "--workers", "0", "--max-contamination", "1"]
    assert main(["eval", "zero-shot", str(run), *common]) == 0
    assert main(["eval", "zero-shot", str(run), *common, "--init", "random"]) == 0
    result = json.loads((run / "eval" / "zero-shot.json").read_text())
    assert result["classes"] == ["blue", "green", "red"] and result["chance"] == pytest.approx(1 / 3)
    expected = sum(json.loads((caption_shards / "val" / "sizes.json").read_text()).values())
    assert 0 <= result["top1"] <= result["top5"] == 1.0 and result["test_samples"] == expected
    assert (run / "eval" / "zero-shot.random.json").is_file()
    assert main(["eval", "knn", str(run), "--train", str(caption_shards / "train"), *common]) == 0  # image tower
    assert sum(map(sum, result["confusion"])) == expected
    assert main(["report", str(run)]) == 0
    assert "Zero-shot confusion" in (run / "report" / "index.html").read_text()
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(run), "--resume", "auto",
                 *ARGS, "train.max_steps=8", "train.ckpt_every_steps=3"]) == 0
    assert json.loads((run / "run.json").read_text())["artifacts"] == info["artifacts"]  # not refitted


def test_shards_without_captions_are_one_clear_error(tiny_shards, tmp_path, capsys):
    assert main(["pretrain", "clip", "--data", str(tiny_shards), "--out", str(tmp_path / "run"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "23 of 23 samples have no caption" in err[0]


def test_one_pair_a_step_is_refused_and_two_micro_batches_of_one_train(caption_shards, tmp_path, capsys):
    """A global batch of one pair trained with a loss of exactly 0 (no negative) and said "done"."""
    base = ["pretrain", "clip", "--data", str(caption_shards / "train"), *ARGS, "train.max_steps=2"]
    assert main([*base, "--out", str(tmp_path / "one"), "train.batch_size=1"]) == 2
    assert "CLIP needs at least 2 image-text pairs per step" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "two"), "train.batch_size=1", "train.grad_accum=2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert losses and all(loss > 0.1 for loss in losses)


def test_long_captions_are_cut_and_counted(caption_shards, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(run), *ARGS,
                 "train.max_steps=2", "clip.context_length=4"]) == 0  # "red square number 3" > 2 words
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "captions_truncated" in r]
    assert [r["captions_truncated"] for r in steps] == [8.0 * r["step"] for r in steps]  # a running total


def test_tokens_pad_to_the_longest_caption_with_the_same_features():
    """Padding to the batch's longest caption instead of the context removes text-tower work; the
    causal mask makes it exact."""
    from vitpipe.ssl.objectives.clip.text import PAD

    model = _tiny_clip()
    tokens, _ = model.tokenize.encode(["red", "blue square", "red"])
    assert tokens.shape[1] < model.tokenize.context_length
    padded = torch.full((3, model.tokenize.context_length), PAD, dtype=torch.long)
    padded[:, :tokens.shape[1]] = tokens
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), model.encode_text(padded), atol=1e-6)


def test_locked_image_tuning_from_another_run(caption_shards, tmp_path, capsys):
    mae = tmp_path / "mae"
    assert main(["pretrain", "mae", "--data", str(caption_shards / "train"), "--out", str(mae),
                 *[a for a in ARGS if not a.startswith("clip.")], "model.pool=gap", "mae.decoder_dim=32",
                 "mae.decoder_heads=2", "mae.decoder_depth=1", "train.max_steps=2"]) == 0
    lit = tmp_path / "lit"
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(lit), *ARGS,
                 "train.max_steps=3", f"clip.image_init={mae}", "clip.lock_image=true"]) == 0
    start, end = load_file(mae / "encoder.safetensors"), load_file(lit / "encoder.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)  # locked: the MAE encoder, untouched
    # the engine read the MAE run (CLIP declares encoder_init) and keeps its weights as a checked artefact
    assert "encoder_init.safetensors" in json.loads((lit / "run.json").read_text())["artifacts"]
    capsys.readouterr()
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(tmp_path / "bad"), *ARGS,
                 "model.patch_size=2", f"clip.image_init={mae}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.patch_size 4 vs 2" in err[0]
    assert not list_checkpoints(tmp_path / "bad")


def _clip_worker(rank: int, init_file: str, out_dir: str, state: dict, images, tokens) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = _tiny_clip(state)
    half = slice(4 * rank, 4 * (rank + 1))
    loss, _ = model.forward_loss(model.encode_image(images[half]), model.encode_text(tokens[half]))
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)  # what DDP does: the mean over processes
            grads[name] = param.grad / 2
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _accumulating_worker(rank: int, init_file: str, out_dir: str, state: dict, images, tokens) -> None:
    import torch.distributed as dist

    from vitpipe.ssl.engine.distributed import sum_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = _tiny_clip(state)
    mine = range(4 * rank, 4 * (rank + 1))
    batches = [{"image": images[i:i + 2], "tokens": tokens[i:i + 2]} for i in mine[::2]]
    output = model.accumulate(batches, lambda loss: loss.backward())
    sum_gradients(model.parameters())  # what the trainer does after accumulate
    grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    torch.save({"loss": output.loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _two_processes_against_one(tmp_path, worker):
    """Run ``worker`` on 2 gloo processes over 8 image-caption pairs; return the one-process model
    (gradients of the whole batch in .grad), its loss, and what each rank saved."""
    import torch.multiprocessing as mp

    model = _tiny_clip()
    images = torch.randn(8, 3, 16, 16)
    tokens, _ = model.tokenize.encode([f"{c} square {i}" for i in range(4) for c in ("red", "blue")])
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), model.state_dict(), images, tokens),
             nprocs=2, join=True)
    loss, _ = model.forward_loss(model.encode_image(images), model.encode_text(tokens))
    loss.backward()
    return model, loss, [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


def _tiny_clip(state=None):
    from vitpipe.ssl.objectives.clip.objective import fit_artifacts

    config = registry.pretrain_config("clip", None, ARGS)
    read = lambda fields, limit: iter([{"text": ["red square", "green square", "blue square"] * 20}])  # noqa: E731
    torch.manual_seed(0)
    model = registry.build_objective(config, fit_artifacts(config, read))
    if state is not None:
        model.load_state_dict(state)
    return model


def test_global_negatives_equal_one_process_on_the_whole_batch(tmp_path):
    """2 gloo processes with 4 pairs each: the loss and the (DDP-averaged) gradients equal one
    process's on all 8 pairs, to 1e-5."""
    model, loss, ranks = _two_processes_against_one(tmp_path, _clip_worker)
    for saved in ranks:
        assert saved["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
        for name, grad in saved["grads"].items():
            assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-5), name


def test_accumulation_across_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """2 gloo processes x 2 micro-batches of 2: every process's loss is the 8-pair batch's, and the
    summed gradients are one process's on all 8 pairs (1e-5), the temperature's included."""
    model, loss, ranks = _two_processes_against_one(tmp_path, _accumulating_worker)
    for saved in ranks:
        assert saved["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
        assert set(saved["grads"]) == {n for n, p in model.named_parameters() if p.grad is not None}
        for name, grad in saved["grads"].items():
            assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-5), name


def test_retrieval_both_ways_and_text_queries(caption_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(run), *ARGS,
                 "train.max_steps=4"]) == 0
    capsys.readouterr()
    assert main(["eval", "retrieval", str(run), "--index", str(caption_shards / "val"), "--workers", "0",
                 "--text", "a red square", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval" / "retrieval-text.json").read_text())
    assert set(result["image_to_text"]) == set(result["text_to_image"]) == {"1", "5", "10"}
    assert result["text_to_image"]["10"] >= result["text_to_image"]["1"] and result["size"] > 0
    hits = [line.split("\t") for line in out.splitlines() if line.count("\t") == 2]
    assert len(hits) == 3 and (run / "eval" / "retrieval-text" / "query_text.png").is_file()
    assert json.loads((run / "eval" / "retrieval.json").read_text())["size"] == result["size"]  # image->image too


def test_paired_recall_counts_the_own_pair():
    from vitpipe.downstream.imagetext import paired_recall

    database = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0.2, 0.1, 1.0, 0.3], [0, 0, 1.0, 0.1], [0, 0, 0, 1.0]])
    recall = paired_recall(queries, database, ks=(1, 2, 4))
    assert recall == {"1": 0.75, "2": 0.75, "4": 1.0}  # query 1 ranks its own pair last


def test_accumulation_keeps_the_whole_batch_as_negatives():
    """4 micro-batches of 16 give the loss and gradients of one batch of 64 (1e-5)."""
    model = _tiny_clip()
    images = torch.randn(64, 3, 16, 16)
    tokens, _ = model.tokenize.encode([f"{c} square {i}" for i in range(32) for c in ("red", "blue")])
    loss, _ = model.forward_loss(model.encode_image(images), model.encode_text(tokens))
    loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    batches = [{"image": images[i:i + 16], "tokens": tokens[i:i + 16]} for i in range(0, 64, 16)]
    output = model.accumulate(batches, lambda micro_loss: micro_loss.backward())
    assert output.loss.item() == pytest.approx(loss.item(), abs=1e-5)
    for name, grad in whole.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-5), name


def test_trainer_uses_contrastive_accumulation(caption_shards, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(run), *ARGS,
                 "train.max_steps=3", "train.batch_size=4", "train.grad_accum=2"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["samples"] == 8 * r["step"] for r in records)


def test_two_processes_with_contrastive_accumulation_train_one_model(caption_shards, tmp_path):
    """torchrun, 2 processes x 2 micro-batches of 4: one model (same parameters on both ranks), 16
    pairs a step, disjoint samples."""
    import os
    import subprocess

    from test_distributed import LAUNCHERS

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*LAUNCHERS["torchrun"], "pretrain", "clip", "--data", str(caption_shards / "train"),
                             "--out", str(run), *ARGS, "train.batch_size=4", "train.grad_accum=2", "train.max_steps=2",
                             "train.record_keys=true", "data.shuffle_buffer=0"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    finals = [json.loads((run / "audit" / f"rank{r}.final.json").read_text()) for r in range(2)]
    assert finals[0]["param_abs_sum"] == finals[1]["param_abs_sum"] and finals[0]["global_batch"] == 16
    lines = [[json.loads(line) for line in (run / "audit" / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert all(sorted(line["step"] for line in rank) == [1, 1, 2, 2] for rank in lines)  # 2 micro-batches a step
    assert all(len(line["keys"]) == 4 for rank in lines for line in rank)
    assert not {k for line in lines[0] for k in line["keys"]} & {k for line in lines[1] for k in line["keys"]}
    assert [json.loads(line)["samples"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [16, 32]


def test_vitpipe_export_keeps_the_text_tower(caption_shards, tmp_path):
    """`--format vitpipe` of a CLIP run is usable for zero-shot elsewhere: both towers, the
    projections, the temperature and the tokenizer come back with ``load_exported(whole=True)``."""
    from vitpipe.export import load_exported
    from vitpipe.ssl.runs import load_run_objective

    run = tmp_path / "run"
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(run), *ARGS,
                 "train.max_steps=2"]) == 0
    assert main(["export", str(run), "--format", "vitpipe", "--out", str(tmp_path / "exp")]) == 0
    exported, trained = load_exported(tmp_path / "exp", whole=True), load_run_objective(run)
    tokens, _ = exported.tokenize.encode(["a red square", "green"])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(exported.encode_text(tokens), trained.encode_text(tokens))
        assert torch.equal(exported.encode_image(images), trained.encode_image(images))
    assert torch.equal(exported.logit_scale, trained.logit_scale)
    assert isinstance(load_exported(tmp_path / "exp"), type(trained.encoder()))  # the image tower alone by default
