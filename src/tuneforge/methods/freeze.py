"""Choose trainable parameters by name patterns (heron's keys_to_finetune / keys_to_freeze)."""

from __future__ import annotations

import re

import torch

from tuneforge.config.schema import FreezeMethod
from tuneforge.errors import MethodError


def _compile(patterns: list[str], key: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise MethodError(f"'{pattern}' is not a regular expression: {exc}", where=key) from None
    return compiled


def select_trainable(names: list[str], trainable: list[str], frozen: list[str]) -> set[str]:
    """Names that train: those matching a `trainable` pattern (all, if none given), minus `frozen`.

    Raises:
        MethodError: a pattern matches no parameter (a typo would silently change what trains).
    """
    keep = _compile(trainable, "method.trainable")
    drop = _compile(frozen, "method.frozen")
    for key, patterns in (("method.trainable", keep), ("method.frozen", drop)):
        for pattern in patterns:
            if not any(pattern.search(name) for name in names):
                sample = ", ".join(names[:6])
                raise MethodError(
                    f"pattern '{pattern.pattern}' matches no parameter",
                    where=key,
                    hint=f"patterns are regular expressions searched in names such as: {sample}",
                )
    selected = {n for n in names if not keep or any(p.search(n) for p in keep)}
    return {n for n in selected if not any(p.search(n) for p in drop)}


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder blocks: the longest ModuleList (robust across families)."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not stacks:
        raise MethodError("the model has no list of layers", where="method.last_layers")
    return max(stacks, key=len)


def preset_parameter_names(method: FreezeMethod, model: torch.nn.Module) -> set[str]:
    """Parameter names the presets (last_layers, embeddings, output_head) select."""
    owners: list[torch.nn.Module] = []
    if method.last_layers:
        layers = _decoder_layers(model)
        if method.last_layers > len(layers):
            raise MethodError(
                f"last_layers={method.last_layers} but the model has {len(layers)} layers",
                where="method.last_layers",
            )
        owners.extend(layers[-method.last_layers :])
    if method.embeddings:
        owners.append(model.get_input_embeddings())
    if method.output_head:
        head = model.get_output_embeddings()
        if head is None:
            raise MethodError("the model has no output head", where="method.output_head")
        owners.append(head)
    wanted = {id(p) for owner in owners for p in owner.parameters()}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in wanted}


def apply_freeze(method: FreezeMethod, model: torch.nn.Module) -> torch.nn.Module:
    names = [name for name, _ in model.named_parameters()]
    presets = preset_parameter_names(method, model)
    by_pattern = (
        select_trainable(names, method.trainable, []) if method.trainable else set()
    )
    selected = presets | by_pattern if (presets or method.trainable) else set(names)
    selected = selected & select_trainable(names, [], method.frozen)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in selected)
    return model


__all__ = ["apply_freeze", "preset_parameter_names", "select_trainable"]
