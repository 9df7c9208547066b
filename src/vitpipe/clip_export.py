"""A vitpipe CLIP run as an open_clip model (``--format open_clip``) or a transformers ``CLIPModel`` +
``CLIPProcessor`` folder (``--format hf``): the same image and text embeddings through each tool's
own preprocessing and tokenizer.

Two facts shape the conversion. open_clip's patch convolution and transformers' have no bias:
vitpipe's patch bias is a constant added to every patch token, so it moves into their position
table (exact). And transformers pools text at the token with the largest id when
``eos_token_id == 2`` (vitpipe's [EOT]): the exported vocabulary swaps [EOT] with the last id (and
the token-embedding rows with it), which both tools then pool at by id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from vitpipe.config import ConfigError
from vitpipe.ssl.objectives.clip.text import EOT, PAD, SOT, SPECIAL

# open_clip's default preprocessing; its built-in-name route (add_model_config + pretrained=FILE)
# cannot carry another normalisation, so the run's own is folded into the patch projection
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LN_EPS = 1e-6


def check_exportable(clip, fmt: str) -> None:
    """Refuse, in one line naming the key, what the target's CLIP cannot hold."""
    model, tool = clip.backbone.config, "open_clip" if fmt == "open_clip" else "transformers' CLIPModel"
    if model.conv_stem:
        raise ConfigError(f"{tool} has no convolutional stem (model.conv_stem=true); export with --format vitpipe")
    if model.pool == "map":
        raise ConfigError(f"{tool} has no attention-pooling image tower (model.pool=map); export with --format vitpipe")
    if not model.class_token:
        raise ConfigError(f"{tool}'s image tower always has a class token (model.class_token=false); "
                          "export with --format vitpipe")
    if clip.backbone.in_chans != 3:
        raise ConfigError(f"{tool} takes RGB images and this run has data.channels={clip.backbone.in_chans}; "
                          "export with --format vitpipe")
    if fmt == "hf" and (model.pool != "cls" or not model.pre_norm):
        raise ConfigError("transformers' CLIPModel pools the class token after a pre-block LayerNorm; this run has "
                          f"model.pool={model.pool} model.pre_norm={str(model.pre_norm).lower()} (train with "
                          "model.pool=cls model.pre_norm=true), or export with --format open_clip")


def tokenizer_files(tokenizer_json: bytes, rows: int, context_length: int) -> tuple[dict[str, bytes], int]:
    """The run's BPE as a ``PreTrainedTokenizerFast`` folder that adds [SOT] ... [EOT] itself, with
    [EOT] moved to id ``rows - 1``; returns (files, the new [EOT] id)."""
    spec = json.loads(tokenizer_json)
    eot = rows - 1
    swap = {EOT: eot, eot: EOT}
    spec["model"]["vocab"] = {token: swap.get(i, i) for token, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = swap.get(added["id"], added["id"])
    sot, end, pad = SPECIAL[SOT], SPECIAL[EOT], SPECIAL[PAD]
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": sot, "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}},
                                         {"SpecialToken": {"id": end, "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": sot, "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}},
                                       {"SpecialToken": {"id": end, "type_id": 0}}],
                              "special_tokens": {sot: {"id": sot, "ids": [SOT], "tokens": [sot]},
                                                 end: {"id": end, "ids": [eot], "tokens": [end]}}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
              "bos_token": sot, "eos_token": end, "pad_token": pad, "padding_side": "right",
              "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": json.dumps(spec, ensure_ascii=False).encode(),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}, eot


def _swapped_rows(weight: torch.Tensor, eot: int) -> torch.Tensor:
    order = torch.arange(len(weight))
    order[EOT], order[eot] = eot, EOT
    return weight[order]


def _blocks(state: dict[str, torch.Tensor], ours: str, theirs: str, depth: int, names: dict[str, str],
            split_qkv: bool) -> dict[str, torch.Tensor]:
    """Transformer blocks renamed; the fused qkv kept (open_clip's in_proj) or split (q|k|v rows)."""
    out = {}
    for index in range(depth):
        source, target = f"{ours}.{index}.", f"{theirs}.{index}."
        for old, new in names.items():
            for kind in ("weight", "bias"):
                out[f"{target}{new}.{kind}"] = state[f"{source}{old}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = state[f"{source}attn.qkv.{kind}"]
            if split_qkv:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.chunk(3, dim=0)):
                    out[f"{target}self_attn.{name}.{kind}"] = part
            else:
                out[f"{target}attn.in_proj_{kind}"] = qkv
    return out


def _patch_and_positions(state: dict[str, torch.Tensor], patch: int, mean, std,
                         their_mean, their_std) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias-free conv kernel [D, 3, p, p] for inputs normalised by their mean/std, position table
    [1 + N, D] with vitpipe's patch bias and the normalisation offset folded into the patch rows)."""
    kernel = rearrange(state["patch_embed.proj.weight"], "d (p1 p2 c) -> d c p1 p2", p1=patch, p2=patch)
    scale = torch.tensor(their_std) / torch.tensor(std[:3])            # x_ours = x_theirs * scale + shift
    shift = (torch.tensor(their_mean) - torch.tensor(mean[:3])) / torch.tensor(std[:3])
    bias = state["patch_embed.proj.bias"] + torch.einsum("dcij,c->d", kernel.double(), shift.double()).float()
    positions = state["pos_embed"][0].clone()
    positions[1:] += bias
    return (kernel * scale.view(1, 3, 1, 1)).contiguous(), positions


def open_clip_files(clip, config, name: str, out: Path) -> dict[str, bytes]:
    """``NAME.json`` (for ``open_clip.add_model_config(DIR)``), ``open_clip_config.json`` (for
    ``local-dir:DIR``), ``open_clip_model.safetensors`` and the tokenizer folder."""
    from safetensors.torch import save

    check_exportable(clip, "open_clip")
    vit, text = clip.backbone, clip.text
    state = {k: v.detach().cpu() for k, v in clip.state_dict().items()}
    image = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    words = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    files, eot = tokenizer_files(clip.tokenize.tokenizer_json, len(words["token_embed.weight"]), config.clip.context_length)
    kernel, positions = _patch_and_positions(image, vit.patch_size, config.data.mean, config.data.std,
                                             OPENAI_MEAN, OPENAI_STD)
    names = {"norm1": "ln_1", "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
    weights = {"visual.conv1.weight": kernel, "visual.class_embedding": image["cls_token"][0, 0],
               "visual.positional_embedding": positions, "visual.ln_post.weight": image["norm.weight"],
               "visual.ln_post.bias": image["norm.bias"], "visual.proj": state["image_proj.weight"].T,
               "token_embedding.weight": _swapped_rows(words["token_embed.weight"], eot),
               "positional_embedding": words["pos_embed"][0], "ln_final.weight": words["norm.weight"],
               "ln_final.bias": words["norm.bias"], "text_projection": state["text_proj.weight"].T,
               "logit_scale": state["logit_scale"]}
    if vit.config.pre_norm:
        weights.update({"visual.ln_pre.weight": image["norm_pre.weight"], "visual.ln_pre.bias": image["norm_pre.bias"]})
    weights.update(_blocks(image, "blocks", "visual.transformer.resblocks", vit.depth, names, split_qkv=False))
    weights.update(_blocks(words, "blocks", "transformer.resblocks", text.depth, names, split_qkv=False))
    model_cfg = open_clip_config(clip, config, out, eot)
    preprocess = {"size": vit.image_size, "mode": "RGB", "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    files.update({
        f"{name}.json": (json.dumps(model_cfg, indent=2) + "\n").encode(),
        "open_clip_config.json": (json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2)
                                  + "\n").encode(),
        "open_clip_model.safetensors": save({k: v.contiguous() for k, v in weights.items()}),
    })
    return files


def open_clip_config(clip, config, out: Path, eot: int) -> dict[str, Any]:
    """open_clip's model config. ``hf_tokenizer_name`` is the export folder's absolute path: the
    built-in-name route reads the tokenizer from there (``local-dir:`` reads its own folder)."""
    vit, text, model = clip.backbone, clip.text, clip.backbone.config
    return {
        "embed_dim": config.clip.embed_dim, "quick_gelu": False,
        "vision_cfg": {"image_size": vit.image_size, "layers": vit.depth, "width": vit.embed_dim,
                       "head_width": vit.embed_dim // model.num_heads, "mlp_ratio": model.mlp_ratio,
                       "patch_size": vit.patch_size, "no_ln_pre": not model.pre_norm,
                       "pool_type": "tok" if model.pool == "cls" else "avg", "norm_kwargs": {"eps": LN_EPS}},
        "text_cfg": {"context_length": config.clip.context_length, "vocab_size": text.token_embed.num_embeddings,
                     "width": text.embed_dim, "heads": config.clip.text_heads, "layers": text.depth,
                     "mlp_ratio": 4.0, "pool_type": "eos", "eos_id": eot, "pad_id": PAD,
                     "norm_kwargs": {"eps": LN_EPS}, "hf_tokenizer_name": str(Path(out).resolve())},
    }


def hf_clip_files(clip, config) -> dict[str, bytes]:
    """A transformers ``CLIPModel`` (config.json + model.safetensors) and the files
    ``CLIPProcessor.from_pretrained`` reads (image processor with the run's preprocessing, tokenizer)."""
    from safetensors.torch import save

    check_exportable(clip, "hf")
    vit, text, data = clip.backbone, clip.text, config.data
    state = {k: v.detach().cpu() for k, v in clip.state_dict().items()}
    image = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    words = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    rows = len(words["token_embed.weight"])
    files, eot = tokenizer_files(clip.tokenize.tokenizer_json, rows, config.clip.context_length)
    kernel, positions = _patch_and_positions(image, vit.patch_size, data.mean, data.std, data.mean[:3], data.std[:3])
    names = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    weights = {"vision_model.embeddings.patch_embedding.weight": kernel,
               "vision_model.embeddings.class_embedding": image["cls_token"][0, 0],
               "vision_model.embeddings.position_embedding.weight": positions,
               "vision_model.pre_layrnorm.weight": image["norm_pre.weight"],
               "vision_model.pre_layrnorm.bias": image["norm_pre.bias"],
               "vision_model.post_layernorm.weight": image["norm.weight"],
               "vision_model.post_layernorm.bias": image["norm.bias"],
               "text_model.embeddings.token_embedding.weight": _swapped_rows(words["token_embed.weight"], eot),
               "text_model.embeddings.position_embedding.weight": words["pos_embed"][0],
               "text_model.final_layer_norm.weight": words["norm.weight"],
               "text_model.final_layer_norm.bias": words["norm.bias"],
               "visual_projection.weight": state["image_proj.weight"], "text_projection.weight": state["text_proj.weight"],
               "logit_scale": state["logit_scale"]}
    weights.update(_blocks(image, "blocks", "vision_model.encoder.layers", vit.depth, names, split_qkv=True))
    weights.update(_blocks(words, "blocks", "text_model.encoder.layers", text.depth, names, split_qkv=True))
    common = {"hidden_act": "gelu", "layer_norm_eps": LN_EPS, "attention_dropout": 0.0, "dropout": 0.0}
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.clip.embed_dim,
           "logit_scale_init_value": float(state["logit_scale"]), "torch_dtype": "float32",
           "vision_config": {**common, "hidden_size": vit.embed_dim, "intermediate_size": int(vit.embed_dim * vit.config.mlp_ratio),
                             "num_hidden_layers": vit.depth, "num_attention_heads": vit.config.num_heads,
                             "num_channels": 3, "image_size": vit.image_size, "patch_size": vit.patch_size,
                             "projection_dim": config.clip.embed_dim},
           "text_config": {**common, "vocab_size": rows, "hidden_size": text.embed_dim, "intermediate_size": 4 * text.embed_dim,
                           "num_hidden_layers": text.depth, "num_attention_heads": config.clip.text_heads,
                           "max_position_embeddings": config.clip.context_length, "pad_token_id": PAD,
                           "bos_token_id": SOT, "eos_token_id": eot, "projection_dim": config.clip.embed_dim}}
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                 "size": {"shortest_edge": vit.image_size}, "resample": 3, "do_center_crop": True,
                 "crop_size": {"height": vit.image_size, "width": vit.image_size}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(data.mean[:3]),
                 "image_std": list(data.std[:3]), "do_convert_rgb": True, "processor_class": "CLIPProcessor"}
    files.update({"config.json": (json.dumps(cfg, indent=2) + "\n").encode(),
                  "preprocessor_config.json": (json.dumps(processor, indent=2) + "\n").encode(),
                  "model.safetensors": save({k: v.contiguous() for k, v in weights.items()}, metadata={"format": "pt"})})
    return files


def model_card(run_dir: Path, config, fmt: str, name: str) -> str:
    """How to load the export in its tool, what its inputs are, and where the two can differ."""
    if fmt == "open_clip":
        load = ("```python\nimport open_clip\nopen_clip.add_model_config(\"DIR\")\n"
                f"model, _, preprocess = open_clip.create_model_and_transforms(\"{name}\", "
                "pretrained=\"DIR/open_clip_model.safetensors\")\n"
                f"tokenizer = open_clip.get_tokenizer(\"{name}\")  # reads DIR/tokenizer.json\n"
                "# or: open_clip.create_model_and_transforms(\"local-dir:DIR\")\n```\n\n"
                "The image tower takes open_clip's default normalisation (OpenAI mean/std): the run's own "
                f"(mean {config.data.mean}, std {config.data.std}) is folded into the patch projection. "
                f"`{name}.json` names the tokenizer by this folder's absolute path; after moving the folder, "
                "use `local-dir:` or edit `text_cfg.hf_tokenizer_name`. open_clip cleans captions before "
                "tokenising (ftfy, HTML entities, runs of whitespace); captions that cleaning changes get "
                "other tokens than vitpipe gave them.\n")
    else:
        load = ("```python\nfrom transformers import CLIPModel, CLIPProcessor\n"
                "model, processor = CLIPModel.from_pretrained(\"DIR\"), CLIPProcessor.from_pretrained(\"DIR\")\n"
                "inputs = processor(text=captions, images=images, return_tensors=\"pt\", padding=True)\n"
                "out = model(**inputs)  # out.image_embeds, out.text_embeds (unit length)\n```\n\n"
                "transformers' default image backend (torchvision) resizes with torch's antialiased bicubic, "
                "one grey level off PIL's on some pixels; `CLIPProcessor.from_pretrained(\"DIR\", backend=\"pil\")` "
                "gives vitpipe's pixels exactly. Its centre crop floors the crop offset where torchvision's "
                "rounds it, so some image sizes are cropped one pixel apart from vitpipe's.\n")
    lines = [f"# {run_dir.name}: a CLIP pretrained by vitpipe, as {'an open_clip' if fmt == 'open_clip' else 'a transformers'} model\n",
             f"- image tower: ViT {config.model.embed_dim} wide, {config.model.depth} blocks, patch "
             f"{config.model.patch_size}, {config.data.image_size} px, pool {config.model.pool}",
             f"- text tower: {config.clip.text_depth} blocks, {config.clip.text_width} wide, context "
             f"{config.clip.context_length}; tokenizer: the byte-level BPE fitted on the training captions",
             f"- training data: `{config.data.shards}`\n", "## Load it\n", load,
             "Images: shorter side resized (bicubic) to the input size, centre crop, [0, 1], normalised. "
             "Image and text embeddings agree with vitpipe's to 1e-4 (tests/test_clip_export.py).\n"]
    return "\n".join(lines)
