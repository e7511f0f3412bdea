"""Config stage: the schema, YAML loading with overrides, and `_target_` components."""

from tuneforge.config.loading import dump_config, load_config, parse_override
from tuneforge.config.schema import (
    Component,
    Config,
    DataConfig,
    DatasetSpec,
    FreezeMethod,
    FullMethod,
    LoraMethod,
    ModelConfig,
    OutputConfig,
    SamplesConfig,
)
from tuneforge.config.targets import instantiate, resolve_target

__all__ = [
    "Component",
    "Config",
    "DataConfig",
    "DatasetSpec",
    "FreezeMethod",
    "FullMethod",
    "LoraMethod",
    "ModelConfig",
    "OutputConfig",
    "SamplesConfig",
    "dump_config",
    "instantiate",
    "load_config",
    "parse_override",
    "resolve_target",
]
