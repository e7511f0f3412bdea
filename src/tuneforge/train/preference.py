"""Preference tuning (DPO, ORPO, KTO, SimPO) on TRL's trainers, inside tuneforge's one training path.

    args = preference_arguments(config, training_args)          # TrainingArguments -> DPOConfig, ...
    trainer = build_preference_trainer(config, args, model, tokenizer, datasets, callbacks)

The trainers are TRL's, with tuneforge's atomic checkpoints and non-finite guard mixed in exactly
as `TuneforgeTrainer` mixes them into `Trainer`. TRL would tokenise text itself; tuneforge has
already tokenised the pairs with the run's template (`data/preference.py`), so each trainer is
told to take the ids as they are. Everything else (run directory, model loading, full / freeze /
LoRA / QLoRA, callbacks, metrics.jsonl, resume, preemption) is the recipe's, shared with SFT.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tuneforge.config.schema import (
    Config,
    DpoMethod,
    KtoMethod,
    LoraMethod,
    OrpoMethod,
    PreferenceMethod,
    SimpoMethod,
    weights_method,
)
from tuneforge.data.build import Datasets
from tuneforge.data.templates import IGNORE_INDEX
from tuneforge.train.checkpoints import AtomicCheckpointMixin
from tuneforge.train.guards import NonFiniteGuardMixin

# Logged by every one of these trainers as `rewards/<name>` (`eval_rewards/<name>` in evaluation).
REWARD_METRICS = ("chosen", "rejected", "margins", "accuracies")


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
    raise TypeError(f"not a preference method: {type(method).__name__}")


def preference_arguments(config: Config, args: TrainingArguments) -> TrainingArguments:
    """The validated `train` section as the TRL config of the method (`DPOConfig`, ...).

    Every `TrainingArguments` value is carried over as tuneforge resolved it, so TRL's own
    defaults (gradient checkpointing on, bf16, learning rate 1e-6) do not silently differ from
    an SFT run of the same config. Sequences are already cut to `data.max_length`.
    """
    _, config_class, method_fields = _method_arguments(config.method)  # type: ignore[arg-type]
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainingArguments) if field.init}
    return config_class(**{**values, **method_fields, "max_length": config.data.max_length})


def _reference_model(method: PreferenceMethod, model: torch.nn.Module) -> torch.nn.Module | None:
    """A frozen copy of the starting weights when the method needs one and nothing else can serve.

    LoRA needs none (TRL switches the adapters off), nor do precomputed log-probabilities
    (computed from the policy before it trains), nor ORPO and SimPO (reference-free).
    """
    if not isinstance(method, (DpoMethod, KtoMethod)) or method.reference == "precompute":
        return None
    if isinstance(weights_method(method), LoraMethod):
        return None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def build_preference_trainer(
    config: Config, args: TrainingArguments, model: Any, tokenizer: Any, datasets: Datasets,
    callbacks: list[TrainerCallback],
) -> Any:
    """The method's TRL trainer on tuneforge's tokenised pairs, model and callbacks."""
    method: PreferenceMethod = config.method  # type: ignore[assignment]
    trainer_class, _, _ = _method_arguments(method)
    reference = {"ref_model": _reference_model(method, model)} if isinstance(method, (DpoMethod, KtoMethod)) else {}
    return trainer_class(
        max_nonfinite_steps=config.guards.max_nonfinite_steps,
        model=model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        **reference,
    )


def preference_report(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """First and last logged reward metrics (training and evaluation), for the run summary.

    E.g. `{"rewards/margins": {"first": 0.01, "last": 0.9}, "eval_rewards/accuracies": {...}}`.
    """
    report: dict[str, Any] = {}
    for prefix in ("", "eval_"):
        for name in REWARD_METRICS:
            key = f"{prefix}rewards/{name}"
            values = [float(entry[key]) for entry in log_history if key in entry]
            if values:
                report[key] = {"first": round(values[0], 6), "last": round(values[-1], 6)}
    return report


__all__ = [
    "REWARD_METRICS",
    "TuneforgeCPOTrainer",
    "TuneforgeDPOTrainer",
    "TuneforgeKTOTrainer",
    "TuneforgeORPOTrainer",
    "build_preference_trainer",
    "preference_arguments",
    "preference_report",
]
