"""LoRA adapters through peft."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from tuneforge.config.schema import LoraMethod
from tuneforge.errors import MethodError
from tuneforge.methods.fused_lora import install_fused_lora


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    return None


def trainable_token_targets(model: torch.nn.Module, token_ids: list[int]) -> dict[str, list[int]]:
    """Embedding modules whose rows for `token_ids` must train: the input embeddings, and the
    output head too when it is not tied to them (or the new tokens could never be predicted)."""
    targets = {}
    embeddings = _module_name(model, model.get_input_embeddings())
    if embeddings:
        targets[embeddings] = list(token_ids)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_name = _module_name(model, head)
    if head_name and not tied:
        targets[head_name] = list(token_ids)
    return targets


def build_lora_config(method: LoraMethod, trainable_tokens: dict[str, list[int]] | None = None) -> LoraConfig:
    return LoraConfig(
        r=method.r,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=method.target_modules,
        bias=method.bias,
        modules_to_save=method.modules_to_save or None,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
        rank_pattern=dict(method.rank_pattern),
        alpha_pattern=dict(method.alpha_pattern),
        # New tokens' embedding rows train and are saved with the adapter, not the whole matrix.
        trainable_token_indices=trainable_tokens or None,
        task_type="CAUSAL_LM",
    )


def apply_lora(
    method: LoraMethod,
    model: torch.nn.Module,
    *,
    new_token_ids: list[int] | None = None,
    gradient_checkpointing: bool = False,
    fused: bool = False,
) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters; `fused`: their forward is `install_fused_lora`'s."""
    if getattr(model, "is_quantized", False):
        # QLoRA. Not peft's prepare_model_for_kbit_training: it also casts every bf16 weight
        # (embeddings, output head, norms) to fp32, which costs 4 GiB on an 8B model and turns the
        # activations after each norm into fp32 (measured: 40 GiB peak instead of 25 at micro-batch
        # 2). Norms compute in fp32 internally anyway; only the frozen base and input grads are kept.
        model.requires_grad_(False)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    try:
        tokens = trainable_token_targets(model, new_token_ids) if new_token_ids else None
        model = get_peft_model(model, build_lora_config(method, tokens))
    except ValueError as exc:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise MethodError(
            str(exc).splitlines()[0],
            where="method.target_modules",
            hint=f"this model's linear layers are named: {', '.join(linear)}; or use all-linear",
        ) from None
    if fused:
        install_fused_lora(model)
    return model


__all__ = ["apply_lora", "build_lora_config", "trainable_token_targets"]
