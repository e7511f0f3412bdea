"""The config schema: one pydantic model per YAML section.

A field's ``description`` is its only help text: ``docs/configuration.md`` is generated from
these models (``tuneforge.config.reference``) and a test keeps the two in sync.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuneforge.config.section import Section
from tuneforge.config.training_args import TrainSection


class Component(BaseModel):
    """A user-supplied callable: ``_target_`` is a dotted path, the other keys its keyword arguments."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    target: str = Field(
        alias="_target_",
        description="Dotted path of a function or class, e.g. `my_pkg.data.load_rows`.",
    )

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelConfig(Section):
    path: str = Field(description="Hugging Face hub id or local directory of the model.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="`pretrained` loads the weights; `random` builds the architecture from the "
        "config with fresh random weights (demos, benchmarks, tests).",
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Model config fields to override before building, e.g. `num_hidden_layers: 2`.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer id or directory; defaults to `path`."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weight dtype. `auto`: the checkpoint's dtype for pretrained weights; "
        "float32 for random init on CPU, bfloat16 on a GPU that supports it.",
    )
    attn_implementation: str | None = Field(
        None,
        description="Attention kernel passed to transformers (`sdpa`, `eager`, ...); "
        "transformers' default when unset.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python files shipped with a checkpoint (custom architectures). "
        "Off by default: only enable it for code you trust.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    builder: Component | None = Field(
        None,
        description="`_target_` of a callable that returns the model (your own class); "
        "called with its keyword arguments instead of the Auto classes.",
    )


PROMPT_TEMPLATES: dict[str, str] = {
    "qa": "### Question:\n{prompt}\n\n### Answer:\n",
    "alpaca": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{prompt}\n\n### Response:\n"
    ),
    "plain": "{prompt}",
}


class DatasetSpec(Section):
    path: str | None = Field(
        None, description="A JSON or JSON-lines file, a directory of them, or a glob."
    )
    source: Component | None = Field(
        None,
        description="`_target_` of a callable returning rows (a list of dicts or a "
        "`datasets.Dataset`), instead of `path`.",
    )
    format: Literal["instruction", "text"] = Field(
        "instruction",
        description="`instruction`: prompt and response, loss on the response only; "
        "`text`: continued pretraining on whole documents packed into blocks of `max_length`.",
    )
    prompt_fields: list[str] = Field(
        default_factory=lambda: ["instruction", "input"],
        description="Instruction format: row fields joined (blank line between, empty ones "
        "skipped) into `{prompt}`. E.g. `[question]` or `[input]`.",
    )
    response_field: str = Field(
        "output", description="Instruction format: the row field with the response (`answer`, `target`)."
    )
    prompt_template: str = Field(
        "qa",
        description="Instruction format: `qa`, `alpaca`, `plain`, or a string containing "
        "`{prompt}`. Saved with the run so generation formats prompts the same way.",
    )
    text_fields: list[str] = Field(
        default_factory=lambda: ["text"],
        description="Text format: row fields joined by a newline, e.g. `[title, content]`.",
    )
    max_rows: int | None = Field(
        None, gt=0, description="Use only the first N rows (start small, then scale)."
    )

    @field_validator("prompt_fields", "text_fields", mode="before")
    @classmethod
    def _one_field_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("prompt_template")
    @classmethod
    def _template_has_prompt(cls, value: str) -> str:
        if value not in PROMPT_TEMPLATES and "{prompt}" not in value:
            raise ValueError(
                f"expected one of {sorted(PROMPT_TEMPLATES)} or a string containing '{{prompt}}'"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.source is None):
            raise ValueError("give exactly one of 'path' (a file) or 'source' (a _target_ callable)")
        return self

    @property
    def template_text(self) -> str:
        return PROMPT_TEMPLATES.get(self.prompt_template, self.prompt_template)

    @property
    def name(self) -> str:
        return self.path if self.path is not None else self.source.target  # type: ignore[union-attr]


class DataConfig(Section):
    datasets: list[DatasetSpec] = Field(
        min_length=1, description="Training datasets; rows of all of them are used."
    )
    eval_datasets: list[DatasetSpec] = Field(
        default_factory=list, description="Evaluation datasets (otherwise see `eval_split`)."
    )
    eval_split: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of training rows held out for evaluation when `eval_datasets` is empty.",
    )
    max_length: int = Field(
        1024,
        gt=1,
        description="Longest sequence in tokens. Instruction rows are cut at the end of the "
        "response; rows whose prompt alone fills it are dropped (counted).",
    )


class FullMethod(Section):
    name: Literal["full"] = Field("full", description="Train every parameter.")


class FreezeMethod(Section):
    name: Literal["freeze"] = Field(
        "freeze", description="Train only some parameters, chosen by name patterns."
    )
    trainable: list[str] = Field(
        default_factory=list,
        description="Regular expressions (searched in parameter names); only matching "
        "parameters train. heron's `keys_to_finetune`.",
    )
    frozen: list[str] = Field(
        default_factory=list,
        description="Regular expressions; matching parameters are frozen (applied after "
        "`trainable`). heron's `keys_to_freeze`.",
    )

    @model_validator(mode="after")
    def _some_pattern(self) -> FreezeMethod:
        if not self.trainable and not self.frozen:
            raise ValueError("method 'freeze' needs 'trainable' and/or 'frozen' patterns")
        return self


class LoraMethod(Section):
    name: Literal["lora"] = Field("lora", description="Low-rank adapters through peft.")
    r: int = Field(16, gt=0, description="Adapter rank.")
    lora_alpha: float = Field(32, gt=0, description="Scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Module names to adapt, or `all-linear` (every linear layer but the output head).",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. `lm_head`).",
    )
    merge: bool = Field(
        False, description="Also save the adapter merged into the base weights (`merged/`)."
    )


MethodConfig = Annotated[FullMethod | FreezeMethod | LoraMethod, Field(discriminator="name")]


class SamplesConfig(Section):
    path: str = Field(
        description="Rows in the first training dataset's format; the prompt of each is "
        "generated from after training and shown beside its reference response."
    )
    count: int = Field(8, gt=0, description="How many rows to show.")
    max_new_tokens: int = Field(32, gt=0, description="Generation length limit.")


class OutputConfig(Section):
    dir: str | None = Field(
        None, description="Run directory; defaults to `runs/<config file name>`."
    )
    overwrite: bool = Field(
        False, description="Allow writing into a non-empty run directory without resuming."
    )
    resume: str = Field(
        "never",
        description="`auto`: continue from the newest checkpoint in `dir` if there is one; "
        "`never`; or a checkpoint directory.",
    )
    samples: SamplesConfig | None = Field(
        None, description="Print generations for held-out prompts at the end of training."
    )


class Config(Section):
    model: ModelConfig = Field(description="What to fine-tune.")
    data: DataConfig = Field(description="What to train on.")
    method: MethodConfig = Field(
        default_factory=FullMethod, description="Which parameters train, and how."
    )
    train: TrainSection = Field(
        default_factory=TrainSection,
        description="Any `transformers.TrainingArguments` field (validated against the "
        "installed transformers).",
    )
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
