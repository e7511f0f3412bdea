"""Load a trained run (or any causal LM) and generate from prompts formatted as in training.

    tuneforge generate runs/quickstart --prompt "Write forty two in digits."
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.data.templates import (
    Template,
    encode_prompt_for_generation,
    template_from_metadata,
)
from tuneforge.errors import ModelError
from tuneforge.models.generation import generate_texts
from tuneforge.models.loading import import_custom_model
from tuneforge.train.run_dir import read_run_metadata


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    template: Template | None
    source: str
    system_prompt: str | None = None


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
    if metadata.get("model_class"):
        import_custom_model(metadata["model_class"])  # the user's own class, named in their config
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        if metadata.get("adapter"):
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(metadata["base_model"], dtype="auto", trust_remote_code=trust)
            if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
                # Tokens added in training: the adapter holds their rows; make room for them.
                base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
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
    template = template_from_metadata(metadata["template"]) if metadata.get("template") else None
    return LoadedModel(model, tokenizer, template, source, metadata.get("system_prompt"))


def encode_for_model(loaded: LoadedModel, prompt: str, *, raw: bool = False, system_prompt: str | None = None) -> list[int]:
    """Prompt ids as in training: the run's template (and system prompt) around a user turn.

    `raw` skips the template; `system_prompt` replaces the one the run was trained with.
    """
    if raw or loaded.template is None:
        return list(loaded.tokenizer(prompt)["input_ids"])
    system = system_prompt if system_prompt is not None else loaded.system_prompt
    return encode_prompt_for_generation(loaded.tokenizer, loaded.template, prompt, system)


def generate(
    loaded: LoadedModel, prompts: list[str], *, raw: bool = False, system_prompt: str | None = None, **options: Any
) -> list[str]:
    ids = [encode_for_model(loaded, p, raw=raw, system_prompt=system_prompt) for p in prompts]
    stops = loaded.template.stop_token_ids(loaded.tokenizer) if loaded.template and not raw else None
    return generate_texts(loaded.model, loaded.tokenizer, ids, stop_token_ids=stops, **options)


__all__ = ["LoadedModel", "encode_for_model", "generate", "load_for_inference"]
