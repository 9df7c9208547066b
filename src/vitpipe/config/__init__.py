"""Typed configuration: dataclass schemas (``schema``), YAML files and dotted ``key=value``
overrides (``io``). The resolved config is saved with every run (``save_config``) so a run can
always be reproduced."""

from vitpipe.config.io import (
    CONFIG_KINDS, dump_yaml, from_dict, load_config, merge, parse_overrides, read_yaml, save_config, to_dict,
)
from vitpipe.config.schema import (
    MODEL_PRESETS, ConfigError, DataConfig, IngestConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig,
    check, with_section,
)

__all__ = [
    "CONFIG_KINDS", "MODEL_PRESETS", "ConfigError", "DataConfig", "IngestConfig", "ModelConfig", "OptimConfig",
    "PretrainConfig", "TrainConfig", "check", "dump_yaml", "from_dict", "load_config", "merge", "parse_overrides",
    "read_yaml", "save_config", "to_dict", "with_section",
]
