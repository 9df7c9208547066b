"""`vitpipe export --format open_clip | hf` of a CLIP run: each tool, through its own preprocessing
and tokenizer, gives vitpipe's image and text embeddings to 1e-4 (non-square images, non-ASCII and
over-long captions); what it cannot hold is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import test_clip
from vitpipe.cli import main
from vitpipe.pipeline.transforms import TransformSpec, build_transform
from vitpipe.ssl.runs import load_run_objective

caption_shards = test_clip.caption_shards  # coloured squares titled by their file names (a fixture)
CAPTIONS = ["a red square", "Café crème für Müller, naïve façade", "日本語のキャプション 🐱 😀",
            "green square number seven and a very long caption that the context cuts", "pin   red\tsquare "]
OPENAI_LIKE = ["model.pool=cls", "model.pre_norm=true", "model.pos_embed=learned", "data.mean=0.3,0.4,0.5",
               "data.std=0.2,0.25,0.3"]


def train(shards, run, *extra: str) -> None:
    assert main(["pretrain", "clip", "--data", str(shards / "train"), "--out", str(run), *test_clip.ARGS,
                 "train.max_steps=3", *extra]) == 0


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((24, 40, 3), (30, 17, 3))]


def vitpipe_embeddings(run):
    clip = load_run_objective(run)
    config = clip.backbone.config
    transform = build_transform(TransformSpec.for_eval(_data_config(run)))
    tokens, _ = clip.tokenize.encode(CAPTIONS)
    with torch.no_grad():
        return (clip.encode_image(torch.stack([transform(i) for i in images()])), clip.encode_text(tokens), config)


def _data_config(run):
    from vitpipe.ssl import registry

    return registry.run_config(run / "config.yaml").data


@pytest.mark.parametrize("overrides", [[], OPENAI_LIKE], ids=["gap-pooled", "openai-like"])
def test_open_clip_builds_the_run_from_its_name_and_from_its_folder(caption_shards, tmp_path, overrides):
    open_clip = pytest.importorskip("open_clip")
    run, out = tmp_path / "run", tmp_path / "oc"
    train(caption_shards, run, *overrides)
    assert main(["export", str(run), "--format", "open_clip", "--out", str(out)]) == 0
    want_image, want_text, _ = vitpipe_embeddings(run)
    open_clip.add_model_config(out)
    routes = [(run.name, {"pretrained": str(out / "open_clip_model.safetensors")}), (f"local-dir:{out}", {})]
    for name, kwargs in routes:
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
        model.eval()
        with torch.no_grad():
            image = model.encode_image(torch.stack([preprocess(i) for i in images()]), normalize=True)
            text = model.encode_text(tokenizer(CAPTIONS), normalize=True)
        assert (image - want_image).abs().max() < 1e-4, name
        assert (text - want_text).abs().max() < 1e-4, name
        assert model.logit_scale.exp().item() == pytest.approx(load_run_objective(run).logit_scale.exp().item())


def test_hf_export_of_a_clip_run_is_a_clip_model_and_processor(caption_shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    run, out = tmp_path / "run", tmp_path / "hf"
    train(caption_shards, run, *OPENAI_LIKE)
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    model, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    want_image, want_text, _ = vitpipe_embeddings(run)
    # PIL resizes as vitpipe, timm and open_clip do; transformers' default torchvision backend's
    # antialiased bicubic is one grey level off on a few pixels: agreement to 1e-3 there
    for backend, tolerance in (("pil", 1e-4), (None, 1e-3)):
        processor = transformers.CLIPProcessor.from_pretrained(out, **({"backend": backend} if backend else {}))
        inputs = processor(text=CAPTIONS, images=images(), return_tensors="pt", padding=True, truncation=True,
                           max_length=8)
        with torch.no_grad():
            result = model.eval()(**inputs)
        assert (result.image_embeds - want_image).abs().max() < tolerance, backend
        assert (result.text_embeds - want_text).abs().max() < 1e-4, backend
    assert "CLIPModel.from_pretrained" in (out / "README.md").read_text()


@pytest.mark.parametrize("fmt,overrides,message", [
    ("hf", [], "model.pool=gap model.pre_norm=false"),
    ("open_clip", ["model.pool=map"], "attention-pooling"),
    ("open_clip", ["model.class_token=false", "model.pool=gap"], "class token"),
])
def test_what_the_tool_cannot_hold_is_refused_in_one_line(caption_shards, tmp_path, capsys, fmt, overrides, message):
    run = tmp_path / "run"
    train(caption_shards, run, *overrides)
    capsys.readouterr()
    assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_open_clip_export_of_another_objective_is_refused(tiny_shards, tmp_path, capsys):
    from test_trainer import RUN_ARGS

    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS, "train.max_steps=1"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "open_clip", "--out", str(tmp_path / "out")]) == 2
    assert "needs a CLIP run" in capsys.readouterr().err
