"""Models stage: load Hugging Face models and tokenizers as the config says; generate."""

from tuneforge.models.generation import generate_texts
from tuneforge.models.loading import (
    check_remote_code,
    load_model,
    load_model_config,
    load_tokenizer,
    resolve_dtype,
)

__all__ = [
    "check_remote_code",
    "generate_texts",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "resolve_dtype",
]
