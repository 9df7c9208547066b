"""Reading finished or running runs: their config and encoder weights."""

from __future__ import annotations

from pathlib import Path

from vitpipe.config import ConfigError, PretrainConfig, load_config
from vitpipe.ssl.vit import ViTArgs, VisionTransformer


def locate_run(run_or_checkpoint: Path) -> tuple[PretrainConfig, Path]:
    """(config, weights file) of a run directory (its encoder.safetensors, else its latest
    checkpoint's model.safetensors) or of a checkpoint directory; reads no weights."""
    from vitpipe.ssl.trainer import list_checkpoints

    path = Path(run_or_checkpoint)
    if (path / "state.json").is_file():  # a checkpoint directory
        run_dir, checkpoint = path.parent.parent, path
    elif (path / "config.yaml").is_file():
        run_dir, checkpoint = path, None
    else:
        raise ConfigError(f"{path} is neither a run directory nor a checkpoint")
    config = load_config(PretrainConfig, run_dir / "config.yaml")
    if checkpoint is None and (run_dir / "encoder.safetensors").is_file():
        return config, run_dir / "encoder.safetensors"
    checkpoint = checkpoint or (list_checkpoints(run_dir) or [None])[-1]
    if checkpoint is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet")
    return config, checkpoint / "model.safetensors"


def load_run_encoder(run_or_checkpoint: Path) -> tuple[VisionTransformer, PretrainConfig, Path]:
    """The encoder of a run or checkpoint (see ``locate_run``), its config and its weights file."""
    from safetensors.torch import load_file

    from vitpipe.ssl.registry import build_objective

    config, weights = locate_run(run_or_checkpoint)
    if weights.name == "encoder.safetensors":
        encoder = VisionTransformer(ViTArgs.from_config(config.model, config.data.image_size, config.data.channels))
        encoder.load_state_dict(load_file(weights))
        return encoder.eval(), config, weights
    objective = build_objective(config)  # a checkpoint holds the whole objective; keep its encoder
    objective.load_state_dict(load_file(weights))
    return objective.encoder().eval(), config, weights
