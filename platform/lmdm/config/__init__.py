"""Typed, validated configuration: schemas (``schema``) and YAML loading with overrides (``load``)."""

from lmdm.config.load import ConfigError, dump_config, load_config, parse_override, resolve_config_path
from lmdm.config.schema import (
    AudioConfig,
    AutoencoderConfig,
    Config,
    CorpusConfig,
    DataConfig,
    DiTConfig,
    EvalConfig,
    PrecomputeConfig,
    RayConfig,
    ServeConfig,
    StreamConfig,
    TextConfig,
    TrackingConfig,
    TrainConfig,
    default_config_dir,
)

__all__ = [
    "AudioConfig",
    "AutoencoderConfig",
    "Config",
    "ConfigError",
    "CorpusConfig",
    "DataConfig",
    "DiTConfig",
    "EvalConfig",
    "PrecomputeConfig",
    "RayConfig",
    "ServeConfig",
    "StreamConfig",
    "TextConfig",
    "TrackingConfig",
    "TrainConfig",
    "default_config_dir",
    "dump_config",
    "load_config",
    "parse_override",
    "resolve_config_path",
]
