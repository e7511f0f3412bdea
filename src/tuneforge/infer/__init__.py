"""Infer stage: use trained models (generation)."""

from tuneforge.infer.generate import (
    LoadedModel,
    encode_for_model,
    generate,
    load_for_inference,
)

__all__ = ["LoadedModel", "encode_for_model", "generate", "load_for_inference"]
