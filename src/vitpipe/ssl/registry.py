"""Objective names -> builders. Adding an objective = one new file + one line here."""

from __future__ import annotations

from typing import Callable

from vitpipe.config import ConfigError, PretrainConfig
from vitpipe.ssl.classify import Classifier
from vitpipe.ssl.mae import MAE
from vitpipe.ssl.objective import Objective
from vitpipe.ssl.vit import ViTArgs, VisionTransformer


def build_encoder(config: PretrainConfig) -> VisionTransformer:
    return VisionTransformer(ViTArgs.from_config(config.model, config.data.image_size, config.data.channels))


def _mae(config: PretrainConfig) -> Objective:
    return MAE(build_encoder(config), config.mae)


def _classify(config: PretrainConfig) -> Objective:
    return Classifier(build_encoder(config), config.finetune)


OBJECTIVES: dict[str, Callable[[PretrainConfig], Objective]] = {
    "mae": _mae,
    "classify": _classify,
}


def build_objective(config: PretrainConfig) -> Objective:
    if config.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {config.objective!r}; available: {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[config.objective](config)
    except ValueError as err:  # shape mismatches found while building (e.g. image vs patch size)
        raise ConfigError(str(err)) from None
