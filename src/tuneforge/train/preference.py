"""Preference tuning (DPO, ORPO, KTO, SimPO) and GRPO on TRL's trainers, inside tuneforge's one training path.

    args = preference_arguments(config, training_args)          # TrainingArguments -> DPOConfig, ...
    trainer = build_preference_trainer(config, args, model, tokenizer, datasets, callbacks)

The trainers are TRL's, with tuneforge's atomic checkpoints and non-finite guard mixed in exactly
as `TuneforgeTrainer` mixes them into `Trainer`. TRL would tokenise text itself; tuneforge has
already tokenised the pairs with the run's template (`data/preference.py`), so each trainer is
told to take the ids as they are. GRPO generates from the prompts with the run's template and
stops where its turns end, and scores the completions with the user's `_target_` reward
functions. Everything else (run directory, model loading, full / freeze / LoRA / QLoRA,
callbacks, metrics.jsonl, resume, preemption) is the recipe's, shared with SFT.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import trl.trainer.grpo_trainer
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tuneforge.config.schema import (
    Component,
    Config,
    DpoMethod,
    GrpoMethod,
    KtoMethod,
    LoraMethod,
    OrpoMethod,
    PreferenceMethod,
    SimpoMethod,
    weights_method,
)
from tuneforge.config.targets import resolve_target
from tuneforge.data.build import Datasets
from tuneforge.data.templates import IGNORE_INDEX, Template
from tuneforge.errors import ConfigError
from tuneforge.train.checkpoints import AtomicCheckpointMixin
from tuneforge.train.guards import NonFiniteGuardMixin

# Reported first -> last in the run summary (with `eval_` in front for evaluation): the pair
# trainers' `rewards/<name>`; GRPO's mean and spread of the summed reward, KL to the reference
# and completion length, and each reward function's `rewards/<function>/mean`.
REWARD_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "reward", "reward_std", "kl", "completions/mean_length",
)

# What TRL's GRPO passes every reward function besides the dataset's columns.
REWARD_CALL = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


class _TokenizedPairs:
    """DPO and KTO: the dataset already holds TRL's `prompt_ids` / `chosen_ids` / ... columns."""

    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: Any, dataset_name: str) -> Dataset:
        return dataset


class _TokenizedPairRows:
    """ORPO and CPO (SimPO) tokenise row by row into prompt / chosen / rejected sequences with labels."""

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, list[int]]:
        prompt = feature["prompt_ids"]
        batch = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = feature[f"{side}_ids"]
            batch[f"{side}_input_ids"] = prompt + reply
            batch[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            batch[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
        return batch


class TuneforgeDPOTrainer(NonFiniteGuardMixin, AtomicCheckpointMixin, _TokenizedPairs, DPOTrainer):
    pass


class TuneforgeKTOTrainer(NonFiniteGuardMixin, AtomicCheckpointMixin, _TokenizedPairs, KTOTrainer):
    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: Any, dataset_name: str) -> Dataset:
        if not self.calculate_KL:
            return dataset

        # KTO's KL term pairs each prompt with another example's reply: TRL rotates the replies by
        # one within each batch (KTOTrainer._prepare_dataset), which its tokenisation step does.
        def rotate(batch: dict[str, list]) -> dict[str, list]:
            batch["KL_completion_ids"] = batch["completion_ids"][-1:] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


class TuneforgeORPOTrainer(NonFiniteGuardMixin, AtomicCheckpointMixin, _TokenizedPairRows, ORPOTrainer):
    pass


class TuneforgeCPOTrainer(NonFiniteGuardMixin, AtomicCheckpointMixin, _TokenizedPairRows, CPOTrainer):
    pass


@contextlib.contextmanager
def _reference_from(reference: torch.nn.Module | None) -> Iterator[None]:
    """While GRPOTrainer is built, its reference model is `reference`.

    With a KL term and no adapter TRL loads the reference from the model's name or path, which
    holds other weights than the run's starting point when the model was built at random, by a
    `builder`, or grew new token rows. That load is the trainer's only call of
    `create_model_from_path` for a model given as an object.
    """
    if reference is None:
        yield
        return
    load = trl.trainer.grpo_trainer.create_model_from_path
    trl.trainer.grpo_trainer.create_model_from_path = lambda *args, **kwargs: reference
    try:
        yield
    finally:
        trl.trainer.grpo_trainer.create_model_from_path = load


class TuneforgeGRPOTrainer(NonFiniteGuardMixin, AtomicCheckpointMixin, GRPOTrainer):
    """GRPO that prompts and stops as the run's `template` says; `reference`: see `_reference_from`."""

    def __init__(self, *args: Any, template: Template, reference: torch.nn.Module | None = None, **kwargs: Any) -> None:
        model, tokenizer = kwargs["model"], kwargs["processing_class"]
        # TRL renders the conversational `prompt` with the tokenizer's chat template; the run's
        # template there makes those ids encode_generation_prompt's (the dataset's `prompt_ids`),
        # as the exported tokenizer has it too.
        tokenizer.chat_template = template.chat_template
        # A completion ends at the model's EOS ids: the template's end of turn, where generation
        # after training stops as well.
        model.generation_config.eos_token_id = template.stop_token_ids(tokenizer)
        with _reference_from(reference):
            super().__init__(*args, **kwargs)


def _method_arguments(method: PreferenceMethod) -> tuple[type, type, dict[str, Any]]:
    """The trainer class, its TRL config class and the method's fields in TRL's names."""
    if isinstance(method, DpoMethod):
        return TuneforgeDPOTrainer, DPOConfig, {
            "beta": method.beta, "loss_type": list(method.loss_type), "loss_weights": method.loss_weights,
            "label_smoothing": method.label_smoothing,
            "precompute_ref_log_probs": method.reference == "precompute",
        }
    if isinstance(method, KtoMethod):
        return TuneforgeKTOTrainer, KTOConfig, {
            "beta": method.beta, "desirable_weight": method.desirable_weight,
            "undesirable_weight": method.undesirable_weight,
            "precompute_ref_log_probs": method.reference == "precompute",
            # The KL term pairs neighbouring examples, so KTO reads them in order (shuffled once
            # by build_preference_datasets).
            "train_sampling_strategy": "sequential",
        }
    if isinstance(method, OrpoMethod):
        return TuneforgeORPOTrainer, ORPOConfig, {"beta": method.beta}
    if isinstance(method, SimpoMethod):
        # SimPO is CPO's `simpo` loss without CPO's behaviour-cloning term (cpo_alpha 0).
        return TuneforgeCPOTrainer, CPOConfig, {
            "beta": method.beta, "simpo_gamma": method.gamma, "loss_type": "simpo", "cpo_alpha": 0.0,
        }
    if isinstance(method, GrpoMethod):
        return TuneforgeGRPOTrainer, GRPOConfig, {
            "beta": method.beta, "num_generations": method.num_generations,
            "max_completion_length": method.max_completion_length, "temperature": method.temperature,
            "reward_weights": method.reward_weights,
            # The dataset's other columns go to the reward functions.
            "remove_unused_columns": False,
            # Batches are prompts, not token ids; GRPO counts prompt and completion tokens itself.
            "include_num_input_tokens_seen": "no",
        }
    raise TypeError(f"not a preference method: {type(method).__name__}")


def preference_arguments(config: Config, args: TrainingArguments) -> TrainingArguments:
    """The validated `train` section as the TRL config of the method (`DPOConfig`, ...).

    Every `TrainingArguments` value is carried over as tuneforge resolved it, so TRL's own
    defaults (gradient checkpointing on, bf16, learning rate 1e-6) do not silently differ from
    an SFT run of the same config. Sequences are already cut to `data.max_length`.
    """
    method: PreferenceMethod = config.method  # type: ignore[assignment]
    _, config_class, method_fields = _method_arguments(method)
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainingArguments) if field.init}
    if isinstance(method, GrpoMethod):
        # Prompts were cut to data.max_length - max_completion_length when the data was built.
        _check_groups(method, args)
    else:
        method_fields["max_length"] = config.data.max_length
    return config_class(**{**values, **method_fields})


def _check_groups(method: GrpoMethod, args: TrainingArguments) -> None:
    """Every optimizer step must see whole groups of completions of one prompt (TRL's rule, named here)."""
    completions = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    if completions % method.num_generations:
        raise ConfigError(
            f"each optimizer step takes {completions} completions (per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x {args.world_size} process(es) x gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps}), not a multiple of num_generations {method.num_generations}",
            where="method.num_generations",
            hint="make train.per_device_train_batch_size (or gradient_accumulation_steps) a multiple of "
            "num_generations, or change num_generations",
        )


def _reference_model(method: PreferenceMethod, model: torch.nn.Module) -> torch.nn.Module | None:
    """A frozen copy of the starting weights when the method needs one and nothing else can serve.

    LoRA needs none (TRL switches the adapters off, or for GRPO copies the fresh adapter), nor do
    precomputed log-probabilities (computed from the policy before it trains), nor ORPO and SimPO
    (reference-free), nor GRPO without its KL term (`beta` 0).
    """
    if isinstance(method, GrpoMethod):
        needed = method.beta > 0
    else:
        needed = isinstance(method, (DpoMethod, KtoMethod)) and method.reference != "precompute"
    if not needed or isinstance(weights_method(method), LoraMethod):
        return None
    reference = _zero3_copy(model) if is_deepspeed_zero3_enabled() else copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _zero3_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a model that DeepSpeed ZeRO-3 partitioned while it loaded.

    `copy.deepcopy` would copy each rank's empty parameter tensors and DeepSpeed's bookkeeping
    (the same parameter ids), not the weights. The copy is built partitioned like the model
    (transformers builds under `deepspeed.zero.Init` here) and filled one gathered parameter at a
    time, so no rank ever holds the whole model.
    """
    import deepspeed

    reference = type(model)._from_config(model.config, dtype=model.dtype)
    targets = dict(reference.named_parameters())
    for name, source in model.named_parameters():
        target = targets[name]
        with deepspeed.zero.GatheredParameters([source]), deepspeed.zero.GatheredParameters([target], modifier_rank=0):
            target.data.copy_(source.data)  # rank 0's copy is partitioned to every rank on leaving
    return reference


def _checked_target(component: Component, key: str, columns: list[str]) -> Callable[..., Any]:
    """The component's function or class, once it is known to take its keys and GRPO's call.

    A function gets the component's other keys bound as keyword arguments; a class is
    instantiated with them and its instances are the reward.

    Raises:
        ConfigError: it cannot be imported, does not take its keys, or its reward cannot be called
            with what GRPO passes (names the `method.rewards.<i>` entry).
    """
    target = resolve_target(component, key)
    try:
        if inspect.isclass(target):
            inspect.signature(target).bind(**component.kwargs)
            # Read off the class, so checking instantiates nothing (a reward may load a model).
            call = inspect.signature(target.__call__)
            call = call.replace(parameters=list(call.parameters.values())[1:])  # without self
        else:
            inspect.signature(target).bind_partial(**component.kwargs)
            call = inspect.signature(functools.partial(target, **component.kwargs))
    except TypeError as error:
        raise ConfigError(
            f"'{component.target}' does not take the keys given next to _target_: {error}",
            where=key,
            hint="those keys are passed to it as keyword arguments",
        ) from None
    passed = [name for name in columns if name != "prompt"]  # TRL passes the prompt as `prompts`
    try:
        call.bind(**dict.fromkeys([*REWARD_CALL, *passed], []))
    except TypeError as error:
        raise ConfigError(
            f"'{component.target}' cannot be called as a reward: {error}",
            where=key,
            hint=f"GRPO calls it with keyword arguments {', '.join(REWARD_CALL)} and the dataset's columns "
            f"({', '.join(passed)}); take what it needs and **kwargs for the rest",
        ) from None
    return target


def check_rewards(method: GrpoMethod, columns: list[str]) -> None:
    """`reward_functions`' checks alone, without instantiating anything: run before the model loads."""
    for index, component in enumerate(method.rewards):
        _checked_target(component, f"method.rewards.{index}", columns)


def reward_functions(method: GrpoMethod, columns: list[str]) -> list[Callable[..., Any]]:
    """The `rewards` components as the callables TRL calls, for a dataset with these `columns`."""
    rewards = []
    for index, component in enumerate(method.rewards):
        target = _checked_target(component, f"method.rewards.{index}", columns)
        if inspect.isclass(target):
            rewards.append(target(**component.kwargs))
        else:
            rewards.append(functools.partial(target, **component.kwargs))
    return rewards


def _trainer_inputs(method: PreferenceMethod, model: torch.nn.Module, datasets: Datasets) -> dict[str, Any]:
    """What the method's trainer takes besides the model, data and arguments they all take."""
    if isinstance(method, GrpoMethod):
        return {
            "reward_funcs": reward_functions(method, datasets.train.column_names),
            "template": datasets.template,
            "reference": _reference_model(method, model),
        }
    if isinstance(method, (DpoMethod, KtoMethod)):
        return {"ref_model": _reference_model(method, model)}
    return {}


def build_preference_trainer(
    config: Config, args: TrainingArguments, model: Any, tokenizer: Any, datasets: Datasets,
    callbacks: list[TrainerCallback],
) -> Any:
    """The method's TRL trainer on tuneforge's tokenised data, model and callbacks."""
    method: PreferenceMethod = config.method  # type: ignore[assignment]
    trainer_class, _, _ = _method_arguments(method)
    return trainer_class(
        max_nonfinite_steps=config.guards.max_nonfinite_steps,
        model=model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        **_trainer_inputs(method, model, datasets),
    )


def _reported(key: str) -> bool:
    name = key.removeprefix("eval_")
    return name in REWARD_METRICS or (name.startswith("rewards/") and name.endswith("/mean"))


def preference_report(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """First and last logged reward metrics (training and evaluation), for the run summary.

    E.g. `{"rewards/margins": {"first": 0.01, "last": 0.9}, "eval_rewards/accuracies": {...}}`,
    or for GRPO `{"reward": ..., "rewards/short_reply/mean": ..., "kl": ...}`.
    """
    keys = dict.fromkeys(key for entry in log_history for key in entry if _reported(key))
    report: dict[str, Any] = {}
    for key in keys:
        # GRPO logs None for a metric no reward scored in that window.
        values = [float(entry[key]) for entry in log_history if entry.get(key) is not None]
        if values:
            report[key] = {"first": round(values[0], 6), "last": round(values[-1], 6)}
    return report


__all__ = [
    "REWARD_METRICS",
    "TuneforgeCPOTrainer",
    "TuneforgeDPOTrainer",
    "TuneforgeGRPOTrainer",
    "TuneforgeKTOTrainer",
    "TuneforgeORPOTrainer",
    "build_preference_trainer",
    "check_rewards",
    "preference_arguments",
    "preference_report",
    "reward_functions",
]
