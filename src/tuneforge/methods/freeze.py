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


def apply_freeze(method: FreezeMethod, model: torch.nn.Module) -> torch.nn.Module:
    names = [name for name, _ in model.named_parameters()]
    selected = select_trainable(names, method.trainable, method.frozen)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in selected)
    return model


__all__ = ["apply_freeze", "select_trainable"]
