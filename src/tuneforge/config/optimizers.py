"""Optimizers tuneforge adds to transformers' `train.optim` names.

transformers' `optim` covers AdamW (fused), Adafactor, the 8-bit optimizers and more, but not
LAMB, nor AdamW with stochastic rounding of bf16 weights. A name listed in `OPTIMIZERS` is accepted in `train.optim` next to transformers' own; its
class comes from a maintained package (an optional extra) and reaches the Trainer through
`optimizer_cls_and_kwargs`, so transformers still builds the parameter groups (no weight decay
on biases and norms) and the learning-rate schedule:

    train:
      optim: lamb     # pytorch_optimizer.Lamb: learning_rate, adam_beta1/2, adam_epsilon, weight_decay
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
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
    options: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments of the class


OPTIMIZERS: dict[str, PackagedOptimizer] = {
    "lamb": PackagedOptimizer(
        "pytorch_optimizer", "Lamb", "optimizers",
        "LAMB, Adam moments with a per-tensor trust ratio, from pytorch_optimizer",
    ),
    # Full fine-tuning in bf16 without fp32 master weights: round-to-nearest drops every update
    # smaller than half of bf16's spacing (lr 1e-5 on a weight of 0.02), stochastic rounding
    # keeps them in expectation. Moments stay in the weights' dtype, as torch's AdamW keeps them.
    "adamw_bf16_sr": PackagedOptimizer(
        "torchao.optim", "_AdamW", "optimizers",
        "AdamW computed in fp32 that writes bf16 weights with stochastic rounding, so updates smaller than "
        "bf16's spacing are kept in expectation: full fine-tuning in bf16 close to fp32 master weights "
        "at half their memory; from torchao, each tensor's step compiled with torch.compile",
        options={"bf16_stochastic_round": True},
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
    return _optimizer_class(name), {**kwargs, **OPTIMIZERS[name].options}


__all__ = ["OPTIMIZERS", "STAND_IN", "check_optimizer", "optimizer_cls_and_kwargs"]
