"""Load a trained run (or any causal LM) and generate from prompts formatted as in training.

    tuneforge generate runs/quickstart --prompt "Write forty two in digits."
    loaded = load_for_inference("runs/quickstart")
    generate(loaded, ["Write forty two in digits."], batch_size=8)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from tuneforge.data.images import (
    ImageInputs,
    expand_prompt,
    pixel_values,
    prompt_with_images,
)
from tuneforge.data.templates import (
    Template,
    encode_prompt_for_generation,
    resolve_template,
    template_from_metadata,
)
from tuneforge.errors import ConfigError, ModelError
from tuneforge.models.generation import generate_texts
from tuneforge.models.loading import import_custom_model
from tuneforge.models.vlm import auto_model_class, checkpoint_image_inputs
from tuneforge.train.run_dir import read_run_metadata


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    template: Template | None
    source: str
    system_prompt: str | None = None
    images: ImageInputs | None = None  # a vision-language model's


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

            base = auto_model_class(metadata["base_model"]).from_pretrained(metadata["base_model"], dtype="auto", trust_remote_code=trust)
            if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
                # Tokens added in training: the adapter holds their rows; make room for them.
                base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            model = PeftModel.from_pretrained(base, source)
        else:
            model = auto_model_class(source).from_pretrained(source, dtype="auto", trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise ModelError(
            str(exc).strip().splitlines()[0],
            where=model_or_run,
            hint="give a run directory (with model/), a saved model directory, or a hub id",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    images = None
    if model.config.to_dict().get("vision_config") is not None:
        images = checkpoint_image_inputs(metadata.get("base_model") or source, source, tokenizer, trust_remote_code=trust)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    return LoadedModel(
        model, tokenizer, _saved_template(metadata, tokenizer, source), source, metadata.get("system_prompt"), images
    )


def _saved_template(metadata: dict[str, Any], tokenizer: Any, source: str) -> Template | None:
    """The run's template; else the tokenizer's own chat template; else None (raw prompts).

    A checkpoint without `tuneforge.json` (a run's `quantized/`, a copied export, a hub chat
    model) still carries the training template as its tokenizer's chat template.
    """
    if metadata.get("template"):
        return template_from_metadata(metadata["template"])
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return resolve_template("tokenizer", tokenizer)
    except ConfigError as error:
        # Generation still works on raw prompts; say why the template is not used.
        print(f"[tuneforge] {source}: not using the tokenizer's chat template: {error.message}", file=sys.stderr)
        return None


def encode_for_model(loaded: LoadedModel, prompt: str, *, raw: bool = False, system_prompt: str | None = None) -> list[int]:
    """Prompt ids as in training: the run's template (and system prompt) around a user turn.

    `raw` skips the template; `system_prompt` replaces the one the run was trained with.
    """
    if raw or loaded.template is None:
        return list(loaded.tokenizer(prompt)["input_ids"])
    system = system_prompt if system_prompt is not None else loaded.system_prompt
    return encode_prompt_for_generation(loaded.tokenizer, loaded.template, prompt, system)


def generate(
    loaded: LoadedModel, prompts: list[str], *, raw: bool = False, system_prompt: str | None = None,
    images: list[list[str]] | None = None, **options: Any,
) -> list[str]:
    """One continuation per prompt; `options` go to `generate_texts` (sampling, `batch_size`, `streamer`)."""
    if images is not None:
        prompts = _image_prompts(loaded, prompts, images)
    ids = [encode_for_model(loaded, p, raw=raw, system_prompt=system_prompt) for p in prompts]
    if images is not None:
        assert loaded.images is not None  # checked by _image_prompts
        ids = [expand_prompt(prompt_ids, loaded.images) for prompt_ids in ids]
        options["pixel_values"] = [pixel_values(loaded.images.processor, paths) for paths in images]
    stops = loaded.template.stop_token_ids(loaded.tokenizer) if loaded.template and not raw else None
    return generate_texts(loaded.model, loaded.tokenizer, ids, stop_token_ids=stops, **options)


def _image_prompts(loaded: LoadedModel, prompts: list[str], images: list[list[str]]) -> list[str]:
    """Prompts with one image placeholder per image (`images[i]` are prompt i's image files)."""
    if loaded.images is None:
        raise ModelError(
            "images were given but this is a text-only model", where=loaded.source,
            hint="use a vision-language run or checkpoint, or leave out --image",
        )
    if len(images) != len(prompts):
        raise ModelError(f"{len(images)} image lists for {len(prompts)} prompts", where="--image")
    return [prompt_with_images(p, len(paths), loaded.images.image_token) for p, paths in zip(prompts, images)]


__all__ = ["LoadedModel", "encode_for_model", "generate", "load_for_inference"]
