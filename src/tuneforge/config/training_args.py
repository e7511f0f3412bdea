"""The `train` section: every `transformers.TrainingArguments` field, validated.

The section is built from the installed transformers' dataclass, so a field that exists in
that release is accepted with its own type and help text, and a typo fails with a suggestion
(heron's `training_config` works the same way). Nothing is re-declared by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from typing import Any

from pydantic import Field, TypeAdapter, create_model, field_validator
from pydantic.errors import PydanticSchemaGenerationError
from transformers import TrainingArguments

from tuneforge.config.optimizers import OPTIMIZERS, STAND_IN
from tuneforge.config.section import RENAMED_KEYS, Section

# Owned by other sections (see RENAMED_KEYS) or set by tuneforge itself.
EXCLUDED_FIELDS = {"output_dir", "resume_from_checkpoint", "local_rank", "use_liger_kernel"}

# Where tuneforge's default differs from transformers': small runs should log often, and metrics
# go to TensorBoard (offline, under the run directory's runs/); `report_to: [wandb]` or `[mlflow]` adds those.
TUNEFORGE_DEFAULTS: dict[str, Any] = {"logging_steps": 10, "report_to": "tensorboard"}


def _field_type(annotation: Any) -> Any:
    try:
        TypeAdapter(annotation)
    except (PydanticSchemaGenerationError, TypeError, NameError):
        return Any
    return annotation


def _enum_choices(annotation: Any) -> list[str] | None:
    """The allowed strings of a field typed `SomeEnum | str` (optimizers, schedulers, strategies)."""
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [str(member.value) for member in arg]
    return None


def _choice_validator(name: str, choices: list[str]) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, str) and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            suggestion = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"'{value}' is not one of: {', '.join(choices)}{suggestion}")
        return value

    return field_validator(name)(check)


def _build_train_section() -> type[Section]:
    fields: dict[str, Any] = {}
    validators: dict[str, Any] = {}
    for field in dataclasses.fields(TrainingArguments):
        if field.name in EXCLUDED_FIELDS or not field.init or field.name.startswith("_"):
            continue
        if field.name in TUNEFORGE_DEFAULTS:
            default: Any = TUNEFORGE_DEFAULTS[field.name]
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        help_text = field.metadata.get("help", "") if field.metadata else ""
        fields[field.name] = (_field_type(field.type), Field(default, description=help_text))
        choices = _enum_choices(field.type)
        if field.name == "optim":
            choices = [*(choices or []), *OPTIMIZERS]  # tuneforge's own (config/optimizers.py)
        if choices:
            # An invalid optimizer or scheduler name fails when the config loads, not at step 0.
            validators[f"_check_{field.name}"] = _choice_validator(field.name, choices)
    return create_model(
        "TrainSection",
        __base__=Section,
        __doc__="Any transformers.TrainingArguments field.",
        __validators__=validators,
        **fields,
    )


TrainSection = _build_train_section()


def to_training_arguments(section: Section, output_dir: str, **runtime: Any) -> TrainingArguments:
    """Build `TrainingArguments` from the fields the user set plus tuneforge's defaults.

    Args:
        section: the validated `train` section.
        output_dir: the run directory (from the `output` section).
        runtime: values tuneforge decides at run time (e.g. token counting for throughput).

    Raises:
        ValueError: transformers rejected the combination (re-raised as a ConfigError upstream).
    """
    values = dict(TUNEFORGE_DEFAULTS)
    values.update(section.model_dump(exclude_unset=True))
    for key, value in runtime.items():
        values.setdefault(key, value)
    if values.get("optim") in OPTIMIZERS:
        values["optim"] = STAND_IN  # the Trainer gets the real one: optimizer_cls_and_kwargs
    return TrainingArguments(output_dir=output_dir, **values)


__all__ = ["EXCLUDED_FIELDS", "RENAMED_KEYS", "TUNEFORGE_DEFAULTS", "TrainSection", "to_training_arguments"]
