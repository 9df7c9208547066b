"""Export a run's encoder: safetensors + a timm hub-style config.json.

``timm.create_model(cfg["architecture"], **cfg["model_args"])`` followed by a strict
``load_state_dict(safetensors.torch.load_file("model.safetensors"))`` gives the same features as
vitpipe's own forward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from vitpipe.config import ConfigError, from_dict, to_dict
from vitpipe.ssl import artifacts, registry
from vitpipe.ssl.runs import load_run_encoder, load_run_objective, run_dir_of
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
            "fc_norm": False, "num_classes": 0,
        },
        "num_features": model.embed_dim,
        "pretrained_cfg": {"input_size": [channels, encoder.image_size, encoder.image_size],
                           "mean": list(mean[:channels]), "std": list(std[:channels]), "interpolation": "bicubic",
                           "crop_pct": 1.0, "crop_mode": "center", "num_classes": 0},
    }


FORMATS = ("timm", "hf", "vitpipe")


def export(run: Path, out: Path, fmt: str = "timm") -> Path:
    """``timm``: timm hub layout (config.json + model.safetensors) + model card; ``hf``: the same
    layout with Hugging Face Hub metadata in the card, ready for ``huggingface-cli upload``;
    ``vitpipe``: any objective's encoder in vitpipe's own layout (its resolved config and
    artefacts beside the weights), loaded back with ``load_exported``."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    encoder, config, source = load_run_encoder(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt in ("timm", "hf"):
        if not isinstance(encoder, VisionTransformer):
            raise ConfigError(f"the {config.objective} encoder is not a ViT; export it with --format vitpipe")
        state, cfg = timm_state_dict(encoder), timm_config(encoder, config.model.size, config.data.mean, config.data.std)
    else:  # the whole objective: a CLIP's text tower and projections, an iGPT's output head
        whole = load_run_objective(run, config)
        state = {k: v.detach().cpu().contiguous() for k, v in whole.state_dict().items()}
        files = artifacts.load(run_dir_of(run))
        for name, data in files.items():
            (out / "artifacts").mkdir(exist_ok=True)
            (out / "artifacts" / name).write_bytes(data)
        cfg = {"architecture": "vitpipe", "objective": config.objective, "config": to_dict(config),
               "artifacts": sorted(files)}
    cfg["vitpipe"] = {"objective": config.objective, "source": str(source), "mean": config.data.mean,
                      "std": config.data.std}
    save_file(state, out / "model.safetensors.tmp")
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "README.md").write_text(model_card(Path(run), config, cfg, fmt))
    return out


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
    run_dir = run.parent.parent if (run / "state.json").is_file() else run
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    steps = None
    if (run_dir / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = max((r["step"] for r in records if "loss" in r), default=None)
    evals = []
    for path in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
        result = json.loads(path.read_text())
        value = (f"top-1 {result['top1']:.4f}" if "top1" in result
                 else ", ".join(f"recall@{k} {v:.4f}" for k, v in result.get("recall", {}).items()))
        evals.append(f"| {result.get('task', path.stem)} | {result.get('baseline') or 'this model'} | {value} |")
    front = ""
    if fmt == "hf":
        front = "---\nlibrary_name: timm\ntags:\n- image-feature-extraction\n- timm\n- vitpipe\n" \
                f"- {config.objective}\nlicense: other\n---\n\n"
    args = cfg.get("model_args") or {**cfg["config"]["model"], "image_size": config.data.image_size}
    load = ("```python\nimport timm\n"
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
        f"- architecture: `{cfg['architecture']}` with {args.get('embed_dim')} wide, {args.get('depth')} blocks, "
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
