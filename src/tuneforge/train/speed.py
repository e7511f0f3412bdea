"""Speed settings resolved for this machine and model: which kernels run, where activations live.

    plan = plan_speed(config.speed, config.train, model, tokens_per_micro_batch=4096)
    plan.apply(args)        # TrainingArguments: use_liger_kernel, gradient checkpointing kwargs
    print(plan.describe())

Everything here selects features that transformers and Liger already implement: Liger's kernels
through `TrainingArguments.use_liger_kernel`, selective recomputation through
`gradient_checkpointing_kwargs={"every_n_layers": N}` and CPU offload of the recomputation inputs
through `{"offload": True}` (both handled by `PreTrainedModel.gradient_checkpointing_enable`).
What tuneforge adds is the choice: `auto` picks the fastest setting the GPU's memory holds.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.config.schema import SpeedConfig
from tuneforge.errors import ConfigError

GIB = 2**30
# cuBLAS/attention workspaces, the allocator's fragmentation, the CUDA context.
_WORKSPACE_BYTES = 2 * GIB


def liger_model_types() -> set[str]:
    """Model types Liger can patch (empty when liger-kernel is not installed)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return set()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def resolve_liger(setting: bool | str, model_type: str, cuda: bool) -> tuple[bool, str]:
    """Whether Liger kernels run, and why.

    Raises:
        ConfigError: `speed.liger: true` where it cannot run.
    """
    supported = liger_model_types()
    if setting is False:
        return False, "off (speed.liger: false)"
    missing = (
        "no CUDA GPU (Liger's kernels are Triton GPU kernels)" if not cuda
        else "liger-kernel is not installed (pip install 'tuneforge[gpu]')" if not supported
        else f"Liger has no kernels for model type '{model_type}'" if model_type not in supported
        else None
    )
    if missing is None:
        return True, "on"
    if setting is True:
        raise ConfigError(f"Liger kernels cannot run: {missing}", where="speed.liger", hint="use auto or false")
    return False, f"off ({missing})"


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes a training step holds on the GPU, from the model's shape (a planning estimate)."""

    resident: int  # weights and the optimizer state of what trains
    per_layer: int  # activations one decoder layer keeps for the backward pass
    per_layer_checkpointed: int  # what a recomputed layer keeps instead: its input
    output_layer: int  # logits and their gradient (none with Liger's fused loss)
    layers: int

    def total(self, recomputed: int, offloaded: bool = False) -> int:
        kept = (self.layers - recomputed) * self.per_layer
        inputs = 0 if offloaded else recomputed * self.per_layer_checkpointed
        # A recomputed layer's activations exist again, one layer at a time, during its backward.
        transient = self.per_layer if recomputed else 0
        return self.resident + kept + inputs + transient + self.output_layer + _WORKSPACE_BYTES


def estimate_activations(model: torch.nn.Module, tokens: int, liger: bool) -> ActivationEstimate:
    """Estimate a decoder-only transformer's training memory for `tokens` per micro-batch.

    Per layer and token a decoder keeps about 7 hidden-size vectors (the two norm inputs and
    outputs, queries after RoPE and the contiguous copy attention makes of them, attention
    output), 4 key/value-size ones (keys and values, and their copies), and 3 (Liger's SwiGLU)
    or 4 MLP-width vectors (gate, up, activation, down input), in the compute precision.
    Gradients are left out: they are allocated while the backward pass frees activations.
    Checked against measured peaks on an H200 (Llama 8B LoRA, 1B full): see docs/benchmarks.md.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    if hidden is None or layers is None:
        raise ConfigError(
            "cannot estimate activation memory for this model (no hidden_size / num_hidden_layers)",
            where="speed.activations",
            hint="choose keep, recompute or offload",
        )
    heads = getattr(text, "num_attention_heads", None) or 1
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_width = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    ffn = getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden
    vocab = getattr(text, "vocab_size", 0) or 0
    element = 2  # bf16/fp16 compute
    per_token = 7 * hidden + 4 * kv_width + (3 if liger else 4) * ffn
    resident = 0
    for parameter in model.parameters():
        resident += parameter.numel() * parameter.element_size()
        if parameter.requires_grad:
            resident += 2 * parameter.numel() * parameter.element_size()  # AdamW's moments, in its dtype
    output_layer = 0 if liger else tokens * vocab * (element + 4 + 4)  # logits, fp32 copy, gradient
    return ActivationEstimate(
        resident=resident,
        per_layer=per_token * tokens * element,
        per_layer_checkpointed=hidden * tokens * element,
        output_layer=output_layer,
        layers=layers,
    )


@dataclass
class SpeedPlan:
    liger: bool
    liger_reason: str
    activations: str  # keep | recompute | offload
    recompute_every: int = 1
    reason: str = ""
    estimate_gib: float | None = None
    checkpoint_kwargs: dict[str, Any] = field(default_factory=dict)

    def apply(self, args: Any) -> None:
        """Set the TrainingArguments fields this plan decides."""
        args.use_liger_kernel = self.liger
        recompute = self.activations != "keep"
        kwargs = None
        if recompute:
            kwargs = {"use_reentrant": False, **self.checkpoint_kwargs}
            if self.recompute_every > 1:
                kwargs["every_n_layers"] = self.recompute_every
            if self.activations == "offload":
                kwargs["offload"] = True
        # transformers >= 5.2x reads `activation_checkpointing*`; earlier 5.x `gradient_checkpointing*`.
        for prefix in ("gradient", "activation"):
            if hasattr(args, f"{prefix}_checkpointing"):
                setattr(args, f"{prefix}_checkpointing", recompute)
                setattr(args, f"{prefix}_checkpointing_kwargs", kwargs)

    def describe(self) -> str:
        where = {
            "keep": "kept in GPU memory",
            "recompute": "recomputed in every layer" if self.recompute_every == 1
            else f"recomputed in 1 of every {self.recompute_every} decoder layers",
            "offload": "recomputed, layer inputs offloaded to CPU memory",
        }[self.activations]
        estimate = f", about {self.estimate_gib:.1f} GiB estimated" if self.estimate_gib is not None else ""
        return f"Liger kernels {self.liger_reason}; activations {where} ({self.reason}{estimate})"


def _recomputed_layers(layers: int, every: int) -> int:
    return math.ceil(layers / every)  # transformers checkpoints layers whose index % every == 0


def plan_activations(estimate: ActivationEstimate, budget: int) -> tuple[str, int, str, float]:
    """The fastest activation placement whose estimate fits `budget` bytes: keep everything,
    else recompute as few layers as fit (every N-th), else recompute all, else offload."""
    layers = estimate.layers
    if estimate.total(0) <= budget:
        return "keep", 1, "fits without recomputation", estimate.total(0) / GIB
    for every in range(layers, 0, -1):
        recomputed = _recomputed_layers(layers, every)
        if estimate.total(recomputed) <= budget:
            return "recompute", every, f"recomputing {recomputed} of {layers} layers fits", estimate.total(recomputed) / GIB
    return "offload", 1, "only offloading fits", estimate.total(layers, offloaded=True) / GIB


def plan_speed(
    speed: SpeedConfig,
    train: Any,
    model: torch.nn.Module,
    *,
    tokens_per_micro_batch: int,
    device: torch.device | str,
) -> SpeedPlan:
    """Resolve `speed` for the loaded (and method-prepared) model on `device`."""
    cuda = torch.device(device).type == "cuda"
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    liger, liger_reason = resolve_liger(speed.liger, model_type, cuda)
    explicit_checkpointing = "gradient_checkpointing" in train.model_fields_set
    user_kwargs = dict(train.gradient_checkpointing_kwargs or {}) if hasattr(train, "gradient_checkpointing_kwargs") else {}
    plan = SpeedPlan(liger, liger_reason, "keep", checkpoint_kwargs=user_kwargs)
    if speed.activations != "auto":
        plan.activations, plan.recompute_every, plan.reason = speed.activations, speed.recompute_every, "speed.activations"
        return plan
    if explicit_checkpointing or not cuda:
        plan.activations = "recompute" if train.gradient_checkpointing else "keep"
        plan.reason = "train.gradient_checkpointing" if explicit_checkpointing else "not on a GPU"
        return plan
    budget = (
        int(speed.memory_budget_gib * GIB)
        if speed.memory_budget_gib is not None
        else int(0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    )
    estimate = estimate_activations(model, tokens_per_micro_batch, liger)
    plan.activations, plan.recompute_every, reason, plan.estimate_gib = plan_activations(estimate, budget)
    plan.reason = f"{reason} in {budget / GIB:.1f} GiB"
    return plan


__all__ = [
    "ActivationEstimate",
    "SpeedPlan",
    "estimate_activations",
    "liger_model_types",
    "plan_activations",
    "plan_speed",
    "resolve_liger",
]
