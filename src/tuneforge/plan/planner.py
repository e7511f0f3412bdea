"""Know before you launch: memory per GPU, FLOPs and time for a config, without loading weights.

    plan = plan_config(load_config("run.yaml"), PlanOptions(gpus=2, gpu_memory_gib=80))
    print(plan.table())          # or json.dumps(plan.to_json())

The model is built on the meta device from its config (no weights are read or allocated), the
method is applied as training would apply it, and `estimate.estimate_memory` does the rest.
`tuneforge train` runs `check_before_training` on the model it loaded, with the same estimator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from tuneforge.config.schema import Config, LoraMethod
from tuneforge.config.targets import instantiate
from tuneforge.errors import ConfigError
from tuneforge.methods.prepare import ParameterCounts, count_parameters, prepare_model
from tuneforge.models.loading import DTYPES, load_model_config
from tuneforge.models.vlm import is_vlm_config
from tuneforge.plan.estimate import (
    CONTEXT_BYTES,
    GIB,
    MemoryEstimate,
    ModelShape,
    Strategy,
    computes_in_16bit,
    estimate_memory,
    expert_bytes,
    flops_per_token,
    recompute_flops_per_token,
)
from tuneforge.train.speed import plan_activations, resolve_compile, resolve_cuda_graphs, resolve_liger

# Dense bf16 datasheet peaks (TFLOP/s): the default denominator of the time estimate.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
DEFAULT_GPU_MEMORY_GIB = 80.0


@dataclass
class PlanOptions:
    gpus: int = 1
    gpu_memory_gib: float | None = None  # None: this machine's GPU, else DEFAULT_GPU_MEMORY_GIB
    strategy: str | None = None  # None: from the distributed section (or train.fsdp / train.deepspeed)
    peak_tflops: float | None = None  # None: this GPU's datasheet peak, else an H100's
    utilisation: float = 0.4  # model FLOPs utilisation the time estimate assumes
    tokens: int | None = None  # tokens in one epoch of the training data


@dataclass
class Plan:
    setup: dict[str, Any]
    parameters: ParameterCounts
    estimate: MemoryEstimate
    recompute_every: int  # 0: activations kept
    offload: bool
    gpu_memory: int
    flops_per_token: float
    train_tokens: int | None
    seconds: float | None
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.estimate.total(self.recompute_every, self.offload)

    @property
    def fits(self) -> bool:
        return self.peak + CONTEXT_BYTES <= self.gpu_memory

    def memory(self) -> dict[str, float]:
        e = self.estimate
        return {
            "weights": e.weights / GIB,
            "gradients": e.gradients / GIB,
            "optimizer": e.optimizer / GIB,
            "activations": e.activations(self.recompute_every, self.offload) / GIB,
            "buffers_and_workspace": (e.comm_buffers + e.graph_pool + e.runtime) / GIB,
            "peak_allocated": self.peak / GIB,
            "peak_with_cuda_context": (self.peak + CONTEXT_BYTES) / GIB,
            "gpu": self.gpu_memory / GIB,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.setup,
            "parameters": {"total": self.parameters.total, "trainable": self.parameters.trainable},
            "memory_gib": {key: round(value, 3) for key, value in self.memory().items()},
            "fits": self.fits,
            "flops_per_token": self.flops_per_token,
            "train_tokens": self.train_tokens,
            "estimated_seconds": self.seconds,
            "suggestions": self.suggestions,
            "notes": self.notes,
        }

    def table(self) -> str:
        s, memory = self.setup, self.memory()
        activations = (
            "kept" if not self.recompute_every
            else "offloaded" if self.offload
            else f"recomputed every {self.recompute_every} layers" if self.recompute_every > 1
            else "recomputed"
        )
        rows = [
            ("model", f"{s['model']} ({self.parameters.total / 1e9:.2f}B parameters)"),
            ("method", f"{s['method']}, {self.parameters.trainable:,} trainable ({100 * self.parameters.trainable / max(self.parameters.total, 1):.2f}%)"),
            ("setup", (f"{s['dtype']}{', ' + s['quantization'] if s['quantization'] != 'none' else ''}, Liger {'on' if s['liger'] else 'off'}, "
                       f"{'layers compiled, ' if s['compiled'] else ''}{'CUDA graphs, ' if s['graphed'] else ''}activations {activations}, micro-batch {s['micro_batch']} x {s['seq']} tokens, {s['gpus']} GPU(s), {s['strategy']}")),
        ]
        rows += [(f"  {key.replace('_', ' ')}", f"{value:8.2f} GiB") for key, value in memory.items()]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(("verdict", f"{verdict} ({memory['peak_with_cuda_context']:.1f} of {memory['gpu']:.1f} GiB per GPU)"))
        rows.append(("FLOPs per token", f"{self.flops_per_token / 1e9:.2f} GFLOP"))
        if self.seconds is not None and self.train_tokens is not None:
            rows.append(("time", (f"about {self.seconds / 3600:.2f} h for {self.train_tokens:,} tokens at "
                                  f"{s['utilisation']:.0%} of {s['peak_tflops']:.0f} TFLOP/s per GPU")))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"note: {note}" for note in self.notes]
        if self.suggestions:
            lines.append("to fit:" if not self.fits else "other options:")
            lines += [f"  - {suggestion}" for suggestion in self.suggestions]
        return "\n".join(lines)


def _planning_dtype(config: Config, model_config: Any) -> torch.dtype:
    """The dtype the weights will train in on a GPU (bf16 for `auto` random init and 4-bit bases)."""
    if config.model.dtype != "auto":
        return DTYPES[config.model.dtype]
    saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if config.model.init == "pretrained" and config.model.quantization == "none" and isinstance(saved, torch.dtype):
        return saved
    return torch.bfloat16


def build_meta_model(config: Config, method: Any = None) -> torch.nn.Module:
    """The model as training would prepare it, on the meta device: shapes and flags, no storage.

    Raises:
        ConfigError: a vision-language model assembled from parts (`model.vision`).
    """
    if config.model.vision is not None:
        raise ConfigError(
            "plan does not assemble vision-language models from a tower and a language model",
            where="model.vision",
            hint="plan the language model alone (drop model.vision), or a saved LLaVA checkpoint",
        )
    with torch.device("meta"):
        if config.model.builder is not None:
            model = instantiate(config.model.builder, "model.builder")
        else:
            model_config = load_model_config(config.model)
            auto_class = AutoModelForImageTextToText if is_vlm_config(model_config) else AutoModelForCausalLM
            model = auto_class.from_config(
                model_config, dtype=_planning_dtype(config, model_config), trust_remote_code=config.model.trust_remote_code
            )
    method = method or config.method
    if not isinstance(method, LoraMethod) and method.qat is not None:
        method = method.model_copy(update={"qat": None})  # fake quantization changes no stored byte
    model, _ = prepare_model(method, model, fused_lora=config.speed.fused_lora)
    return model


def _time_seconds(shape: ModelShape, config: Config, options: PlanOptions, plan: dict[str, Any],
                  weight_gradients: bool, recomputed: int) -> tuple[float, int | None, float | None]:
    seq = config.data.max_length
    per_token = flops_per_token(shape, seq, weight_gradients)
    train = config.train
    if train.max_steps and train.max_steps > 0:
        tokens = train.max_steps * plan["micro_batch"] * train.gradient_accumulation_steps * options.gpus * seq
    elif options.tokens is not None:
        tokens = int(options.tokens * train.num_train_epochs)
    else:
        return per_token, None, None
    work = tokens * (per_token + recompute_flops_per_token(shape, recomputed))
    return per_token, tokens, work / (options.gpus * plan["peak_tflops"] * 1e12 * options.utilisation)


def _gpu_defaults(options: PlanOptions) -> tuple[int, float]:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    memory = options.gpu_memory_gib
    if memory is None:
        memory = torch.cuda.get_device_properties(0).total_memory / GIB if name else DEFAULT_GPU_MEMORY_GIB
    peak = options.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), GPU_PEAK_TFLOPS["H100"])
    return int(memory * GIB), peak


def _activation_policy(config: Config, estimate: MemoryEstimate, budget: int) -> tuple[int, bool]:
    """(recompute every N layers or 0, offload) as `speed.activations` decides on a GPU."""
    speed = config.speed
    if speed.activations == "auto":
        if "gradient_checkpointing" in config.train.model_fields_set:
            return (1 if config.train.gradient_checkpointing else 0), False
        activations, every, _, _ = plan_activations(estimate, budget)
    else:
        activations, every = speed.activations, speed.recompute_every
    return {"keep": (0, False), "recompute": (every, False), "offload": (1, True)}[activations]


def _suggestions(config: Config, model: torch.nn.Module, options: PlanOptions, estimate: MemoryEstimate,
                 strategy: Strategy, liger: bool, quantization: str, budget: int) -> list[str]:
    """Changes that bring the peak under `budget`, cheapest in speed first."""
    found = []

    def fits(e: MemoryEstimate, every: int = 0, offload: bool = False) -> float | None:
        total = e.total(every, offload) + CONTEXT_BYTES
        return total / GIB if total <= budget else None

    activations, every, _, _ = plan_activations(estimate, budget)
    if config.speed.activations != activations and fits(estimate, 1 if activations == "offload" else every, activations == "offload"):
        setting = f"speed.activations={activations}" + (f" speed.recompute_every={every}" if activations == "recompute" and every > 1 else "")
        found.append(f"{setting}: {estimate.total(every, activations == 'offload') / GIB + CONTEXT_BYTES / GIB:.1f} GiB")
    micro_batch, accumulation = config.train.per_device_train_batch_size, config.train.gradient_accumulation_steps
    common = {"liger": liger, "quantization": quantization, "compute_16bit": computes_in_16bit(model, config.train),
              "optim": str(config.train.optim), "fp32_master": strategy.fp32_master,
              "master_copy": strategy.master_copy}
    # The largest smaller micro-batch that fits with activations kept, else with recomputation.
    options_by_speed = [
        (every, label, smaller)
        for every, label in ((0, ""), (1, " speed.activations=recompute"))
        for smaller in (micro_batch // 2**k for k in range(1, micro_batch.bit_length()))
    ]
    for every, label, smaller in options_by_speed:
        e = estimate_memory(model, smaller * config.data.max_length, gradient_accumulation=2, **common).sharded(strategy, options.gpus)
        gib = fits(e, every)
        if gib:
            found.append(f"train.per_device_train_batch_size={smaller} train.gradient_accumulation_steps="
                         f"{accumulation * micro_batch // smaller}{label}: {gib:.1f} GiB")
            break
    if options.gpus > 1:
        for name in ("fsdp", "zero3-offload"):
            other = Strategy.parse(name).with_precision_of(config)
            e = estimate_memory(model, micro_batch * config.data.max_length, gradient_accumulation=accumulation,
                                **{**common, "fp32_master": other.fp32_master, "master_copy": other.master_copy})
            gib = fits(e.sharded(other, options.gpus), 1)
            if gib and name != strategy.name:
                found.append(f"--strategy {name} with speed.activations=recompute: {gib:.1f} GiB")
                break
    if quantization == "none":
        lora = model if isinstance(config.method, LoraMethod) else build_meta_model(config, LoraMethod())
        common["quantization"] = "4bit"
        e = estimate_memory(lora, micro_batch * config.data.max_length, **common).sharded(strategy, options.gpus)
        for every in (0, 1):
            gib = fits(e, every)
            if gib:
                recompute = " speed.activations=recompute" if every else ""
                found.append(f"QLoRA: model.quantization=4bit method.name=lora{recompute}: {gib:.1f} GiB")
                break
    return found


def plan_config(config: Config, options: PlanOptions | None = None) -> Plan:
    """The memory, FLOPs and time plan for `config` on `options.gpus` GPUs."""
    options = options or PlanOptions()
    model = build_meta_model(config)
    shape = ModelShape.from_config(model.config)
    quantization = config.model.quantization
    # Planned for a CUDA GPU; `auto` assumes Liger where it is installed here and has kernels for the model.
    model_type = getattr(model.config, "model_type", "")
    liger = config.speed.liger if config.speed.liger != "auto" else resolve_liger("auto", model_type, cuda=True)[0]
    strategy = Strategy.parse(options.strategy).with_precision_of(config) if options.strategy else Strategy.from_config(config)
    gpu_memory, peak_tflops = _gpu_defaults(options)
    micro_batch = config.train.per_device_train_batch_size

    def estimate_for(compiled: bool, graphed: bool = False) -> MemoryEstimate:
        return estimate_memory(
            model, micro_batch * config.data.max_length, liger=liger, quantization=quantization,
            compute_16bit=computes_in_16bit(model, config.train), optim=str(config.train.optim),
            gradient_accumulation=config.train.gradient_accumulation_steps, fp32_master=strategy.fp32_master,
            master_copy=strategy.master_copy, compiled=compiled, graphed=graphed,
        ).sharded(strategy, options.gpus)

    estimate = estimate_for(config.speed.compile is True)
    recompute_every, offload = _activation_policy(config, estimate, gpu_memory)
    activations = "offload" if offload else "recompute" if recompute_every else "keep"
    graphed = activations != "keep" and resolve_cuda_graphs(config.speed.cuda_graphs, activations=activations, cuda=True)
    compiled = resolve_compile(
        config.speed.compile, four_bit=quantization == "4bit", activations=activations,
        recompute_every=recompute_every, strategy=strategy.name, triton_gpu=True, graphed=graphed,
    )
    if compiled != (config.speed.compile is True) or graphed:
        estimate = estimate_for(compiled, graphed)
    setup = {
        "model": config.model.path, "method": config.method.name, "quantization": quantization,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "liger": liger,
        "micro_batch": micro_batch, "seq": config.data.max_length, "gpus": options.gpus, "strategy": strategy.name,
        "recompute_every": recompute_every, "offload": offload, "compiled": compiled, "graphed": graphed,
        "peak_tflops": peak_tflops, "utilisation": options.utilisation,
    }
    weight_gradients = any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    per_token, tokens, seconds = _time_seconds(
        shape, config, options, setup, weight_gradients, estimate.recomputed_layers(recompute_every)
    )
    plan = Plan(setup, count_parameters(model), estimate, recompute_every, offload, gpu_memory, per_token, tokens, seconds)
    experts = expert_bytes(model) if quantization != "none" else 0
    if experts and quantization == "8bit":
        plan.notes.append(
            f"bitsandbytes quantizes linear layers only: this model's fused MoE experts ({experts / GIB:.1f} GiB, "
            f"3-D parameters) stay in {setup['dtype']}, counted so in the weights above"
        )
    elif experts:
        plan.notes.append(
            f"bitsandbytes quantizes linear layers only; tuneforge stores this model's fused MoE experts "
            f"({experts / GIB:.1f} GiB in 16 bits) as NF4 too, and dequantizes one layer's at a time while it "
            "computes (counted in the activations); LoRA adapts attention and the router, the 4-bit experts stay frozen"
        )
    if not plan.fits:
        plan.suggestions = _suggestions(config, model, options, estimate, strategy, liger, quantization, gpu_memory)
    return plan


def check_before_training(speed_plan: Any, device: Any) -> str:
    """One line on the predicted peak of the model as `speed_plan` (the resolved `SpeedPlan`:
    its estimate and activation placement) trains it; where it would not fit a GPU, a warning first.
    """
    estimate = speed_plan.estimate
    if estimate is None:
        return "memory plan: not available (the model's config names no transformer shape)"
    every = 0 if speed_plan.activations == "keep" else speed_plan.recompute_every
    peak = estimate.total(every, speed_plan.activations == "offload")
    line = (f"memory plan: about {peak / GIB:.1f} GiB peak per GPU (weights {estimate.weights / GIB:.1f}, "
            f"optimizer {estimate.optimizer / GIB:.1f}, activations {estimate.activations(every) / GIB:.1f})")
    if torch.device(device).type != "cuda":
        return line + "; no GPU here"
    capacity = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if peak + CONTEXT_BYTES > capacity:
        return (f"WARNING: {line} will not fit the GPU's {capacity / GIB:.1f} GiB: expect out of memory. "
                "Lower train.per_device_train_batch_size, set speed.activations=recompute, or see "
                "`tuneforge plan CONFIG` for the changes that fit")
    return line + f" of {capacity / GIB:.1f} GiB"


__all__ = ["Plan", "PlanOptions", "build_meta_model", "check_before_training", "plan_config"]
