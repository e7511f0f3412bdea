"""Infer stage: use trained models (generation)."""

from tuneforge.infer.generate import LoadedModel, format_for_model, generate, load_for_inference

__all__ = ["LoadedModel", "format_for_model", "generate", "load_for_inference"]
