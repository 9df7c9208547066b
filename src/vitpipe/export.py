"""Export a run's encoder: safetensors + a timm hub-style config.json.

``timm.create_model(cfg["architecture"], **cfg["model_args"])`` followed by a strict
``load_state_dict(safetensors.torch.load_file("model.safetensors"))`` gives the same features as
vitpipe's own forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError, from_dict, to_dict
from vitpipe.pipeline.manifest import write_bytes_atomic
from vitpipe.ssl import registry
from vitpipe.ssl.engine import artifacts
from vitpipe.ssl.runs import load_run_encoder, load_run_objective
from vitpipe.ssl.vit import VisionTransformer

TIMM_NAMES = {"micro": "vit_tiny", "mini": "vit_tiny", "tiny": "vit_tiny", "small": "vit_small", "base": "vit_base",
              "large": "vit_large"}
TIMM_POOL = {"cls": "token", "gap": "avg", "map": "map"}


def timm_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    if encoder.config.conv_stem:
        raise ConfigError("a convolutional-stem encoder has no timm VisionTransformer equivalent; "
                          "export it with --format vitpipe")
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    patch = encoder.patch_size
    weight = state["patch_embed.proj.weight"]  # [D, p*p*C] over (p1 p2 c) -> conv kernel [D, C, p, p]
    state["patch_embed.proj.weight"] = rearrange(weight, "d (p1 p2 c) -> d c p1 p2", p1=patch, p2=patch).contiguous()
    if encoder.config.pre_norm:  # timm drops the patch bias then (as CLIP does): it is a constant per patch token
        positions = state["pos_embed"].clone()
        positions[:, encoder.num_prefix_tokens:] += state.pop("patch_embed.proj.bias")
        state["pos_embed"] = positions
    return state


def timm_config(encoder: VisionTransformer, size: str, mean: list[float], std: list[float]) -> dict[str, Any]:
    """timm's hub layout; ``pretrained_cfg`` carries vitpipe's eval preprocessing (resize the short
    side bicubic to the input size, centre crop, this normalisation) so timm's own
    ``resolve_model_data_config`` + ``create_transform`` reproduce vitpipe's features. The
    architecture names timm's builder; ``model_args`` override its patch and image size."""
    model = encoder.config
    architecture = f"{TIMM_NAMES[size]}_patch16_224"
    channels = encoder.in_chans
    return {
        "architecture": architecture,
        "model_args": {
            "img_size": encoder.image_size, "patch_size": model.patch_size, "in_chans": encoder.in_chans,
            "embed_dim": model.embed_dim, "depth": model.depth, "num_heads": model.num_heads,
            "mlp_ratio": model.mlp_ratio, "class_token": model.class_token, "global_pool": TIMM_POOL[model.pool],
            "fc_norm": False, "num_classes": 0, "pre_norm": model.pre_norm,
        },
        "num_features": model.embed_dim,
        "pretrained_cfg": {"input_size": [channels, encoder.image_size, encoder.image_size],
                           "mean": list(mean[:channels]), "std": list(std[:channels]), "interpolation": "bicubic",
                           "crop_pct": 1.0, "crop_mode": "center", "num_classes": 0},
    }


def hf_files(encoder: VisionTransformer, mean: list[float], std: list[float]) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, config.json, preprocessor_config.json) of a transformers ``ViTModel`` with this
    encoder's weights: ``AutoModel.from_pretrained(DIR)`` loads it with no missing or unexpected key,
    and ``AutoImageProcessor`` gives vitpipe's eval preprocessing (short side bicubic, centre crop,
    this normalisation). What ViTModel cannot represent is refused, not written to load wrong."""
    model = encoder.config
    if not model.class_token:
        raise ConfigError("transformers' ViTModel always has a CLS token and this encoder has none "
                          "(model.class_token=false); export it with --format timm or --format vitpipe")
    if model.conv_stem:  # timm's VisionTransformer has none either
        raise ConfigError("transformers' ViTModel has no convolutional stem; export it with --format vitpipe")
    if model.pool == "map":
        raise ConfigError("transformers' ViTModel has no attention-pooling head; "
                          "export it with --format timm or --format vitpipe")
    if model.pre_norm:
        raise ConfigError("transformers' ViTModel has no LayerNorm before its first block (model.pre_norm=true); "
                          "export it with --format timm or --format vitpipe")
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    dim, patch, channels = model.embed_dim, model.patch_size, encoder.in_chans
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": rearrange(
               state["patch_embed.proj.weight"], "d (p1 p2 c) -> d c p1 p2", p1=patch, p2=patch),
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"],
           # identity pooler with a linear activation: pooler_output is the final CLS token itself
           "pooler.dense.weight": torch.eye(dim), "pooler.dense.bias": torch.zeros(dim)}
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for index in range(encoder.depth):
        ours, theirs = f"blocks.{index}.", f"encoder.layer.{index}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{theirs}{new}.{kind}"] = state[f"{ours}{old}.{kind}"]
        for kind in ("weight", "bias"):  # fused qkv rows are (q | k | v), each (heads x head_dim)
            for name, part in zip(("query", "key", "value"), state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{theirs}attention.attention.{name}.{kind}"] = part
    config = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": dim,
              "num_hidden_layers": model.depth, "num_attention_heads": model.num_heads,
              "intermediate_size": int(dim * model.mlp_ratio), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-6, "image_size": encoder.image_size,
              "patch_size": patch, "num_channels": channels, "qkv_bias": True, "pooler_act": "linear",
              "pooler_output_size": dim, "encoder_stride": patch, "torch_dtype": "float32",
              "vitpipe_pool": model.pool}
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                 "size": {"shortest_edge": encoder.image_size}, "resample": 3, "do_center_crop": True,
                 "crop_size": {"height": encoder.image_size, "width": encoder.image_size}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean[:channels]),
                 "image_std": list(std[:channels]), "do_convert_rgb": channels == 3}
    return {k: v.contiguous() for k, v in out.items()}, config, processor


FORMATS = ("timm", "hf", "vitpipe", "onnx", "open_clip")


def export(run: Path, out: Path, fmt: str = "timm", overwrite: bool = False) -> Path:
    """``timm``: timm hub layout (config.json + model.safetensors) + model card; ``hf``: the same
    layout with Hugging Face Hub metadata in the card, ready for ``huggingface-cli upload``;
    ``vitpipe``: any objective's encoder in vitpipe's own layout (its resolved config and
    artefacts beside the weights), loaded back with ``load_exported``; ``onnx``: any objective's
    encoder as model.onnx (dynamic batch, pooled features) with its input spec in config.json;
    ``open_clip`` (CLIP runs): an open_clip model config, checkpoint and tokenizer; ``hf`` of a CLIP
    run: a transformers ``CLIPModel`` + ``CLIPProcessor`` folder (both in ``clip_export``).

    Every file is made before any is written; files already in ``out`` are refused unless
    ``overwrite`` (a user's own model is never replaced silently); each is written atomically with
    the umask's ordinary file mode."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    files = export_files(run, fmt, out)
    taken = sorted(name for name in files if (out / name).exists())
    if taken and not overwrite:
        raise ConfigError(f"{out} already holds {', '.join(taken)}; pass --overwrite to replace them")
    for name, data in files.items():
        write_bytes_atomic(out / name, data)
    return out


def export_files(run: Path, fmt: str, out: Path) -> dict[str, bytes]:
    """File name (relative to the export folder ``out``) -> contents."""
    from safetensors.torch import save

    encoder, config, source = load_run_encoder(run)
    if fmt == "open_clip" or (fmt == "hf" and config.objective == "clip"):
        return clip_files(run, config, fmt, out)
    if fmt in ("timm", "hf") and not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"the {config.objective} encoder is not a ViT; export it with --format vitpipe")
    files: dict[str, bytes] = {}
    if fmt == "onnx":
        from vitpipe.onnx_export import onnx_config, onnx_model

        cfg = onnx_config(config.data, config.objective)
        files["model.onnx"] = onnx_model(encoder, config.data)
        files["config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
        files["README.md"] = model_card(Path(run), config, cfg, fmt).encode()
        return files
    if fmt == "timm":
        state, cfg = timm_state_dict(encoder), timm_config(encoder, config.model.size, config.data.mean, config.data.std)
    elif fmt == "hf":
        state, cfg, processor = hf_files(encoder, config.data.mean, config.data.std)
        files["preprocessor_config.json"] = (json.dumps(processor, indent=2) + "\n").encode()
    else:  # the whole objective: a CLIP's text tower and projections, an iGPT's output head
        whole = load_run_objective(run, config)
        state = {k: v.detach().cpu().contiguous() for k, v in whole.state_dict().items()}
        saved = artifacts.load(RunLayout.of(run).root)
        files.update({f"artifacts/{name}": data for name, data in saved.items()})
        cfg = {"architecture": "vitpipe", "objective": config.objective, "config": to_dict(config),
               "artifacts": sorted(saved)}
    cfg["vitpipe"] = {"objective": config.objective, "source": str(source), "mean": config.data.mean,
                      "std": config.data.std}
    files["model.safetensors"] = save(state, metadata={"format": "pt"})
    files["config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
    files["README.md"] = model_card(Path(run), config, cfg, fmt).encode()
    return files


def clip_files(run: Path, config, fmt: str, out: Path) -> dict[str, bytes]:
    """The whole CLIP (both towers, projections, temperature, tokenizer) in open_clip's or
    transformers' layout, with a model card."""
    from vitpipe import clip_export

    if config.objective != "clip":
        raise ConfigError(f"--format open_clip needs a CLIP run; this is a {config.objective} run "
                          "(its encoder exports with --format timm, hf, onnx or vitpipe)")
    clip = load_run_objective(run, config)
    name = RunLayout.of(run).root.name.replace("/", "-") or "vitpipe-clip"
    files = (clip_export.open_clip_files(clip, config, name, out) if fmt == "open_clip"
             else clip_export.hf_clip_files(clip, config))
    files["README.md"] = clip_export.model_card(RunLayout.of(run).root, config, fmt, name).encode()
    return files


def load_exported(directory: Path, whole: bool = False) -> torch.nn.Module:
    """The encoder of a ``--format vitpipe`` export (``whole``: the whole objective, e.g. a CLIP with
    ``encode_image``, ``encode_text`` and ``tokenize``), rebuilt through its objective's registry entry."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("architecture") != "vitpipe":
        raise ConfigError(f"{directory} is not a --format vitpipe export")
    config = from_dict(registry.config_class(cfg["objective"]), cfg["config"])
    files = {name: (directory / "artifacts" / name).read_bytes() for name in cfg.get("artifacts", [])}
    objective = registry.build_objective(config, files)
    objective.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    return objective.eval() if whole else objective.encoder().eval()


def model_card(run: Path, config, cfg: dict[str, Any], fmt: str) -> str:
    """A model card: data manifest, objective, steps, eval results, and how to load it."""
    run_dir = RunLayout.of(run).root
    info = json.loads(RunLayout(run_dir).info.read_text()) if RunLayout(run_dir).info.is_file() else {}
    steps = None
    if RunLayout(run_dir).metrics.is_file():
        records = [json.loads(line) for line in RunLayout(run_dir).metrics.read_text().splitlines() if line.strip()]
        steps = max((r["step"] for r in records if "loss" in r), default=None)
    evals = []
    for path in RunLayout(run_dir).results():
        result = json.loads(path.read_text())
        value = (f"top-1 {result['top1']:.4f}" if "top1" in result
                 else ", ".join(f"recall@{k} {v:.4f}" for k, v in result.get("recall", {}).items()))
        evals.append(f"| {result.get('task', path.stem)} | {result.get('baseline') or 'this model'} | {value} |")
    front = ""
    if fmt == "hf":
        front = "---\nlibrary_name: transformers\npipeline_tag: image-feature-extraction\ntags:\n- vit\n- vitpipe\n" \
                f"- {config.objective}\nlicense: other\n---\n\n"
    args = {**to_dict(config.model), "image_size": config.data.image_size}
    load = ("```python\nfrom transformers import AutoImageProcessor, AutoModel\n"
            "model, processor = AutoModel.from_pretrained(\"DIR\"), AutoImageProcessor.from_pretrained(\"DIR\")\n"
            "out = model(**processor(images=image, return_tensors=\"pt\"))\n"
            + ("features = out.last_hidden_state[:, 0]  # = out.pooler_output (identity pooler)\n```\n"
               if config.model.pool == "cls" else
               "features = out.last_hidden_state[:, 1:].mean(dim=1)  # vitpipe's gap pooling\n```\n")
            if fmt == "hf" else
            "```python\nimport onnxruntime\n"
            "session = onnxruntime.InferenceSession(\"DIR/model.onnx\")\n"
            f"features = session.run([\"features\"], {{\"pixels\": pixels}})[0]  # pixels: float32 [batch, "
            f"{len(config.data.mean[: config.data.channels])}, {config.data.image_size}, {config.data.image_size}]\n```\n"
            "Input: the image resized (shorter side, bicubic, antialiased) and centre-cropped to "
            f"{config.data.image_size} px, scaled to [0, 1], normalised by mean {config.data.mean[: config.data.channels]} and "
            f"std {config.data.std[: config.data.channels]}; output: the pooled features vitpipe's probes use "
            "(config.json has the same).\n"
            if fmt == "onnx" else
            "```python\nimport timm\n"
            "model = timm.create_model(\"local-dir:DIR\", pretrained=True)  # config.json + model.safetensors\n"
            "data = timm.data.resolve_model_data_config(model)  # vitpipe's resize, crop and normalisation\n"
            "transform = timm.data.create_transform(**data, is_training=False)\n```\n"
            f"`{cfg['architecture']}` names timm's builder only: `model_args` override its patch size "
            f"({args.get('patch_size')}), image size ({args.get('img_size', args.get('image_size'))}) and width.\n"
            if fmt != "vitpipe" else
            "```python\nfrom vitpipe.export import load_exported\n"
            "encoder = load_exported(\"DIR\")  # rebuilt through its objective; strict weights\n```\n")
    lines = [
        f"{front}# {run_dir.name}: ViT encoder pretrained with {config.objective.upper()} by vitpipe\n",
        f"- architecture: `{cfg.get('architecture') or cfg['architectures'][0]}` with {args.get('embed_dim')} wide, {args.get('depth')} blocks, "
        f"{args.get('num_heads')} heads, patch {args.get('patch_size')}, {args.get('img_size', args.get('image_size'))} px input",
        f"- objective: {config.objective}; steps: {steps}; global batch: {info.get('global_batch')}; "
        f"peak lr: {info.get('peak_lr')}",
        f"- training data: `{config.data.shards}` (manifest sha256 `{info.get('data_manifest_sha256')}`)",
        f"- input normalization: mean {config.data.mean}, std {config.data.std}",
        f"- vitpipe {info.get('vitpipe_version')}, git revision `{info.get('git_revision')}`\n",
        "## Load it\n", load,
        "Pooled features (`num_classes=0`) are what vitpipe's probes evaluated.\n",
        "## Evaluation\n",
        *(["| task | encoder | result |", "|---|---|---|", *evals] if evals else ["No evaluations were run."]),
        "",
    ]
    return "\n".join(lines)
