"""Optimizers tuneforge adds to transformers' `train.optim` names.

transformers' `optim` covers AdamW (fused), Adafactor, the 8-bit optimizers and more, but not
LAMB. A name listed in `OPTIMIZERS` is accepted in `train.optim` next to transformers' own; its
class comes from a maintained package (an optional extra) and reaches the Trainer through
`optimizer_cls_and_kwargs`, so transformers still builds the parameter groups (no weight decay
on biases and norms) and the learning-rate schedule:

    train:
      optim: lamb     # pytorch_optimizer.Lamb: learning_rate, adam_beta1/2, adam_epsilon, weight_decay
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneforge.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from tuneforge.config.schema import Config


@dataclass(frozen=True)
class PackagedOptimizer:
    module: str
    class_name: str
    extra: str  # the tuneforge extra that installs `module`
    summary: str  # one line for docs/configuration.md


OPTIMIZERS: dict[str, PackagedOptimizer] = {
    "lamb": PackagedOptimizer(
        "pytorch_optimizer", "Lamb", "optimizers",
        "LAMB, Adam moments with a per-tensor trust ratio, from pytorch_optimizer",
    ),
}

# `TrainingArguments` accepts only transformers' names, so one of those stands in for tuneforge's.
# It is never used: Trainer.create_optimizer takes `optimizer_cls_and_kwargs` over `args.optim`.
STAND_IN = "adamw_torch"


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of one of tuneforge's optimizers, imported from its package."""
    spec = OPTIMIZERS[name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ConfigError(
            f"optimizer '{name}' comes from the {spec.module} package, which cannot be imported ({exc})",
            where="train.optim",
            hint=f'pip install "tuneforge[{spec.extra}]"',
        ) from None
    return getattr(module, spec.class_name)


def check_optimizer(config: Config) -> None:
    """Fail when the config loads, not after the model is loaded, when `train.optim` cannot run."""
    # Imported here: schema imports this module (through training_args) while it initialises.
    from tuneforge.config.schema import PreferenceMethod

    name = config.train.optim
    if name not in OPTIMIZERS:
        return
    if isinstance(config.method, PreferenceMethod):
        raise ConfigError(
            f"optimizer '{name}' is not available with method '{config.method.name}': TRL's preference "
            "trainers take no optimizer class",
            where="train.optim",
            hint="use one of transformers' optimizers (e.g. adamw_torch) with preference methods",
        )
    if config.train.optim_args:
        raise ConfigError(
            f"optim_args is read only by transformers' own optimizers, not by '{name}'",
            where="train.optim_args",
            hint=f"'{name}' is set by learning_rate, adam_beta1, adam_beta2, adam_epsilon and weight_decay; "
            "remove optim_args",
        )
    if config.distributed.strategy == "deepspeed" and config.distributed.offload_optimizer:
        raise ConfigError(
            f"optimizer '{name}' cannot step under ZeRO-Offload, which uses DeepSpeed's CPU Adam",
            where="train.optim",
            hint="set distributed.offload_optimizer: false, or use optim: adamw_torch",
        )
    _optimizer_class(name)


def optimizer_cls_and_kwargs(name: str, args: TrainingArguments) -> tuple[type, dict[str, Any]] | None:
    """The Trainer's `optimizer_cls_and_kwargs` for `train.optim`; None for transformers' names.

    Weight decay is not among the kwargs: transformers puts `args.weight_decay` in the decay
    group and 0 in the group of biases and norms, as it does for its own AdamW.
    """
    if name not in OPTIMIZERS:
        return None
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return _optimizer_class(name), kwargs


__all__ = ["OPTIMIZERS", "STAND_IN", "check_optimizer", "optimizer_cls_and_kwargs"]
