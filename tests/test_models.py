"""Backbone and objectives: the registry-wide contract, MAE's stages, timm-compatible export."""

import json

import pytest
import torch

from vitpipe.config import ModelConfig, PretrainConfig
from vitpipe.ssl import registry
from vitpipe.ssl.objective import Encoder
from vitpipe.ssl.registry import OBJECTIVES, build_objective
from vitpipe.ssl.vit import VisionTransformer, patchify, unpatchify

TINY = ["model.size=micro", "data.image_size=16", "model.patch_size=4", "mae.decoder_dim=32", "mae.decoder_heads=2",
        "mae.decoder_depth=1"]


def tiny_config(*overrides, objective: str = "mae") -> PretrainConfig:
    return registry.pretrain_config(objective, None, [*TINY, *overrides])


SMALL_SECTIONS = {"mae": ["mae.decoder_dim=32", "mae.decoder_heads=2", "mae.decoder_depth=1"],
                  "classify": ["finetune.num_classes=2"],
                  "dino": ["dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops=2"]}


def through_views(objective, data, batch):
    """An objective with its own multi-view recipe gets its views of the batch's images (as the
    loader would make them); the others get the batch as it is."""
    views = objective.views(data)
    if views is not None:
        pixels = ((batch["image"].clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
        batch = {**batch, "image": views.batch(pixels)}
    return batch


def synthetic_read(fields, limit):
    """Stands in for the training shards when an objective fits artefacts."""
    generator = torch.Generator().manual_seed(0)
    for start in range(0, limit, 32):
        yield {"image": torch.rand(32, 3, 16, 16, generator=generator) * 2 - 1,
               "text": [f"a photo of thing {i}" for i in range(start, start + 32)],
               "label": torch.randint(0, 2, (32,), generator=generator), "key": [f"k{i}" for i in range(32)]}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains(name):
    """Finite loss, gradients reach every trainable parameter, nothing assumes a device, and the
    encoder follows the Encoder protocol (evaluation and export rely on nothing else)."""
    torch.manual_seed(0)
    spec = registry.get(name)
    config = registry.pretrain_config(name, None, ["model.size=micro", "data.image_size=16", "model.patch_size=4",
                                                   *SMALL_SECTIONS.get(name, [])])
    artifacts = spec.fit_artifacts(config, synthetic_read) if spec.fit_artifacts else {}
    objective = build_objective(config, artifacts)
    images = torch.randn(4, 3, 16, 16)
    batch = through_views(objective, config.data, {"image": images, "label": torch.tensor([0, 1, 0, 1]),
                                                   "text": ["a", "b", "c", "d"], "key": ["k0", "k1", "k2", "k3"]})
    hook = objective.batch_hook()
    if hook is not None:
        batch = hook(batch, torch.Generator().manual_seed(0))
    output = objective(batch)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"no gradient: {missing}"
    assert all(p.device.type == "cpu" for p in objective.parameters())
    encoder = objective.encoder().eval()
    assert isinstance(encoder, Encoder)
    with torch.no_grad():
        tokens = encoder.forward_features(images)
        assert encoder.pool(tokens).shape == (4, encoder.embed_dim)
        layers = encoder.intermediate_layers(images, [0, encoder.depth - 1])
        assert torch.allclose(layers[-1], tokens, atol=1e-5)


def test_patchify_round_trip():
    images = torch.randn(2, 3, 16, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 12, 48)
    assert torch.equal(unpatchify(patches, 4, 3, (4, 3)), images)
    # patch 1 of row 0 is the pixels [0:4, 4:8]
    assert torch.equal(patches[0, 1].reshape(4, 4, 3).permute(2, 0, 1), images[0, :, 0:4, 4:8])


def make_mae(**overrides):
    torch.manual_seed(0)
    return build_objective(tiny_config(*[f"{k}={v}" for k, v in overrides.items()]))


def test_mask_ratio_is_exact_per_sample():
    mae = make_mae()
    keep_idx, mask, restore_idx = mae.random_masking(8, torch.device("cpu"))
    assert keep_idx.shape == (8, 4) and mask.shape == (8, 16)
    assert torch.all(mask.sum(dim=1) == 12)
    for row in range(8):  # kept patches are exactly the unmasked ones
        assert set(keep_idx[row].tolist()) == set(torch.nonzero(mask[row] == 0).flatten().tolist())
    assert not torch.equal(keep_idx[0], keep_idx[1])  # per-sample, not one mask for the batch


def test_only_visible_tokens_reach_the_encoder():
    mae = make_mae()
    seen = {}
    def record(module, inputs, output):
        seen["tokens"] = inputs[0].shape[1]

    mae.backbone.blocks[0].register_forward_hook(record)
    mae({"image": torch.randn(2, 3, 16, 16)})
    assert seen["tokens"] == 1 + 4  # CLS + 25% of 16 patches

    # and changing hidden pixels does not change the encoder output
    images = torch.randn(1, 3, 16, 16)
    keep_idx, mask, _ = mae.random_masking(1, torch.device("cpu"))
    changed = images.clone()
    hidden = torch.nonzero(mask[0]).flatten()
    patches = patchify(changed, 4)
    patches[0, hidden] += 5.0
    changed = unpatchify(patches, 4, 3, (4, 4))
    with torch.no_grad():
        assert torch.allclose(mae.forward_encoder(images, keep_idx), mae.forward_encoder(changed, keep_idx))


def test_loss_only_counts_masked_patches():
    mae = make_mae()
    images = torch.randn(2, 3, 16, 16)
    keep_idx, mask, restore_idx = mae.random_masking(2, torch.device("cpu"))
    with torch.no_grad():
        pred = mae.forward_decoder(mae.forward_encoder(images, keep_idx), restore_idx)
    target = mae.target(images)
    perfect_on_masked = torch.where(mask.bool().unsqueeze(-1), target, torch.randn_like(target) * 100)
    assert mae.forward_loss(images, perfect_on_masked, mask).item() < 1e-10
    assert mae.forward_loss(images, pred, mask).item() > 0


def test_norm_pix_target_is_per_patch_normalized():
    mae = make_mae()
    target = mae.target(torch.rand(2, 3, 16, 16))
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.std(-1), torch.ones(2, 16), atol=1e-2)


@pytest.mark.parametrize("pool,class_token", [("cls", True), ("gap", True), ("gap", False), ("map", True)])
def test_pooling_and_intermediate_layers(pool, class_token):
    vit = VisionTransformer(ModelConfig(patch_size=4, embed_dim=64, depth=3, num_heads=2, pool=pool,
                                        class_token=class_token), image_size=16)
    x = torch.randn(2, 3, 16, 16)
    assert vit(x).shape == (2, 64)
    layers = vit.intermediate_layers(x, [0, 1, -1])
    assert len(layers) == 3 and all(t.shape == (2, 16 + int(class_token), 64) for t in layers)
    assert torch.allclose(layers[-1], vit.forward_features(x), atol=1e-6)


def test_position_embedding_interpolation_keeps_original_resolution():
    vit = VisionTransformer(ModelConfig(patch_size=4, embed_dim=64, depth=2, num_heads=2, pos_embed="learned"),
                            image_size=16).eval()
    x, big = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)
    before = vit(x)
    on_the_fly = vit(big)  # 8x8 grid from the 4x4 table
    assert on_the_fly.shape == (2, 64)
    assert torch.equal(vit(x), before)  # the original resolution is untouched
    vit.resize_pos_embed(32)
    assert vit.pos_embed.shape == (1, 1 + 64, 64)
    assert torch.allclose(vit(big), on_the_fly, atol=1e-6)


@pytest.mark.parametrize("size,pool,class_token,pre_norm", [("micro", "cls", True, False), ("micro", "gap", False, False),
                                                             ("micro", "map", True, False), ("micro", "cls", True, True)])
def test_timm_export_loads_strictly_and_matches(tmp_path, size, pool, class_token, pre_norm):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file, save_file

    from vitpipe.config import save_config
    from vitpipe.export import export

    config = tiny_config(f"model.size={size}", f"model.pool={pool}", f"model.class_token={str(class_token).lower()}",
                         f"model.pre_norm={str(pre_norm).lower()}")
    run = tmp_path / "run"
    save_config(config, run / "config.yaml")
    encoder = VisionTransformer(config.model, 16, 3).eval()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, run / "encoder.safetensors")
    out = export(run, tmp_path / "export", "timm")
    cfg = json.loads((out / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], **cfg["model_args"])
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), encoder(x), atol=1e-5)


def saved_encoder_run(tmp_path, *overrides: str):
    """A run directory holding only a config and a random encoder's weights: what export reads."""
    from safetensors.torch import save_file

    from vitpipe.config import save_config

    config = tiny_config(*overrides)
    run = tmp_path / "run"
    save_config(config, run / "config.yaml")
    torch.manual_seed(0)
    encoder = VisionTransformer(config.model, 16, 3).eval()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, run / "encoder.safetensors")
    return run, encoder


def test_timm_local_dir_and_its_own_transform_reproduce_vitpipe_features(tmp_path):
    """A timm user's path: `create_model("local-dir:DIR", pretrained=True)`, then timm's
    `resolve_model_data_config` + `create_transform` on a PIL image, gives vitpipe's features for the
    same image through vitpipe's eval transform (non-square image, non-ImageNet normalisation)."""
    timm = pytest.importorskip("timm")
    import numpy as np
    from PIL import Image
    from vitpipe.export import export
    from vitpipe.pipeline.transforms import TransformSpec, build_transform

    run, encoder = saved_encoder_run(tmp_path, "data.mean=0.3,0.4,0.5", "data.std=0.2,0.25,0.3", "model.pool=gap")
    out = export(run, tmp_path / "export", "timm")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_config = timm.data.resolve_model_data_config(model)
    assert tuple(data_config["mean"]) == (0.3, 0.4, 0.5) and data_config["crop_pct"] == 1.0
    timm_transform = timm.data.create_transform(**data_config, is_training=False)
    ours = build_transform(TransformSpec("eval", 16, 3, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3)))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        theirs = model(timm_transform(image).unsqueeze(0))
        mine = encoder(ours(image).unsqueeze(0))
    assert (theirs - mine).abs().max() < 1e-4
    assert "names timm's builder only" in (out / "README.md").read_text()


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_hf_export_is_a_real_transformers_checkpoint(tmp_path, pool):
    """`AutoModel.from_pretrained(DIR)` loads every weight (nothing missing, nothing unexpected, so
    nothing silently random) and, through `AutoImageProcessor`, gives vitpipe's features for the
    same non-square image: CLS, pooled output and mean-pooled patches within 1e-4."""
    transformers = pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image
    from vitpipe.export import export
    from vitpipe.pipeline.transforms import TransformSpec, build_transform

    run, encoder = saved_encoder_run(tmp_path, "data.mean=0.3,0.4,0.5", "data.std=0.2,0.25,0.3", f"model.pool={pool}",
                                     "model.pos_embed=learned")
    out = export(run, tmp_path / "hf", "hf")
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    ours = build_transform(TransformSpec("eval", 16, 3, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3)))(image)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert (pixels[0] - ours).abs().max() < 1e-4
    with torch.no_grad():
        result = model.eval()(pixel_values=pixels)
        tokens = encoder.forward_features(ours.unsqueeze(0))
    assert (result.last_hidden_state - tokens).abs().max() < 1e-4
    assert (result.pooler_output - tokens[:, 0]).abs().max() < 1e-4
    assert (result.last_hidden_state[:, 1:].mean(dim=1) - encoder.pool(tokens, "gap")).abs().max() < 1e-4
    assert "library_name: transformers" in (out / "README.md").read_text()


@pytest.mark.parametrize("overrides,message", [(["model.class_token=false", "model.pool=gap"], "has none"),
                                               (["model.pool=map"], "attention-pooling head"),
                                               (["model.pre_norm=true"], "no LayerNorm before its first block")])
def test_hf_export_refuses_what_transformers_cannot_hold(tmp_path, capsys, overrides, message):
    from vitpipe.cli import main

    run, _ = saved_encoder_run(tmp_path, *overrides)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
