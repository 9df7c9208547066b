"""Reading finished or running runs: their config and encoder weights."""

from __future__ import annotations

from pathlib import Path

from vitpipe.config import ConfigError, PretrainConfig, load_config
from vitpipe.ssl.vit import ViTArgs, VisionTransformer


def locate_run(run_or_checkpoint: Path) -> tuple[PretrainConfig, Path]:
    """(config, weights file) of a run directory (its encoder.safetensors, else its latest
    checkpoint that verifies) or of a checkpoint directory. The file is checked against the
    checksum written with it: a damaged file is an error (CheckpointError), never evaluated."""
    import json

    from vitpipe.ssl import checkpoints

    path = Path(run_or_checkpoint)
    if (path / "state.json").is_file():  # a checkpoint directory
        run_dir, checkpoint = path.parent.parent, path
    elif (path / "config.yaml").is_file():
        run_dir, checkpoint = path, None
    else:
        raise ConfigError(f"{path} is neither a run directory nor a checkpoint")
    config = load_config(PretrainConfig, run_dir / "config.yaml")
    encoder = run_dir / "encoder.safetensors"
    if checkpoint is None and encoder.is_file():
        info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        expected = info.get("encoder_sha256")
        if expected and checkpoints.sha256_file(encoder) != expected:
            raise checkpoints.CheckpointError(f"{encoder} does not match the sha256 in run.json (damaged); "
                                              "rerun the pretrain command with --resume auto to re-export it")
        return config, encoder
    if checkpoint is None:
        checkpoint = checkpoints.latest_verified(run_dir, checkpoints.log_stderr, set_aside=False)
    elif (problem := checkpoints.verify(checkpoint)) is not None:
        raise checkpoints.CheckpointError(f"checkpoint {checkpoint} is damaged ({problem})")
    if checkpoint is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet: the run never completed one")
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
