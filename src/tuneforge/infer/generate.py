"""Load a trained run (or any causal LM) and generate from prompts formatted as in training.

    tuneforge generate runs/quickstart --prompt "Write forty two in digits."
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.errors import ModelError
from tuneforge.models.generation import generate_texts
from tuneforge.train.run_dir import read_run_metadata


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    prompt_template: str | None
    source: str


def _model_dir(model_or_run: str) -> Path | None:
    path = Path(model_or_run)
    if (path / "model").is_dir():
        return path / "model"  # a run directory
    return path if path.is_dir() else None


def load_for_inference(model_or_run: str, *, trust_remote_code: bool = False, device: str | None = None) -> LoadedModel:
    """A run directory, a saved model directory, or a hub id, ready to generate.

    An adapter run loads its base model (recorded in `tuneforge.json`) with the adapter on top.
    """
    directory = _model_dir(model_or_run)
    metadata = read_run_metadata(directory) if directory is not None else {}
    source = str(directory) if directory is not None else model_or_run
    trust = trust_remote_code or bool(metadata.get("trust_remote_code"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        if metadata.get("adapter"):
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(metadata["base_model"], dtype="auto", trust_remote_code=trust)
            model = PeftModel.from_pretrained(base, source)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise ModelError(
            str(exc).strip().splitlines()[0],
            where=model_or_run,
            hint="give a run directory (with model/), a saved model directory, or a hub id",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    return LoadedModel(model, tokenizer, metadata.get("prompt_template"), source)


def format_for_model(loaded: LoadedModel, prompt: str, raw: bool = False) -> str:
    """Apply the template the run was trained with (unless `raw`)."""
    if raw or not loaded.prompt_template:
        return prompt
    return loaded.prompt_template.replace("{prompt}", prompt)


def generate(
    loaded: LoadedModel, prompts: list[str], *, raw: bool = False, **options: Any
) -> list[str]:
    return generate_texts(
        loaded.model, loaded.tokenizer, [format_for_model(loaded, p, raw) for p in prompts], **options
    )


__all__ = ["LoadedModel", "format_for_model", "generate", "load_for_inference"]
