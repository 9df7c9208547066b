"""Reading finished or running runs: their config, artefacts and encoder, through the registry."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError, PretrainConfig
from vitpipe.ssl import registry
from vitpipe.ssl.engine import artifacts, checkpoints


def locate_run(run_or_checkpoint: Path) -> tuple[PretrainConfig, Path]:
    """(config, weights file) of a run directory (its encoder.safetensors, else its latest
    checkpoint that verifies) or of a checkpoint directory. The file is checked against the
    checksum written with it: a damaged file is an error (CheckpointError), never evaluated."""
    path, layout = Path(run_or_checkpoint), RunLayout.of(run_or_checkpoint)
    if not layout.config.is_file():
        raise ConfigError(f"{path} is neither a run directory nor a checkpoint")
    run_dir, checkpoint = layout.root, (path if layout.root != path else None)
    config = registry.run_config(layout.config)
    encoder = layout.encoder
    if checkpoint is None and encoder.is_file():
        info = json.loads(layout.info.read_text()) if layout.info.is_file() else {}
        expected = info.get("encoder_sha256")
        if expected and checkpoints.sha256_file(encoder) != expected:
            raise checkpoints.CheckpointError(f"{encoder} does not match the sha256 in run.json (damaged); "
                                              "rerun the pretrain command with --resume auto to re-export it")
        return config, encoder
    if checkpoint is None:
        checkpoint = _newest_pinned(run_dir)
    elif not checkpoints.pin(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint} was pruned by its run meanwhile")
    elif (problem := checkpoints.verify(checkpoint)) is not None:
        raise checkpoints.CheckpointError(f"checkpoint {checkpoint} is damaged ({problem})")
    return config, checkpoint / "model.safetensors"


def _newest_pinned(run_dir: Path) -> Path:
    """The newest checkpoint that verifies, pinned against its (still training) run's pruning."""
    for _ in range(10):  # a checkpoint pruned between listing and pinning: a newer one exists
        listed = checkpoints.list_checkpoints(run_dir)
        if not listed:
            raise ConfigError(f"{run_dir} has no checkpoint yet: the run never completed one")
        if not checkpoints.pin(listed[-1]):
            continue
        checkpoint = checkpoints.latest_verified(run_dir, checkpoints.log_stderr, set_aside=False)
        if checkpoint is not None and checkpoints.pin(checkpoint):  # an older one when the newest is damaged
            return checkpoint
    raise ConfigError(f"{run_dir}: its checkpoints were pruned faster than they could be read")


def checkpoint_step(weights: Path) -> int | None:
    """The training step of a checkpoint's weights file (None for an exported encoder)."""
    state = weights.parent / "state.json"
    return int(json.loads(state.read_text())["step"]) if weights.name == "model.safetensors" else None


def build_run_objective(run_or_checkpoint: Path, config: PretrainConfig | None = None, seed: int | None = None):
    """A freshly initialised objective of this run (its own schema and artefacts), ``config``
    replacing the run's when given (e.g. another drop-path rate for fine-tuning)."""
    run_dir = RunLayout.of(run_or_checkpoint).root
    config = config or registry.run_config(RunLayout(run_dir).config)
    if seed is not None:
        torch.manual_seed(seed)
    files = artifacts.load(run_dir)
    if not files and registry.get(config.objective).fit_artifacts is not None:
        raise ConfigError(f"{run_dir}/run.json is missing or records no artefacts: a {config.objective} run needs "
                          "the ones fitted before its training (RUN/artifacts/, checked against run.json)")
    return registry.build_objective(config, files)


def load_run_encoder(run_or_checkpoint: Path, config: PretrainConfig | None = None) -> tuple[nn.Module, PretrainConfig, Path]:
    """The trained encoder of a run or checkpoint (see ``locate_run``), its config and weights file."""
    from safetensors.torch import load_file

    run_config, weights = locate_run(run_or_checkpoint)
    objective = build_run_objective(run_or_checkpoint, config or run_config)
    if weights == RunLayout.of(run_or_checkpoint).encoder:
        encoder = objective.encoder()
        encoder.load_state_dict(load_file(weights))
    else:  # a checkpoint holds the whole objective; keep its encoder
        objective.load_state_dict(load_file(weights))
        encoder = objective.encoder()
    return encoder.eval(), run_config, weights


def load_run_objective(run_or_checkpoint: Path, config: PretrainConfig | None = None, seed: int | None = None,
                       trained: bool = True):
    """The whole objective (heads, decoders, text tower, not just the encoder): from the given
    checkpoint or the run's newest verified one; ``trained=False`` gives a random init of the same shape."""
    from safetensors.torch import load_file

    model = build_run_objective(run_or_checkpoint, config, seed=seed)
    if trained:
        _, weights = locate_run(run_or_checkpoint)
        checkpoint = weights.parent if weights.name == "model.safetensors" else checkpoints.latest_verified(
            RunLayout.of(run_or_checkpoint).root, checkpoints.log_stderr, set_aside=False)
        if checkpoint is None:
            raise ConfigError(f"{run_or_checkpoint}: no checkpoint holds the whole model (only its encoder was kept)")
        model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return model.eval()
