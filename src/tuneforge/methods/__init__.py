"""Methods stage: turn a loaded model into a trainable one (full, freeze, LoRA)."""

from tuneforge.methods.freeze import apply_freeze, select_trainable
from tuneforge.methods.lora import apply_lora, build_lora_config
from tuneforge.methods.prepare import ParameterCounts, count_parameters, prepare_model

__all__ = [
    "ParameterCounts",
    "apply_freeze",
    "apply_lora",
    "build_lora_config",
    "count_parameters",
    "prepare_model",
    "select_trainable",
]
