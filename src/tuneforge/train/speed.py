"""Speed settings resolved for this machine and model: which kernels run, where activations live.

    plan = plan_speed(config.speed, config.train, model, tokens_per_micro_batch=4096)
    plan.apply(args)        # TrainingArguments: use_liger_kernel, gradient checkpointing kwargs
    print(plan.describe())

Everything here selects features that transformers and Liger already implement: Liger's kernels
through `TrainingArguments.use_liger_kernel`, selective recomputation through
`gradient_checkpointing_kwargs={"every_n_layers": N}` (handled by
`PreTrainedModel.gradient_checkpointing_enable`). What tuneforge adds is the choice (`auto` picks
the fastest setting the GPU's memory holds) and how the recomputed layers run
(`LayerCheckpointing`: re-entrant where exact, inputs offloaded on a side stream).
"""

from __future__ import annotations

import contextlib
import importlib.util
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback

from tuneforge.config.schema import SpeedConfig
from tuneforge.errors import ConfigError
from tuneforge.plan.estimate import (
    CONTEXT_BYTES,
    GIB,
    MemoryEstimate,
    Strategy,
    computes_in_16bit,
    estimate_memory,
)
from tuneforge.train.layer_graphs import LayerGraphs


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


# Liger kernels a compiled decoder layer leaves to inductor, which fuses the same elementwise work:
# Liger routes RoPE and SwiGLU through its `dispatch`, which `torch.compiler.disable` keeps out of
# any graph (each call split a compiled layer in two), and inductor (torch 2.11) failed on its
# RMSNorm kernels when a new sequence length recompiled the layer. The fused output layer and
# cross-entropy, outside the layers, stay.
LIGER_KERNELS_LEFT_TO_INDUCTOR = ("rope", "swiglu", "rms_norm")


@dataclass
class SpeedPlan:
    liger: bool
    liger_reason: str
    activations: str  # keep | recompute | offload
    compiled: bool = False  # speed.compile: the decoder layers are compiled
    graphed: bool = False  # speed.cuda_graphs: recomputed layers replay CUDA graphs
    recompute_every: int = 1
    reason: str = ""
    estimate_gib: float | None = None
    checkpoint_kwargs: dict[str, Any] = field(default_factory=dict)
    # Per-GPU memory estimate of the model as it trains (sharded as the run shards it); None
    # when the model's config names no transformer shape.
    estimate: MemoryEstimate | None = None

    def apply(self, args: Any) -> None:
        """Set the TrainingArguments fields this plan decides."""
        args.use_liger_kernel = self.liger
        if self.liger and self.compiled:
            args.liger_kernel_config = {**(args.liger_kernel_config or {}), **dict.fromkeys(LIGER_KERNELS_LEFT_TO_INDUCTOR, False)}
        recompute = self.activations != "keep"
        kwargs = None
        if recompute:
            kwargs = {"use_reentrant": False, **self.checkpoint_kwargs}
            if self.recompute_every > 1:
                kwargs["every_n_layers"] = self.recompute_every
        # transformers >= 5.2x reads `activation_checkpointing*`; earlier 5.x `gradient_checkpointing*`.
        for prefix in ("gradient", "activation"):
            if hasattr(args, f"{prefix}_checkpointing"):
                setattr(args, f"{prefix}_checkpointing", recompute)
                setattr(args, f"{prefix}_checkpointing_kwargs", kwargs)

    def layer_checkpointing(self, args: Any, engine: str, report: Callable[[str], None] = print) -> LayerCheckpointing | None:
        """The callback that runs the recomputed layers as planned (None when nothing is recomputed);
        `report` prints what the CUDA graphs did."""
        if self.activations == "keep":
            return None
        return LayerCheckpointing(
            reentrant=reentrant_checkpointing_applies(args, engine), offload=self.activations == "offload",
            graphs=self.graphed, report=report,
        )

    def describe(self) -> str:
        where = {
            "keep": "kept in GPU memory",
            "recompute": "recomputed in every layer" if self.recompute_every == 1
            else f"recomputed in 1 of every {self.recompute_every} decoder layers",
            "offload": "recomputed, layer inputs offloaded to CPU memory",
        }[self.activations]
        estimate = f", about {self.estimate_gib:.1f} GiB estimated" if self.estimate_gib is not None else ""
        liger = self.liger_reason
        if self.liger and self.compiled:
            liger += f" (not {', '.join(LIGER_KERNELS_LEFT_TO_INDUCTOR)}: compiled layers fuse them)"
        graphs = "; recomputed layers replay CUDA graphs" if self.graphed else ""
        return f"Liger kernels {liger}; activations {where} ({self.reason}{estimate}){graphs}"


def plan_activations(estimate: MemoryEstimate, budget: int) -> tuple[str, int, str, float]:
    """The fastest activation placement whose estimate (plus the CUDA context) fits `budget`
    bytes: keep everything, else recompute as few layers as fit (every N-th), else recompute
    all, else offload. Returns the placement, N, why, and the estimated peak in GiB."""
    layers = estimate.layers
    if estimate.total() + CONTEXT_BYTES <= budget:
        return "keep", 1, "fits without recomputation", estimate.total() / GIB
    for every in range(layers, 0, -1):
        if estimate.total(every) + CONTEXT_BYTES <= budget:
            recomputed = estimate.recomputed_layers(every)
            return "recompute", every, f"recomputing {recomputed} of {layers} layers fits", estimate.total(every) / GIB
    return "offload", 1, "only offloading fits", estimate.total(1, offload=True) / GIB


def _recomputes_every_layer(activations: str, recompute_every: int) -> bool:
    return activations == "offload" or (activations == "recompute" and recompute_every == 1)


def resolve_cuda_graphs(setting: bool, *, activations: str, cuda: bool) -> bool:
    """Whether recomputed decoder layers replay CUDA graphs (`train/layer_graphs.py`).

    Raises:
        ConfigError: `speed.cuda_graphs: true` where no layer is recomputed, or off CUDA.
    """
    if setting and (activations == "keep" or not cuda):
        raise ConfigError(
            "speed.cuda_graphs replays recomputed decoder layers on a CUDA GPU; "
            + ("this run keeps every layer's activations" if cuda else "this run has no CUDA GPU"),
            where="speed.cuda_graphs", hint="set speed.activations: recompute or offload, or cuda_graphs: false",
        )
    return setting


def resolve_compile(setting: bool | str, *, four_bit: bool, activations: str, recompute_every: int, strategy: str, triton_gpu: bool,
                    graphed: bool = False) -> bool:
    """Whether the decoder layers are compiled. `auto` compiles where it was measured to pay: a
    4-bit model with every layer recomputed, whose eager step leaves the GPU waiting for Python
    between its small adapter and dequantization kernels (QLoRA-8B offloaded on an H200: 9,171
    tok/s compiled against 7,103 eager, docs/benchmarks.md). Compiled layers that keep their
    activations keep their dequantized weights too, and ran slower; 16-bit LoRA gained nothing.
    Only on a GPU inductor generates Triton kernels for (`triton_gpu`), with DDP or one GPU (a
    sharding engine hooks into each layer). Not where the layers replay CUDA graphs (`graphed`),
    which capture them eager: replayed, the eager layers ran as fast on an H200."""
    if setting != "auto":
        return bool(setting)
    return four_bit and _recomputes_every_layer(activations, recompute_every) and strategy == "ddp" and triton_gpu and not graphed


def plan_speed(
    speed: SpeedConfig,
    train: Any,
    model: torch.nn.Module,
    *,
    tokens_per_micro_batch: int,
    device: torch.device | str,
    sharding: tuple[Strategy, int] = (Strategy(), 1),
) -> SpeedPlan:
    """Resolve `speed` for the loaded (and method-prepared) model on `device`; `sharding` is
    the engine and process count sharing the training state (the estimate is per GPU)."""
    cuda = torch.device(device).type == "cuda"
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    liger, liger_reason = resolve_liger(speed.liger, model_type, cuda)
    explicit_checkpointing = "gradient_checkpointing" in train.model_fields_set
    user_kwargs = dict(train.gradient_checkpointing_kwargs or {}) if hasattr(train, "gradient_checkpointing_kwargs") else {}
    plan = SpeedPlan(liger, liger_reason, "keep", compiled=speed.compile is True, checkpoint_kwargs=user_kwargs)

    def estimate() -> MemoryEstimate:
        return estimate_memory(
            model, tokens_per_micro_batch, liger=liger, compute_16bit=computes_in_16bit(model, train),
            optim=str(getattr(train, "optim", "adamw_torch")),
            gradient_accumulation=getattr(train, "gradient_accumulation_steps", 1), fp32_master=sharding[0].fp32_master,
            master_copy=sharding[0].master_copy, compiled=plan.compiled, graphed=plan.graphed,
        ).sharded(*sharding)

    try:
        plan.estimate = estimate()
    except ConfigError:
        if speed.activations == "auto" and cuda and not explicit_checkpointing:
            raise  # auto has nothing to decide with: the error says to choose a placement
    if speed.activations != "auto":
        plan.activations, plan.recompute_every, plan.reason = speed.activations, speed.recompute_every, "speed.activations"
    elif explicit_checkpointing or not cuda:
        plan.activations = "recompute" if train.gradient_checkpointing else "keep"
        plan.reason = "train.gradient_checkpointing" if explicit_checkpointing else "not on a GPU"
    else:
        budget = (
            int(speed.memory_budget_gib * GIB)
            if speed.memory_budget_gib is not None
            else int(0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
        )
        plan.activations, plan.recompute_every, reason, plan.estimate_gib = plan_activations(plan.estimate, budget)
        plan.reason = f"{reason} in {budget / GIB:.1f} GiB"
    four_bit = bool(getattr(model, "is_loaded_in_4bit", False))
    graphed = resolve_cuda_graphs(speed.cuda_graphs, activations=plan.activations, cuda=cuda)
    compiled = resolve_compile(
        speed.compile, four_bit=four_bit, activations=plan.activations,
        recompute_every=plan.recompute_every, strategy=sharding[0].name,
        triton_gpu=cuda and importlib.util.find_spec("triton") is not None, graphed=graphed,
    )
    if (compiled, graphed) != (plan.compiled, plan.graphed):
        plan.compiled, plan.graphed = compiled, graphed
        if plan.estimate is not None:  # None: the model's config names no shape to estimate
            plan.estimate = estimate()
        if plan.estimate_gib is not None:
            plan.estimate_gib = plan.estimate.total(plan.recompute_every, offload=plan.activations == "offload") / GIB
    return plan


def reentrant_is_exact(function: Any, args: tuple[Any, ...]) -> bool:
    """Whether re-entrant checkpointing gives every gradient for this call of a layer.

    Re-entrant checkpointing runs the layer as one autograd function of its positional
    tensors: when none of them requires a gradient the output does not either, and the
    parameters inside get none; a tensor passed by keyword (bound into `function`, a
    `functools.partial`) gets none. Non-re-entrant checkpointing has neither gap.
    """
    if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return False
    keywords = getattr(function, "keywords", {}) or {}
    return not any(isinstance(value, torch.Tensor) and value.requires_grad for value in keywords.values())


class _Offloaded:
    """One saved tensor in pinned CPU memory; `ahead`: its copy back, queued before it was asked for."""

    __slots__ = ("__weakref__", "ahead", "copied", "device", "host", "layer", "unpacked")

    def __init__(self, device: torch.device, host: torch.Tensor, copied: torch.cuda.Event, layer: _OffloadedLayer) -> None:
        self.device, self.host, self.copied, self.layer = device, host, copied, layer
        self.ahead: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self.unpacked = False


class _OffloadedLayer:
    """The tensors one offloaded call saved, and the call offloaded before it: the backward pass
    asks for the layers in reverse order, so unpacking one layer fetches the one before it."""

    __slots__ = ("__weakref__", "fetched", "previous", "saved")

    def __init__(self, previous: weakref.ref[_OffloadedLayer] | None) -> None:
        # Weak references to its tensors and to the previous layer: the autograd graph alone keeps
        # saved tensors (and, through them, their layer) alive.
        self.saved: list[weakref.ref[_Offloaded]] = []
        self.previous = previous
        self.fetched = False


class OffloadToCpu(torch.autograd.graph.saved_tensors_hooks):
    """Tensors saved for the backward pass under it live in pinned CPU memory.

    Unlike `torch.autograd.graph.save_on_cpu` (what transformers' `offload` uses), the copies run
    on a side CUDA stream instead of queueing in front of the compute: the copy out overlaps the
    next layer's forward, and when the backward pass unpacks one layer's tensors the previous
    layer's are copied back, overlapping this layer's backward. Each use of the context is one
    layer. CPU tensors are kept as they are.
    """

    _streams: ClassVar[dict[torch.device, torch.cuda.Stream]] = {}  # one copy stream a GPU
    _last: ClassVar[weakref.ref[_OffloadedLayer] | None] = None  # the layer offloaded last

    def __init__(self) -> None:
        self.layer = _OffloadedLayer(OffloadToCpu._last)
        OffloadToCpu._last = weakref.ref(self.layer)
        super().__init__(self._pack, self._unpack)

    @classmethod
    def _stream(cls, device: torch.device) -> torch.cuda.Stream:
        return cls._streams.setdefault(device, torch.cuda.Stream(device))

    def _pack(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type != "cuda":
            return tensor
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # written by kernels queued before this point
        with torch.cuda.stream(stream):
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = stream.record_event()
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        saved = _Offloaded(tensor.device, host, copied, self.layer)
        self.layer.saved.append(weakref.ref(saved))
        return saved

    @classmethod
    def _unpack(cls, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        compute = torch.cuda.current_stream(saved.device)
        if saved.ahead is not None:
            tensor, ready = saved.ahead
            saved.ahead = None
            compute.wait_event(ready)
            tensor.record_stream(compute)  # allocated on the copy stream, read on this one
        else:
            compute.wait_event(saved.copied)
            tensor = saved.host.to(saved.device, non_blocking=True)
        saved.unpacked = True
        cls._fetch_ahead(saved.layer.previous)
        return tensor

    @classmethod
    def _fetch_ahead(cls, reference: weakref.ref[_OffloadedLayer] | None) -> int:
        """Queue the copy back of a layer's tensors not yet unpacked; how many were queued."""
        layer = reference() if reference is not None else None
        if layer is None or layer.fetched:
            return 0
        layer.fetched = True
        queued = 0
        for saved in (ref() for ref in layer.saved):
            if saved is None or saved.unpacked or saved.ahead is not None:
                continue
            stream = cls._stream(saved.device)  # where its copy out was queued: runs after it
            with torch.cuda.stream(stream):
                tensor = saved.host.to(saved.device, non_blocking=True)
                saved.ahead = (tensor, stream.record_event())
            queued += 1
        return queued


class _LayerCheckpoint:
    """A decoder layer's checkpoint function: re-entrant where that is exact
    (`reentrant_is_exact`) and allowed, the layer's inputs offloaded when asked."""

    def __init__(self, checkpoint: Any, reentrant: bool, offload: bool, graphs: LayerGraphs | None = None) -> None:
        self.checkpoint = checkpoint  # transformers' partial(checkpoint, use_reentrant=False, ...)
        self.reentrant = reentrant
        self.offload = offload
        self.graphs = graphs

    def __call__(self, function: Any, *args: Any) -> Any:
        reentrant = self.reentrant and reentrant_is_exact(function, args)
        if reentrant and self.graphs is not None:
            # Before the offload context: a capture's own saved tensors stay on the GPU.
            function = self.graphs.wrap(function, args)
        with OffloadToCpu() if self.offload else contextlib.nullcontext():
            return self.checkpoint(function, *args, **({"use_reentrant": True} if reentrant else {}))


class LayerCheckpointing(TrainerCallback):
    """How recomputed decoder layers run: re-entrant checkpointing where allowed, inputs
    offloaded to CPU memory for `speed.activations: offload`.

    Non-re-entrant checkpointing, transformers' default, runs a Python hook for every tensor a
    layer saves, in the forward and again in the recomputation: on an 8B LoRA step the GPU
    waited for the host 153 ms of 495; re-entrant, 70 ms (docs/benchmarks.md). Re-entrant
    checkpointing misses gradients in the cases `reentrant_is_exact` rules out, which keep the
    non-re-entrant path, and it cannot mark DDP's gradients ready during the unused-parameter
    search, so runs with that search and the sharding engines keep it off (`reentrant=False`).
    The Trainer enables checkpointing inside `train()`, so the swap happens at its start.
    """

    def __init__(self, reentrant: bool, offload: bool, graphs: bool = False, report: Callable[[str], None] = print) -> None:
        self.reentrant = reentrant
        self.offload = offload
        # One capture serves every layer (`train/layer_graphs.py`); only re-entrant calls replay it.
        self.graphs = LayerGraphs(report) if graphs and reentrant else None
        self.report = report
        if graphs and not reentrant:
            report("CUDA graphs off: they replay re-entrant recomputation, which this run cannot use "
                   "(DDP's unused-parameter search or a sharding engine)")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(module, GradientCheckpointingLayer) and func is not None and not isinstance(func, _LayerCheckpoint):
                module._gradient_checkpointing_func = _LayerCheckpoint(func, self.reentrant, self.offload, self.graphs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.graphs is not None:
            self.report(self.graphs.describe())


class FusedLoraActivations(TrainerCallback):
    """What fused LoRA adapters let a layer not keep: the `silu(gate) * up` product of SwiGLU MLPs
    with a fused LoRA down projection (`methods.fused_lora.install_fused_lora_mlp`) and, unless the
    layers are compiled, the outputs of norms read by fused adapters (`install_norm_recompute`).
    Installed when training begins, after the Trainer's Liger patch, which binds its own MLP and
    norm forwards."""

    def __init__(self, norm_outputs: bool = True) -> None:
        self.norm_outputs = norm_outputs

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from tuneforge.methods.fused_lora import install_fused_lora_mlp, install_norm_recompute

        install_fused_lora_mlp(model)
        if self.norm_outputs:
            install_norm_recompute(model)


def reentrant_checkpointing_applies(args: Any, engine: str) -> bool:
    """Re-entrant checkpointing is for one process or DDP without the unused-parameter search."""
    return engine == "ddp" and not args.ddp_find_unused_parameters


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """`torch.compile` each decoder layer's forward (`nn.Module.compile`: the module stays in
    place, so checkpoint wrapping, hooks and state-dict names are unchanged). The layers share
    their code, so one compiled graph serves them all. Returns how many were compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


__all__ = [
    "FusedLoraActivations",
    "LIGER_KERNELS_LEFT_TO_INDUCTOR",
    "LayerCheckpointing",
    "OffloadToCpu",
    "SpeedPlan",
    "compile_decoder_layers",
    "liger_model_types",
    "plan_activations",
    "plan_speed",
    "reentrant_checkpointing_applies",
    "reentrant_is_exact",
    "resolve_compile",
    "resolve_cuda_graphs",
    "resolve_liger",
]
