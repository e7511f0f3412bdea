"""The config schema: one pydantic model per YAML section.

A field's ``description`` is its only help text: ``docs/configuration.md`` is generated from
these models (``tuneforge.config.reference``) and a test keeps the two in sync.
"""

from __future__ import annotations

import json
from pathlib import Path
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


class VisionConfig(Section):
    path: str = Field(
        description="The vision tower: a CLIP or SigLIP checkpoint (hub id or directory); of a "
        "full CLIP/SigLIP model only the vision half is used. With `model.init: random` a "
        "config-only directory is enough."
    )
    projector: Literal["mlp2x_gelu", "linear"] = Field(
        "mlp2x_gelu",
        description="Vision features to language embeddings: `mlp2x_gelu` (two linear layers with "
        "GELU, LLaVA-1.5) or `linear` (a linear map, as GIT/heron; stored as two linear layers "
        "without activation so the checkpoint stays a standard LLaVA one).",
    )
    image_token: str = Field(
        "<image>",
        description="Placeholder text for an image in prompts; added to the tokenizer as a special "
        "token and expanded to one token per image feature.",
    )
    feature_layer: int = Field(
        -2, description="Vision hidden layer whose features are projected (LLaVA: -2, the second to last)."
    )
    feature_select: Literal["auto", "default", "full"] = Field(
        "auto",
        description="`default` drops the class token (CLIP), `full` keeps every position; `auto`: "
        "`full` for towers without a class token (SigLIP), else `default`.",
    )
    image_processor: str | None = Field(
        None, description="Directory or hub id of the image processor; defaults to `path`."
    )


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
    allow_pickle_weights: bool = Field(
        False,
        description="Load weights stored as pickle (`.bin`, `.pt`), which can run code when "
        "loaded. Off by default: only safetensors weights load.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the frozen base weights quantized through bitsandbytes (needs CUDA): "
        "`4bit` is NF4 with double quantization and bf16 compute (QLoRA), `8bit` is LLM.int8. "
        "Only adapters train on a quantized base (method lora).",
    )
    quantize_via_cpu: bool = Field(
        False,
        description="With `quantization: 4bit`: load the checkpoint into CPU memory first "
        "(bitsandbytes quantizes the linear layers there), store each fused MoE expert weight as "
        "NF4 on the GPU one tensor at a time, then move the model to the GPU, so the GPU never "
        "holds the 16-bit model. For MoE models whose 16-bit experts outgrow the GPU "
        "(Mixtral-8x7B's are 88 GiB); needs CPU memory for the 16-bit checkpoint.",
    )
    new_special_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens added to the tokenizer as special tokens; the embeddings are resized "
        "and the new rows train (with LoRA they are saved with the adapter).",
    )
    moe_aux_loss: bool = Field(
        True,
        description="Mixture-of-experts models: add the router load-balancing loss to the "
        "training loss and log it as `aux_loss`.",
    )
    moe_aux_loss_coef: float | None = Field(
        None, ge=0, description="Its coefficient; the model config's `router_aux_loss_coef` when unset."
    )
    vision: VisionConfig | None = Field(
        None,
        description="Build a vision-language model (LLaVA layout): this vision tower and a projector "
        "in front of the language model at `path`. Unset with a LLaVA checkpoint at `path`, that "
        "model is fine-tuned as it is.",
    )

    @model_validator(mode="after")
    def _cpu_quantization_is_4bit(self) -> ModelConfig:
        if self.quantize_via_cpu and self.quantization != "4bit":
            raise ValueError(f"quantize_via_cpu is for quantization: 4bit (got {self.quantization!r})")
        return self


PREFERENCE_FORMATS = ("preference", "unpaired", "prompt")

BUILTIN_TEMPLATES = ("auto", "tokenizer", "qa", "alpaca", "chatml", "llama-3", "plain")

DEFAULT_PROMPT_FIELDS = {
    "instruction": ["instruction", "input"],
    "preference": ["prompt"],
    "unpaired": ["prompt"],
    "prompt": ["prompt"],
    "multiple_choice": ["question"],
}


class DatasetSpec(Section):
    path: str | None = Field(
        None,
        description="A JSON, JSON-lines, CSV or Parquet file, a directory of them, a glob, "
        "or `hf:NAME` for a Hugging Face dataset id.",
    )
    source: Component | None = Field(
        None,
        description="`_target_` of a callable returning rows (a list of dicts or a "
        "`datasets.Dataset`), instead of `path`.",
    )
    split: str = Field("train", description="Split to read for `hf:` datasets.")
    format: Literal[
        "instruction", "chat", "text", "preference", "unpaired", "prompt", "multiple_choice", "llava", "caption"
    ] = Field(
        "instruction",
        description="`instruction`: prompt and response, loss on the response; `chat`: "
        "multi-turn conversations, loss on assistant turns; `text`: continued pretraining on "
        "whole documents; `preference`: prompt/chosen/rejected pairs (preference methods); "
        "`unpaired`: a prompt, one reply and a desirable/undesirable label (method kto); "
        "`prompt`: prompts alone, to generate from (method grpo): `prompt_fields` as text, or one "
        "field holding a list of turns (a final assistant turn is left out), the row's other fields "
        "passed to the reward functions; "
        "`multiple_choice`: question, choices and label (trained as instruction data, or for "
        "evaluation); `llava`: images and conversations with `<image>` placeholders (LLaVA JSON), "
        "loss on assistant turns; `caption`: an image and its caption, loss on the caption.",
    )
    template: str = Field(
        "auto",
        description="How turns become text: `auto` (the tokenizer's chat template if it has "
        "one, else `qa`), `tokenizer`, `qa` (### Question / ### Answer), `alpaca`, `chatml`, "
        "`llama-3`, `plain`, a string containing `{prompt}`, or a Jinja chat template. Saved "
        "with the run so generation formats prompts the same way.",
    )
    prompt_fields: list[str] | None = Field(
        None,
        description="Row fields joined (blank line between, empty ones skipped) into the "
        "prompt. Default: `[instruction, input]` (instruction; `input` may be missing), "
        "`[prompt]` (preference, unpaired, prompt), `[question]` (multiple choice). E.g. `[question]` or "
        "`[input]`; `[messages]` for chat rows in the prompt format.",
    )
    response_field: str = Field(
        "output", description="Instruction format: the row field with the response (`answer`, `target`)."
    )
    system_prompt: str | None = Field(
        None, description="System message added to rows that have none (every format but text)."
    )
    messages_field: str = Field(
        "messages",
        description="Chat format: the list of turns, OpenAI style (`role`/`content`) or "
        "ShareGPT style (`from`/`value`, e.g. `conversations`). The llava format reads "
        "`conversations` unless this is set.",
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant",
        description="Which assistant turns of a multi-turn conversation are trained on: all, "
        "or only the last.",
    )
    chosen_field: str = Field("chosen", description="Preference format: the preferred response.")
    rejected_field: str = Field("rejected", description="Preference format: the dispreferred response.")
    choices_field: str = Field(
        "choices",
        description="Multiple choice: a list field of choices; rows with `choice0`, `choice1`, "
        "... fields (JGLUE) are read without it.",
    )
    label_field: str = Field(
        "label",
        description="Multiple choice: index of the right choice. Unpaired: true (desirable) or false "
        "(undesirable); the reply is read from `response_field`.",
    )
    image_field: str = Field(
        "image",
        description="llava and caption formats: the row field with an image path, or a list of "
        "paths (several images, video frames), one `<image>` placeholder each.",
    )
    image_root: str | None = Field(
        None,
        description="llava and caption formats: directory image paths are relative to; no image "
        "may lie outside it (after resolving `..` and links). Default: the dataset's `root`, else "
        "the current directory.",
    )
    caption_field: str = Field("caption", description="Caption format: the row field with the caption.")
    caption_prompt: str = Field(
        "", description="Caption format: text after the image in the user turn, e.g. `Describe the image.`"
    )
    text_fields: list[str] = Field(
        default_factory=lambda: ["text"],
        description="Text format: row fields joined by a newline, e.g. `[title, content]`.",
    )
    on_too_long: Literal["truncate", "drop", "split"] = Field(
        "truncate",
        description="A row longer than `max_length`: `truncate` (cut the end), `drop`, or "
        "`split` into consecutive windows. Rows whose trained tokens would all be cut are "
        "dropped in every case. Counted in the report.",
    )
    max_rows: int | None = Field(
        None, gt=0, description="Use only the first N rows (start small, then scale)."
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Mixture weight: the dataset's share of the training examples is "
        "weight / sum of weights (rows are sampled by seed, repeated if needed).",
    )
    samples: int | None = Field(
        None, gt=0, description="Exactly this many examples from the dataset (sampled by seed)."
    )
    root: str | None = Field(
        None,
        description="Directory the dataset's files must lie in (after resolving `..` and links); "
        "a relative `path` is taken from it. Default: `data.root`.",
    )

    @field_validator("prompt_fields", "text_fields", mode="before")
    @classmethod
    def _one_field_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value in BUILTIN_TEMPLATES or "{prompt}" in value or "{%" in value or "{{" in value:
            return value
        raise ValueError(
            f"expected one of {', '.join(BUILTIN_TEMPLATES)}, a string containing '{{prompt}}', "
            "or a Jinja chat template"
        )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.source is None):
            raise ValueError("give exactly one of 'path' (a file) or 'source' (a _target_ callable)")
        if self.weight is not None and self.samples is not None:
            raise ValueError("give 'weight' or 'samples', not both")
        return self

    @property
    def prompt_field_names(self) -> list[str]:
        if self.prompt_fields is not None:
            return self.prompt_fields
        return DEFAULT_PROMPT_FIELDS.get(self.format, ["instruction", "input"])

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
        description="Longest sequence in tokens (see each dataset's `on_too_long`).",
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each row, padding-free: no token attends "
        "across an example boundary and positions restart per example.",
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="A row that cannot be used (missing field, wrong type): stop with an "
        "error naming it, or skip it (counted, first reasons shown).",
    )
    num_proc: int = Field(1, ge=1, description="Worker processes for tokenisation.")
    cache_dir: str | None = Field(
        None,
        description="Where tokenised datasets are cached; default `$TUNEFORGE_CACHE` or "
        "`~/.cache/tuneforge/data`.",
    )
    streaming: bool = Field(
        False,
        description="Text format only: read and tokenise on the fly, for corpora larger than "
        "memory (no cache; needs `train.max_steps`).",
    )
    root: str | None = Field(
        None,
        description="Directory every dataset's files must lie in (after resolving `..` and links), "
        "so a shared config cannot read files elsewhere; relative paths are taken from it. "
        "Unset: paths are relative to the current directory, anywhere.",
    )

    @model_validator(mode="after")
    def _datasets_inherit_root(self) -> DataConfig:
        if self.root is not None:
            for spec in [*self.datasets, *self.eval_datasets]:
                if spec.root is None:
                    spec.root = self.root
        return self


class QatSettings(Section):
    weights: Literal["int4", "int8"] = Field("int4", description="Weight precision simulated in training.")
    activations: Literal["int8", "none"] = Field(
        "int8", description="Activation precision simulated in training (dynamic, per token)."
    )
    group_size: int = Field(32, gt=0, description="Weights share one scale per group of this many values.")
    convert: bool = Field(
        True, description="At the end, convert the fake-quantized layers to real quantized ones (`quantized/`)."
    )


class QatOption(Section):
    qat: QatSettings | None = Field(
        None,
        description="Quantization-aware training through torchao: linear layers (not the output "
        "head) train with fake-quantized weights and activations, so the model keeps its "
        "accuracy when quantized for serving.",
    )


class FullMethod(QatOption):
    name: Literal["full"] = Field("full", description="Train every parameter.")


class FreezeMethod(QatOption):
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
        "`trainable` and the presets). heron's `keys_to_freeze`.",
    )
    last_layers: int | None = Field(
        None, gt=0, description="Preset: also train the last N decoder layers."
    )
    embeddings: bool = Field(False, description="Preset: also train the input embeddings.")
    output_head: bool = Field(False, description="Preset: also train the output head (`lm_head`).")

    @model_validator(mode="after")
    def _some_pattern(self) -> FreezeMethod:
        if not (self.trainable or self.frozen or self.last_layers or self.embeddings or self.output_head):
            raise ValueError(
                "method 'freeze' needs 'trainable'/'frozen' patterns or a preset "
                "(last_layers, embeddings, output_head)"
            )
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
    use_dora: bool = Field(False, description="DoRA: weight-decomposed low-rank adaptation.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="Per-module ranks: a regular expression matched at the end of module names "
        "-> r, e.g. `{down_proj: 8}` or `{'layers\\.0\\..*': 4}`.",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-module alphas: regular expression -> lora_alpha."
    )
    merge: bool = Field(
        False, description="Also save the adapter merged into the base weights (`merged/`)."
    )


WeightsMethod = Annotated[FullMethod | FreezeMethod | LoraMethod, Field(discriminator="name")]


class PreferenceMethod(Section):
    """What every preference method shares: which weights train, and how hard the preference pulls."""

    adapter: WeightsMethod = Field(
        default_factory=FullMethod,
        description="Which weights train, as a supervised `method` section: `{name: full}`, "
        "`{name: freeze, ...}` or `{name: lora, r: 16, ...}` (QLoRA: `lora` with `model.quantization`).",
    )
    beta: float = Field(0.1, gt=0, description="Strength of the preference term (TRL's `beta`).")


class ReferenceOption(Section):
    reference: Literal["auto", "precompute"] = Field(
        "auto",
        description="The reference model the rewards are measured against. `auto`: with a LoRA "
        "adapter, the base model itself (adapters switched off, no copy); otherwise a frozen copy "
        "of the starting weights. `precompute`: its log-probabilities of every pair are computed "
        "once before training, so no reference stays in memory.",
    )


class DpoMethod(PreferenceMethod, ReferenceOption):
    name: Literal["dpo"] = Field("dpo", description="Direct preference optimisation (TRL `DPOTrainer`).")
    loss_type: list[str] = Field(
        default_factory=lambda: ["sigmoid"],
        description="TRL DPO loss types (`sigmoid`, `hinge`, `ipo`, `robust`, `apo_zero`, `sft`, ...); "
        "several are summed with `loss_weights`.",
    )
    loss_weights: list[float] | None = Field(None, description="Weight of each `loss_type`; default 1 each.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (robust DPO, EXO).")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_loss_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class OrpoMethod(PreferenceMethod):
    name: Literal["orpo"] = Field(
        "orpo", description="Odds-ratio preference optimisation: SFT on `chosen` plus an odds-ratio "
        "term, no reference model (TRL `ORPOTrainer`)."
    )


class KtoMethod(PreferenceMethod, ReferenceOption):
    name: Literal["kto"] = Field(
        "kto", description="Kahneman-Tversky optimisation from desirable/undesirable replies; "
        "pairs are split into one of each (TRL `KTOTrainer`)."
    )
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable replies.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable replies.")


class SimpoMethod(PreferenceMethod):
    name: Literal["simpo"] = Field(
        "simpo", description="SimPO: length-normalised rewards with a target margin, no reference "
        "model (TRL `CPOTrainer` with `loss_type: simpo`)."
    )
    beta: float = Field(2.0, gt=0, description="Reward scale (the SimPO paper uses 2.0-2.5).")
    gamma: float = Field(0.5, ge=0, description="Target reward margin, divided by `beta` (TRL's `simpo_gamma`).")


class GrpoMethod(PreferenceMethod):
    name: Literal["grpo"] = Field(
        "grpo", description="Group relative policy optimisation, online: for each prompt the model samples "
        "`num_generations` completions, `rewards` score them, and each completion is reinforced by how far its "
        "reward lies above its group's mean (TRL `GRPOTrainer`). Reads `format: prompt` data."
    )
    rewards: list[Component] = Field(
        min_length=1,
        description="Reward functions, each `{_target_: module.function, ...}` (the other keys are bound as "
        "keyword arguments; a class is instantiated with them and its instances called). Called as TRL calls "
        "them: `f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., "
        "log_metric=..., **columns) -> list[float]`, with prompts and completions as lists of turns and every "
        "dataset column (`prompt_ids`, your rows' other fields) as a list; summed, weighted by `reward_weights`.",
    )
    reward_weights: list[float] | None = Field(None, description="Weight of each reward; default 1 each.")
    num_generations: int = Field(
        8,
        ge=2,
        description="Completions sampled per prompt (the group). The completions per optimizer step, "
        "`per_device_train_batch_size` x processes x `gradient_accumulation_steps`, must be a multiple of it.",
    )
    max_completion_length: int = Field(
        256,
        gt=0,
        description="Longest completion in tokens; prompts longer than `data.max_length` minus this are dropped.",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    beta: float = Field(
        0.0,
        ge=0,
        description="KL penalty towards the reference model (TRL's `beta`); 0, TRL's default, keeps no reference. "
        "Above 0 the reference is the starting weights: with a LoRA adapter the base with a copy of the "
        "(fresh) adapter, otherwise a frozen copy of the model.",
    )

    @model_validator(mode="after")
    def _one_weight_per_reward(self) -> GrpoMethod:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards: give one per reward"
            )
        return self


PREFERENCE_METHODS = (DpoMethod, OrpoMethod, KtoMethod, SimpoMethod, GrpoMethod)

MethodConfig = Annotated[
    FullMethod | FreezeMethod | LoraMethod | DpoMethod | OrpoMethod | KtoMethod | SimpoMethod | GrpoMethod,
    Field(discriminator="name"),
]


def weights_method(method: Any) -> FullMethod | FreezeMethod | LoraMethod:
    """Which weights train: the method itself, or a preference method's `adapter`."""
    return method.adapter if isinstance(method, PreferenceMethod) else method


class SamplesConfig(Section):
    path: str = Field(
        description="Rows in the first training dataset's format; the prompt of each is "
        "generated from after training and shown beside its reference response."
    )
    count: int = Field(8, gt=0, description="How many rows to show.")
    max_new_tokens: int = Field(32, gt=0, description="Generation length limit.")


class OutputConfig(Section):
    dir: str | None = Field(
        None, min_length=1, description="Run directory; defaults to `runs/<config file name>`."
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
    resume_on_changed_data: bool = Field(
        False,
        description="Allow resuming from a checkpoint written while training on other data (files, "
        "tokenizer, template or data settings changed); the data order then differs from the "
        "interrupted run's.",
    )


class SpeedConfig(Section):
    liger: bool | Literal["auto"] = Field(
        "auto",
        description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU, and a fused output layer + "
        "cross-entropy that never materialises the logits). `auto`: on when a CUDA GPU, "
        "liger-kernel and a model type it supports are present.",
    )
    activations: Literal["auto", "keep", "recompute", "offload"] = Field(
        "auto",
        description="Where the activations saved for the backward pass live. `keep`: in GPU memory "
        "(fastest); `recompute`: recomputed per decoder layer (every `recompute_every`-th layer); "
        "`offload`: every layer recomputed, its input kept in pinned CPU memory. `auto`: on a "
        "GPU, the fastest that fits `memory_budget_gib` by an estimate from the model's shape; "
        "elsewhere as `train.gradient_checkpointing` says.",
    )
    recompute_every: int = Field(
        1, ge=1, description="With `activations: recompute`: recompute every N-th decoder layer only (1: all)."
    )
    memory_budget_gib: float | None = Field(
        None,
        gt=0,
        description="GPU memory `activations: auto` plans for; default 90% of the GPU's memory.",
    )
    fused_lora: bool = Field(
        True,
        description="LoRA linear layers add the adapter's product to the base output in one matmul "
        "(`torch.addmm`; in a compiled layer on a GPU, a Triton kernel that adds in place) in the compute "
        "dtype and keep their input as it is for the backward pass; "
        "peft's own forward copies each adapted layer's input to the adapters' fp32 and back, and "
        "scales and adds in separate passes. A layer with one such adapter (no dropout) over a frozen 16-bit "
        "or 4-bit linear runs the base matmul and the adapter as one autograd function (a 4-bit weight "
        "dequantized in each pass, except that a recomputed layer's backward reuses its recomputation's). "
        "A SwiGLU MLP with such an adapter on its down projection keeps its gate and up projections but not their product, which it recomputes in the backward "
        "pass (one elementwise pass; 3.5 GiB less on an 8B model at 4096 tokens a step). Same adapter "
        "files either way. false: peft's forward.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder layer, so inductor fuses the elementwise work between "
        "its matmuls (residual adds, casts, activation functions) and the GPU waits less for Python between "
        "small kernels; recomputation stays around the compiled layer. The first steps are slower while it "
        "compiles. One GPU or DDP: under FSDP or DeepSpeed the engine's hooks run inside each layer's call. "
        "On a 4-bit model each compiled layer keeps its dequantized weights for the backward pass (0.4 GiB "
        "a layer on an 8B model; the memory plan counts them). auto: on a CUDA GPU for a 4-bit model whose "
        "every layer is recomputed (speed.activations recompute or offload), where it was measured to pay "
        "(docs/benchmarks.md) and speed.cuda_graphs is off; off otherwise.",
    )
    cuda_graphs: bool = Field(
        False,
        description="Replay each recomputed decoder layer's forward and backward from CUDA graphs: a "
        "layer's call is captured on a copy of the layer, and every layer replays it after its weights "
        "are copied in, so the GPU does not wait for Python to launch each small kernel and no compile "
        "time is spent. For layers recomputed by re-entrant checkpointing (speed.activations recompute "
        "or offload), one GPU or DDP, no dropout; not with speed.compile: true. Each call shape (rows' "
        "length, a padding mask) is captured when first seen, up to 4; further shapes run as they are, so "
        "it pays when batches have few shapes, such as rows of data.max_length tokens. The graphs' memory "
        "pool holds one layer's activations and dequantized weights beside what the rest of the step "
        "allocates: about 1 GiB more than compiled layers on QLoRA-8B, at the same speed on an H200 "
        "(docs/benchmarks.md).",
    )

    @model_validator(mode="after")
    def _one_of_compile_and_graphs(self) -> SpeedConfig:
        if self.compile is True and self.cuda_graphs:
            raise ValueError(
                "speed.compile and speed.cuda_graphs both take over the decoder layers' calls: "
                "set one of them (CUDA graphs replay eager layers)"
            )
        return self


class GuardsConfig(Section):
    max_nonfinite_steps: int = Field(
        3,
        ge=0,
        description="Optimizer steps whose loss or gradients are NaN or inf are skipped (the weights "
        "stay as they were) up to this many times over the run; the next one stops it with an error "
        "naming the step and the batch. 0: stop at the first.",
    )
    stall_minutes: float | None = Field(
        30,
        gt=0,
        description="When no optimizer step finishes for this long, every process prints its threads' "
        "Python stacks to stderr (again each period while the stall lasts), so a hang shows where "
        "each rank is. null: off.",
    )
    spike_factor: float | None = Field(
        None,
        gt=1,
        description="Roll back after a loss spike: when a step's loss is more than this many times the median "
        "of the last `spike_window` step losses, the newest complete checkpoint's weights (or adapter) and "
        "optimizer state are restored and training goes on with the next batches, skipping the ones since that "
        "checkpoint; the step count and learning-rate schedule are not rewound (docs/reliability.md). null: off, "
        "the default, because a false alarm throws away the steps since the last checkpoint; 3 suits long runs. "
        "Supervised methods only: a preference or reward objective can sit near or below zero.",
    )
    spike_window: int = Field(
        100,
        ge=3,
        description="How many recent step losses the spike median covers. Nothing is judged until this many "
        "steps have run (from the start, and again after each rollback), so the first noisy steps are never "
        "the reference; below 3 the median is moved by a single odd step.",
    )
    max_rollbacks: int = Field(
        3,
        ge=0,
        description="Rollbacks after loss spikes allowed over the run; the next spike stops it with an error "
        "naming the step. 0: stop at the first spike instead of rolling back.",
    )


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="How several processes share the work (docs/distributed.md): `ddp` keeps a full copy of "
        "the weights and optimizer on every GPU; `fsdp` shards weights, gradients and optimizer "
        "(PyTorch FSDP2 through accelerate; needs GPUs); `deepspeed` uses DeepSpeed ZeRO (`zero_stage`). "
        "Ignored by a single process, except `deepspeed` (ZeRO offload helps on one GPU too).",
    )
    zero_stage: Literal[1, 2, 3] = Field(
        3,
        description="DeepSpeed: 1 shards the optimizer state, 2 also the gradients, 3 also the weights. "
        "Picks the shipped `zero<stage>.json` (tuneforge/train/deepspeed/).",
    )
    deepspeed_config: str | None = Field(
        None,
        description="DeepSpeed: your own JSON config file, used instead of the shipped one (`auto` values are "
        "filled from the `train` section). `zero_stage` and the offload keys must then stay unset.",
    )
    offload_optimizer: bool = Field(
        False,
        description="Keep the optimizer state in CPU memory. DeepSpeed: ZeRO-Offload with DeepSpeed's CPU "
        "Adam; FSDP offloads parameters and optimizer together (`offload_params`).",
    )
    offload_params: bool = Field(
        False,
        description="Keep the weights in CPU memory between uses (DeepSpeed ZeRO-3; FSDP CPU offload, which "
        "also runs the optimizer step on the CPU). Slower; for models that do not fit otherwise.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="FSDP2: free the gathered weights after each layer's forward (least memory, like ZeRO-3); "
        "false keeps them until the backward (faster, like ZeRO-2).",
    )
    checkpoint: Literal["sharded", "full"] = Field(
        "sharded",
        description="FSDP: checkpoints as one shard per process (fast, resumable on another process count) or "
        "gathered into one file on rank 0. The final `model/` is always a standard Hugging Face checkpoint.",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Compute precision of every engine: `bf16` or `fp16` set `train.bf16`/`train.fp16`; "
        "`auto` leaves them as the `train` section says.",
    )
    timeout_minutes: float = Field(
        30,
        gt=0,
        description="A collective (gradient all-reduce, barrier) waiting longer than this fails the run "
        "with an error naming the rank, instead of hanging (`train.ddp_timeout`).",
    )
    preprocess_timeout_minutes: float = Field(
        240,
        gt=0,
        description="How long the other processes wait for local rank 0 to fill the tokenisation cache (a "
        "file barrier, not a collective, so slow preprocessing never trips `timeout_minutes`).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistributedConfig:
        if self.deepspeed_config is not None and (
            {"zero_stage", "offload_optimizer", "offload_params"} & self.model_fields_set
        ):
            raise ValueError("with deepspeed_config, set ZeRO stage and offload in that file, not here")
        if self.offload_params and self.strategy == "deepspeed" and self.zero_stage != 3:
            raise ValueError("DeepSpeed offloads parameters only with zero_stage: 3")
        if self.strategy == "fsdp" and self.offload_optimizer and not self.offload_params:
            raise ValueError("FSDP offloads parameters and optimizer together: set offload_params: true")
        return self

    @property
    def engine(self) -> str:
        """`ddp`, `fsdp`, `zero1`..`zero3`, or `zero?` for a DeepSpeed file that cannot be read yet."""
        if self.strategy != "deepspeed":
            return self.strategy
        if self.deepspeed_config is None:
            return f"zero{self.zero_stage}"
        try:
            stage = json.loads(Path(self.deepspeed_config).read_text(encoding="utf-8"))["zero_optimization"]["stage"]
        except (OSError, ValueError, KeyError, TypeError):
            return "zero?"
        return f"zero{stage}"


# Quantised base x engine cells that fail (PITFALLS 11), each with the supported alternative.
QUANTIZED_ENGINE_PROBLEMS = {
    "fsdp": "FSDP2 would shard bitsandbytes' packed weights, which needs a quant-storage setup tuneforge "
    "does not make; use distributed.strategy: ddp (every GPU holds the small quantized base) or "
    "deepspeed with zero_stage: 2",
    "zero3": "ZeRO-3 partitions the weights bitsandbytes has packed; use distributed.zero_stage: 2 "
    "(or strategy: ddp)",
}

EVAL_TASK_FORMATS = {
    "loss": ("instruction", "chat", "multiple_choice", "text"),
    "multiple_choice": ("multiple_choice",),
    "qa": ("instruction", "chat"),
}


class EvalTask(Section):
    type: Literal["loss", "multiple_choice", "qa"] = Field(
        description="`loss`: loss and perplexity on the trained tokens, masked as in training; "
        "`multiple_choice`: accuracy, the model picking the choice it gives the highest "
        "log-likelihood as a reply; `qa`: generate each answer, exact match and character-level F1 "
        "against the response."
    )
    data: DatasetSpec = Field(
        description="The dataset, as in `data.datasets` (`format: multiple_choice` for multiple "
        "choice; `max_rows` keeps evaluation quick). Its `template: auto` means the run's template."
    )
    name: str | None = Field(
        None, description="Name in the metric keys, `eval_<name>_accuracy`; default: the type."
    )
    normalize: Literal["none", "tokens", "chars"] = Field(
        "tokens",
        description="Multiple choice: a choice's log-likelihood summed (`none`), or divided by its "
        "number of scored tokens or of characters, so longer choices are not penalised.",
    )
    max_new_tokens: int = Field(32, gt=0, description="qa: generation length limit.")
    max_length: int = Field(1024, gt=1, description="loss: longest sequence in tokens (see `on_too_long`).")
    batch_size: int = Field(8, gt=0, description="Sequences scored or generated together.")

    @model_validator(mode="after")
    def _format_fits_type(self) -> EvalTask:
        if self.data.format not in EVAL_TASK_FORMATS[self.type]:
            raise ValueError(
                f"a {self.type} task reads {' or '.join(EVAL_TASK_FORMATS[self.type])} data, "
                f"not format '{self.data.format}'"
            )
        return self

    @property
    def key(self) -> str:
        return self.name or self.type


class EvalConfig(Section):
    tasks: list[EvalTask] = Field(
        default_factory=list,
        description="Tasks run at every evaluation during training (before, at `eval_steps`, "
        "after); their results are logged as `eval_<name>_<metric>` (e.g. `eval_jcqa_accuracy`) "
        "and can be `train.metric_for_best_model`. Needs evaluation data (`data.eval_split` or "
        "`data.eval_datasets`), which is what makes the Trainer evaluate.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        keys = [task.key for task in self.tasks]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"eval task names must differ (their metrics share keys): {', '.join(repeated)}; set 'name'")
        return self


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
    speed: SpeedConfig = Field(default_factory=SpeedConfig, description="Kernels and activation memory.")
    guards: GuardsConfig = Field(default_factory=GuardsConfig, description="What training does when values go bad.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Several GPUs or nodes: DDP, FSDP2 or DeepSpeed ZeRO (docs/distributed.md).",
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="Evaluation tasks (accuracy, exact match) run during training."
    )

    @model_validator(mode="after")
    def _supported_combination(self) -> Config:
        if self.model.quantization != "none" and not isinstance(weights_method(self.method), LoraMethod):
            raise ValueError(
                f"a {self.model.quantization} quantized base cannot be trained with method "
                f"'{self.method.name}': only adapters train on quantized weights; use method.name: lora"
            )
        engine_problem = QUANTIZED_ENGINE_PROBLEMS.get(self.distributed.engine)
        if self.model.quantization != "none" and engine_problem:
            raise ValueError(f"a {self.model.quantization} quantized base cannot train under {self.distributed.engine}: {engine_problem}")
        preference = isinstance(self.method, PreferenceMethod)
        for spec in [*self.data.datasets, *self.data.eval_datasets]:
            if preference != (spec.format in PREFERENCE_FORMATS):
                raise ValueError(
                    f"method '{self.method.name}' cannot train on format '{spec.format}' ({spec.name}): "
                    + ("preference methods read format preference (pairs), unpaired (KTO) or prompt (GRPO)"
                       if preference else "preference data trains with method dpo, orpo, kto, simpo or grpo")
                )
            if preference and spec.format == "unpaired" and not isinstance(self.method, KtoMethod):
                raise ValueError(f"format unpaired ({spec.name}) has no pairs: only method kto reads it")
            if preference and (spec.format == "prompt") != isinstance(self.method, GrpoMethod):
                raise ValueError(
                    f"method '{self.method.name}' cannot train on format '{spec.format}' ({spec.name}): "
                    "grpo generates its own replies from format prompt; dpo, orpo, kto and simpo learn from "
                    "the replies in format preference or unpaired"
                )
        if self.guards.spike_factor is not None and preference:
            raise ValueError(
                f"guards.spike_factor judges a supervised loss against its recent median; method "
                f"'{self.method.name}' optimises a preference or reward objective, which can sit near or below "
                "zero, where such a ratio means nothing: set guards.spike_factor: null"
            )
        if self.speed.compile is True and self.distributed.strategy != "ddp":
            raise ValueError(
                f"speed.compile compiles each decoder layer's call, where distributed.strategy "
                f"'{self.distributed.strategy}' runs its own gather and release hooks: use it with ddp or one GPU"
            )
        if self.speed.cuda_graphs is True and self.distributed.strategy != "ddp":
            raise ValueError(
                f"speed.cuda_graphs copies each layer's weights into one captured layer, where distributed.strategy "
                f"'{self.distributed.strategy}' shards them: use it with ddp or one GPU"
            )
        if self.eval.tasks and not (self.data.eval_datasets or self.data.eval_split > 0):
            raise ValueError(
                "eval.tasks run when the Trainer evaluates, which needs evaluation data: set "
                "data.eval_split or data.eval_datasets"
            )
        return self
