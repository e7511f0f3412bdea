"""Load the model and tokenizer a `model` config section names.

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)

Library errors users often hit (custom code without `trust_remote_code`, an unknown
architecture, a missing checkpoint) are re-raised as `ModelError`s that say what to do.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from tuneforge.config.schema import ModelConfig
from tuneforge.config.targets import instantiate
from tuneforge.errors import ModelError
from tuneforge.models.parameters import embedding_rows
from tuneforge.models.quantized_experts import quantize_fused_experts
from tuneforge.models.vlm import assemble_vlm, is_vlm_config

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(config: ModelConfig) -> torch.dtype | str:
    """The dtype to load weights in; `auto` keeps a checkpoint's own dtype."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if config.init == "pretrained":
        return "auto"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _custom_code_files(path: str) -> list[str]:
    directory = Path(path)
    return sorted(p.name for p in directory.glob("*.py")) if directory.is_dir() else []


def _is_builtin_model_type(model_type: Any) -> bool:
    """transformers implements it (a type a user registered in this process does not count)."""
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return False
    return CONFIG_MAPPING[model_type].__module__.startswith("transformers.")


def check_remote_code(config: ModelConfig) -> None:
    """Refuse a checkpoint that needs its own Python code unless `trust_remote_code` is set."""
    if config.trust_remote_code:
        return
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(config.path, revision=config.revision)
    except OSError as exc:
        raise ModelError(
            f"cannot find a model config: {exc}",
            where=f"model.path={config.path}",
            hint="give a local directory with config.json, or a hub id (needs network or a "
            "filled Hugging Face cache)",
        ) from None
    # Hub checkpoints often name their own code although transformers implements the
    # model_type itself; without trust_remote_code transformers uses its own classes then.
    # A composite VLM (models/vlm.py) carries its language model's code in text_config.
    needs_code = "auto_map" in config_dict or "auto_map" in (config_dict.get("text_config") or {})
    if needs_code and not _is_builtin_model_type(config_dict.get("model_type")):
        files = _custom_code_files(config.path)
        listed = f" ({', '.join(files)})" if files else ""
        raise ModelError(
            f"this checkpoint needs its own Python code{listed} to build the model, "
            "and running it is off by default",
            where=f"model.path={config.path}",
            hint="read that code, then set model.trust_remote_code: true "
            "(or pass model.trust_remote_code=true)",
        )


def check_quantization_support(config: ModelConfig) -> None:
    """Fail before anything is loaded when quantized loading cannot work here."""
    if config.quantization == "none":
        return
    if not torch.cuda.is_available():
        raise ModelError(
            f"{config.quantization} loading runs on CUDA GPUs (bitsandbytes), and this machine has none",
            where=f"model.quantization={config.quantization}",
            hint="set model.quantization: none (LoRA in bf16/fp32), or run on a GPU machine",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            "bitsandbytes is not installed",
            where=f"model.quantization={config.quantization}",
            hint='pip install "tuneforge[gpu]"',
        ) from None


def quantization_config(config: ModelConfig) -> BitsAndBytesConfig | None:
    if config.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _configure_moe(model_config: PretrainedConfig, config: ModelConfig) -> None:
    """MoE models add the router load-balancing loss only when asked to return router logits."""
    text_config = model_config.get_text_config()
    if not hasattr(text_config, "output_router_logits"):
        return
    # LLaVA's outputs have no place for router logits, so a VLM's MoE trains without router loss.
    text_config.output_router_logits = config.moe_aux_loss and not is_vlm_config(model_config)
    if config.moe_aux_loss_coef is not None:
        text_config.router_aux_loss_coef = config.moe_aux_loss_coef


def is_moe(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config.get_text_config(), "output_router_logits")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(config: ModelConfig) -> None:
    """For a local checkpoint: weights exist, and are safetensors unless pickle is allowed."""
    directory = Path(config.path)
    if config.init != "pretrained" or config.builder is not None or not directory.is_dir():
        return
    safetensors = sorted(p.name for p in directory.glob("*.safetensors"))
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if not safetensors and not pickled:
        raise ModelError(
            "the directory has a config but no weights",
            where=f"model.path={config.path}",
            hint="for fresh random weights set model.init: random",
        )
    if not safetensors and not config.allow_pickle_weights:
        raise ModelError(
            f"the weights are pickle files ({', '.join(pickled)}), which can run code when loaded",
            where=f"model.path={config.path}",
            hint="convert them to safetensors, or set model.allow_pickle_weights: true if you trust them",
        )


def preflight(config: ModelConfig) -> None:
    """Everything that can be checked about the model without loading weights."""
    check_quantization_support(config)
    if config.builder is None:
        check_remote_code(config)
        check_weight_files(config)


def load_model_config(config: ModelConfig) -> PretrainedConfig:
    check_remote_code(config)
    try:
        model_config = AutoConfig.from_pretrained(
            config.path,
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            **config.config_overrides,
        )
    except ValueError as exc:
        raise ModelError(
            str(exc).splitlines()[0],
            where=f"model.path={config.path}",
            hint="this transformers release may not know the architecture: upgrade "
            "transformers, or set trust_remote_code for checkpoints that ship code",
        ) from None
    _configure_moe(model_config, config)
    return model_config


def register_custom_model(model: torch.nn.Module) -> str | None:
    """Make a builder's own `PreTrainedModel` class loadable through the Auto classes.

    Returns the class's dotted path (saved with the run, so `generate` can register it again),
    or None for built-in architectures and plain modules.
    """
    if not isinstance(model, PreTrainedModel):
        return None
    if type(model).__module__.startswith("transformers."):
        return None  # a transformers architecture: the Auto classes know it already
    config_class = type(model.config)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, type(model), exist_ok=True)
    return f"{type(model).__module__}.{type(model).__qualname__}"


def import_custom_model(dotted: str) -> None:
    """Import and register a model class recorded by `register_custom_model`."""
    module_name, _, class_name = dotted.rpartition(".")
    try:
        model_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(
            f"the run was trained with the model class '{dotted}', which cannot be imported: {exc}",
            where="model.builder",
            hint="run from the folder that holds its module, or install it",
        ) from None
    AutoConfig.register(model_class.config_class.model_type, model_class.config_class, exist_ok=True)
    AutoModelForCausalLM.register(model_class.config_class, model_class, exist_ok=True)


def _local_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_model(config: ModelConfig) -> torch.nn.Module:
    """Build the causal LM: a `_target_` builder, fresh random weights, or a pretrained checkpoint."""
    if config.builder is not None:
        model = instantiate(config.builder, "model.builder")
        if not isinstance(model, torch.nn.Module):
            raise ModelError(
                f"'{config.builder.target}' returned {type(model).__name__}, expected a torch module",
                where="model.builder",
            )
        return model
    if config.vision is not None:
        language_model = load_model(config.model_copy(update={"vision": None}))
        return assemble_vlm(config, language_model, resolve_dtype(config))
    check_quantization_support(config)
    check_weight_files(config)
    model_config = load_model_config(config)
    # A VLM checkpoint (LLaVA, or a run's stage-1 output) loads as image-text-to-text.
    auto_class = AutoModelForImageTextToText if is_vlm_config(model_config) else AutoModelForCausalLM
    dtype = resolve_dtype(config)
    extra: dict[str, Any] = {}
    if config.quantization != "none":
        if config.init == "random":
            raise ModelError(
                "quantized loading needs saved weights; random init builds them in memory",
                where="model.init=random",
                hint="save the random model first (save_pretrained), then load it with init: pretrained",
            )
        extra["quantization_config"] = quantization_config(config)
        dtype = torch.bfloat16 if dtype == "auto" else dtype
        if config.quantize_via_cpu:
            extra["device_map"] = "cpu"  # bitsandbytes quantizes the linear layers on the CPU
    if config.attn_implementation is not None:
        extra["attn_implementation"] = config.attn_implementation
    try:
        if config.init == "random":
            # Built where it will train: an 8B model takes minutes to initialise on a CPU, seconds on a GPU.
            with torch.device(_local_device()):
                return auto_class.from_config(
                    model_config, dtype=dtype, trust_remote_code=config.trust_remote_code, **extra
                )
        model = auto_class.from_pretrained(
            config.path,
            config=model_config,
            dtype=dtype,
            # Pickle weights can execute code on load: only when the user allowed them.
            use_safetensors=None if config.allow_pickle_weights else True,
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            **extra,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(
            str(exc).strip().splitlines()[0],
            where=f"model.path={config.path}",
            hint="for a config-only directory (no weights) set model.init: random",
        ) from None
    if config.quantization == "4bit":
        # bitsandbytes quantized the linear layers; fused MoE experts (3-D) are stored as NF4 here.
        device = _local_device() if config.quantize_via_cpu else None
        stored = quantize_fused_experts(model, device=device)
        if stored:
            print(f"[tuneforge] 4-bit: {stored} fused MoE expert weights stored as NF4 (frozen)", flush=True)
        if device is not None:
            model.to(device)  # bitsandbytes moves its packed weights with their quantization state
            model.hf_device_map = {"": device.index if device.type == "cuda" else device.type}
    return model


def load_tokenizer(config: ModelConfig) -> Any:
    """The tokenizer, with a pad token: the EOS (safe: padding is masked by position), else UNK."""
    source = config.tokenizer or config.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the tokenizer: {str(exc).strip().splitlines()[0]}",
            where=f"model.tokenizer={source}",
            hint="set model.tokenizer to a directory or hub id that has tokenizer files",
        ) from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(
                "the tokenizer has no pad, eos or unk token to pad batches with",
                where=f"model.tokenizer={source}",
            )
        tokenizer.pad_token = fallback
        logger.info("tokenizer has no pad token; padding with %r (masked by position)", fallback)
    if config.new_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": config.new_special_tokens})
    tokenizer.padding_side = "right"
    return tokenizer


def add_new_token_rows(model: torch.nn.Module, tokenizer: Any, config: ModelConfig) -> list[int]:
    """Resize the embeddings for `new_special_tokens`; returns the ids whose rows must train."""
    if not config.new_special_tokens:
        return []
    ids = tokenizer.convert_tokens_to_ids(config.new_special_tokens)
    if len(tokenizer) > embedding_rows(model):
        # Mean of the old rows: new tokens start as an "average" token, not as noise.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return list(ids)


__all__ = [
    "add_new_token_rows",
    "check_quantization_support",
    "check_remote_code",
    "check_weight_files",
    "import_custom_model",
    "is_moe",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "preflight",
    "quantization_config",
    "register_custom_model",
    "resolve_dtype",
]
