"""Starting an objective's encoder from another run's (``ObjectiveSpec.encoder_init``, e.g. CLIP's
LiT image tower). The engine reads the other run, not the objective: objectives never import run
loading (``vitpipe.ssl.runs`` builds objectives through the registry)."""

from __future__ import annotations

from pathlib import Path

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError, PretrainConfig, to_dict
from vitpipe.ssl.objective import ObjectiveSpec

ENCODER_INIT = "encoder_init.safetensors"
"""The artefact ``build`` finds the starting weights under (checksummed in run.json like the rest)."""
SHAPE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "class_token", "pos_embed",
              "conv_stem", "pool", "pre_norm")
"""``model.*`` keys that must agree for the weights to fit (with ``data.image_size`` and ``data.channels``)."""


def source_of(spec: ObjectiveSpec | None, config: PretrainConfig) -> str:
    return spec.encoder_init(config) if spec is not None and spec.encoder_init is not None else ""


def check(spec: ObjectiveSpec | None, config: PretrainConfig, source: PretrainConfig | None = None) -> None:
    """Refuse (naming every difference) a starting run whose encoder is not this run's shape:
    before anything of the run is made, and again when its weights are read."""
    start = source_of(spec, config)
    if not start:
        return
    if source is None:
        from vitpipe.ssl import registry

        saved = RunLayout.of(Path(start)).config
        if not saved.is_file():
            raise ConfigError(f"{start} (the encoder to start from) is neither a run directory nor a checkpoint")
        source = registry.run_config(saved)
    mine, theirs = to_dict(config.model), to_dict(source.model)
    differ = [f"model.{k} {theirs[k]} vs {mine[k]}" for k in SHAPE_KEYS if mine[k] != theirs[k]]
    differ += [f"data.{k} {getattr(source.data, k)} vs {getattr(config.data, k)}" for k in ("image_size", "channels")
               if getattr(source.data, k) != getattr(config.data, k)]
    if differ:
        raise ConfigError(f"{start}: its encoder does not have this run's shape ({', '.join(differ)}); "
                          "set them to match it")


def weights(spec: ObjectiveSpec | None, config: PretrainConfig) -> dict[str, bytes]:
    """{ENCODER_INIT: the starting run's encoder weights} (checked), or {} when there is none."""
    start = source_of(spec, config)
    if not start:
        return {}
    from safetensors.torch import save

    from vitpipe.ssl.runs import load_run_encoder
    from vitpipe.ssl.vit import VisionTransformer

    encoder, source, _ = load_run_encoder(Path(start))
    check(spec, config, source)
    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"{start}: its encoder is not a ViT")
    return {ENCODER_INIT: save({k: v.contiguous() for k, v in encoder.state_dict().items()})}
