"""Training memory and compute from a model's shape: the one estimator behind `tuneforge plan`,
the check at the start of `train` and `speed.activations: auto`.

    estimate = estimate_memory(model, tokens=4096, liger=True)   # model may live on the meta device
    estimate.total(recompute_every=0)                             # peak bytes per GPU, all kept
    estimate.sharded(Strategy.parse("zero3"), gpus=8)

It predicts `torch.cuda.max_memory_allocated`: weights, gradients, optimizer states, the
activations saved for the backward pass and the output layer. The activation terms count the
tensors autograd saves per token in each decoder layer (see `_saved_per_token`); they were
calibrated against peaks measured on an H200 (docs/planner.md), where they agree within 5%.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from tuneforge.errors import ConfigError
from tuneforge.models.parameters import full_numel, full_shape

GIB = 2**30
# Allocated beyond the tensors counted below (cuBLAS workspaces, rotary tables, the loss, the
# allocator's rounding to blocks): the residual of the H200 calibration in docs/planner.md.
RUNTIME_BYTES = int(0.6 * GIB)
# Not in max_memory_allocated but taken from the GPU all the same: the CUDA context and the
# caching allocator's fragmentation. Added when a prediction is compared with a GPU's memory.
CONTEXT_BYTES = int(1.5 * GIB)
# bitsandbytes NF4 with double quantization: 4 bits a weight, one 8-bit absmax per block of 64,
# and one fp32 constant per 256 blocks.
NF4_BYTES_PER_PARAMETER = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that its memory and FLOPs follow from."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (a VLM's text config) or a dict of its fields.

        Raises:
            ConfigError: the config has no hidden_size or num_hidden_layers.
        """
        if isinstance(config, dict):
            get = config.get
        else:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            get = lambda name, default=None: getattr(text, name, default)
        hidden, layers = get("hidden_size"), get("num_hidden_layers")
        if hidden is None or layers is None:
            raise ConfigError(
                "cannot estimate memory for this model (its config has no hidden_size / num_hidden_layers)",
                where="model",
                hint="speed.activations: choose keep, recompute or offload instead of auto",
            )
        heads = get("num_attention_heads") or 1
        return cls(
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            ffn=get("intermediate_size") or 4 * hidden,
            vocab=get("vocab_size") or 0,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def matmul_parameters(self) -> int:
        """Weights that multiply each token: the decoder layers' projections and the output head."""
        attention = 2 * self.hidden * self.q_width + 2 * self.hidden * self.kv_width
        return self.layers * (attention + 3 * self.hidden * self.ffn) + self.vocab * self.hidden


def flops_per_token(shape: ModelShape, seq: int, weight_gradients: bool) -> float:
    """Model FLOPs per trained token (no recomputation counted): 6N when the base weights train,
    4N when they are frozen (adapters: no weight gradients), plus causal attention."""
    attention = 6 * shape.layers * shape.q_width * seq  # QK^T and AV, causal (half), forward + backward (3x)
    return (6 if weight_gradients else 4) * shape.matmul_parameters + attention


def recompute_flops_per_token(shape: ModelShape, recomputed_layers: int) -> float:
    """What recomputation adds: one more forward (2 FLOPs a weight) of the recomputed layers."""
    per_layer = (shape.matmul_parameters - shape.vocab * shape.hidden) / max(shape.layers, 1)
    return 2 * per_layer * recomputed_layers


def model_flops_per_token(model: torch.nn.Module, seq: int) -> float | None:
    """`flops_per_token` for a loaded model, or None for one without a transformer's config."""
    try:
        shape = ModelShape.from_config(getattr(model, "config", None))
    except ConfigError:
        return None
    weight_gradients = any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    return flops_per_token(shape, seq, weight_gradients)


def matmul_peak_tflops() -> float | None:
    """The achieved bf16 matrix-product rate on this GPU, the denominator of MFU."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * repeats / (time.perf_counter() - started) / 1e12


def optimizer_state_bytes(optim: str, parameters: int, element_size: int) -> int:
    """Bytes an optimizer keeps for `parameters` trainable values stored with `element_size` bytes.

    torch's AdamW keeps two moments in the parameter's dtype (bf16 weights: bf16 moments);
    bitsandbytes' 8-bit optimizers one byte per moment; Lion one moment; SGD without momentum
    and Adafactor (factored second moment) next to nothing.
    """
    name = optim.lower()
    if "8bit" in name:
        return 2 * parameters
    if "lion" in name:
        return parameters * element_size
    if name.startswith("sgd") or "adafactor" in name:
        return 0
    return 2 * parameters * element_size


# DeepSpeed's default `stage3_max_live_parameters` and `sub_group_size` (elements), which the
# shipped zero3.json keeps.
ZERO3_DEFAULT_GROUP = 10**9


@dataclass(frozen=True)
class Strategy:
    """How N GPUs share the training state: replicated (DDP), or sharded (FSDP, ZeRO stages),
    optionally with the optimizer state (and parameters) in CPU memory."""

    name: str = "ddp"
    shard_optimizer: bool = False
    shard_gradients: bool = False
    shard_weights: bool = False
    offload_optimizer: bool = False
    offload_weights: bool = False
    # accelerate's FSDP2 under mixed precision upcasts the trainable parameters to fp32 (master
    # weights; each layer is cast to bf16 for compute): their gradients and optimizer state follow.
    fp32_master: bool = False
    # DeepSpeed under mixed precision keeps fp32 master weights beside the 16-bit ones it computes
    # with, as optimizer state (ZeRO shards it from stage 1); the gradients stay 16-bit.
    master_copy: bool = False

    NAMES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "zero2-offload", "zero3-offload", "fsdp-offload")

    @classmethod
    def parse(cls, name: str) -> Strategy:
        """One of NAMES: fsdp is full sharding (ZeRO-3); `-offload` moves the optimizer to CPU
        memory (ZeRO-3 and FSDP the parameters too).

        Raises:
            ConfigError: an unknown name.
        """
        base, _, offload = name.partition("-")
        stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}.get(base)
        if stage is None or offload not in ("", "offload") or (offload and stage < 2):
            raise ConfigError(f"unknown strategy {name!r}", where="--strategy", hint=", ".join(cls.NAMES))
        return cls(
            name=name,
            shard_optimizer=stage >= 1,
            shard_gradients=stage >= 2,
            shard_weights=stage >= 3,
            offload_optimizer=bool(offload),
            offload_weights=bool(offload) and stage >= 3,
        )

    def with_precision_of(self, config: Any) -> Strategy:
        """This strategy under `config`'s precision: with bf16/fp16 mixed precision FSDP holds
        the weights in fp32, DeepSpeed an fp32 master copy beside the 16-bit weights."""
        distributed = getattr(config, "distributed", None)
        mixed = bool(config.train.bf16 or config.train.fp16) or (
            distributed is not None and distributed.mixed_precision in ("bf16", "fp16")
        )
        return replace(
            self, fp32_master=self.name.startswith("fsdp") and mixed, master_copy=self.name.startswith("zero") and mixed
        )

    @classmethod
    def from_config(cls, config: Any) -> Strategy:
        """The strategy the `distributed` section chooses, else what `train.fsdp` / `train.deepspeed` ask for."""
        distributed = getattr(config, "distributed", None)
        if distributed is None or distributed.strategy == "ddp":
            return cls.from_train(config.train).with_precision_of(config)
        offload = distributed.offload_optimizer or distributed.offload_params
        if distributed.strategy == "fsdp":
            return cls.parse("fsdp-offload" if offload else "fsdp").with_precision_of(config)
        stage = distributed.zero_stage
        return cls.parse(f"zero{stage}" + ("-offload" if offload and stage >= 2 else "")).with_precision_of(config)

    @classmethod
    def from_train(cls, train: Any) -> Strategy:
        """The strategy a `train` section asks for through `fsdp` or a `deepspeed` config dict."""
        fsdp = getattr(train, "fsdp", None) or ""
        fsdp = " ".join(fsdp) if isinstance(fsdp, list) else str(fsdp)
        if fsdp:
            base = "zero2" if "shard_grad_op" in fsdp else "fsdp"
            return cls.parse(base + ("-offload" if "offload" in fsdp else ""))
        deepspeed = getattr(train, "deepspeed", None)
        if isinstance(deepspeed, dict):
            zero = deepspeed.get("zero_optimization", {})
            stage = int(zero.get("stage", 0))
            offload = stage >= 2 and str(zero.get("offload_optimizer", {}).get("device", "none")) == "cpu"
            return cls.parse((f"zero{stage}" if stage else "ddp") + ("-offload" if offload else ""))
        return cls()


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU holds while training, by kind (a planning estimate)."""

    weights: int
    gradients: int  # all of them, as at the end of the backward pass
    optimizer: int
    per_layer: int  # activations one decoder layer keeps for the backward pass
    per_layer_checkpointed: int  # what a recomputed layer keeps instead: its input
    output_layer: int  # the final norm, logits and their gradient (chunks with Liger's fused loss)
    forward_gradients: int  # gradients already held during the forward pass (accumulation, Liger's head)
    layers: int
    comm_buffers: int = 0  # ZeRO-1's gradient buckets, the gathered layer of FSDP and ZeRO-3
    # A 4-bit layer's linear weights in 16 bits, which its eager recomputation keeps for its
    # backward (`methods/fused_lora.py`; a compiled layer counts them in `per_layer`).
    recomputed_weights: int = 0
    # CUDA graphs of the recomputed layers (`speed.cuda_graphs`): their pool holds one layer's
    # activations and dense weights for good, beside a copy of one layer's weights.
    graph_pool: int = 0
    runtime: int = RUNTIME_BYTES

    def recomputed_layers(self, recompute_every: int) -> int:
        # transformers checkpoints the layers whose index % every == 0
        return math.ceil(self.layers / recompute_every) if recompute_every else 0

    def activations(self, recompute_every: int = 0, offload: bool = False) -> int:
        """Activation bytes at the peak with every `recompute_every`-th layer recomputed (0: none)."""
        recomputed = self.recomputed_layers(recompute_every)
        kept = (self.layers - recomputed) * self.per_layer
        inputs = 0 if offload else recomputed * self.per_layer_checkpointed
        # A recomputed layer's activations exist again, one layer at a time, during its backward.
        # When the last layer is kept, the layers freed before the first recomputation make room.
        last_recomputed = recompute_every and (self.layers - 1) % recompute_every == 0
        transient = self.per_layer + self.recomputed_weights if last_recomputed else 0
        return kept + inputs + transient + self.output_layer

    def total(self, recompute_every: int = 0, offload: bool = False) -> int:
        """The predicted peak: the activations' at the start of the backward pass, or the
        gradients' at its end, whichever is larger."""
        forward = self.forward_gradients + self.activations(recompute_every, offload)
        return self.weights + self.optimizer + self.comm_buffers + self.graph_pool + max(forward, self.gradients) + self.runtime

    def sharded(self, strategy: Strategy, gpus: int) -> MemoryEstimate:
        """Per-GPU bytes when `gpus` GPUs train together under `strategy`."""
        if gpus <= 1 and not (strategy.offload_optimizer or strategy.offload_weights):
            return self
        share = max(gpus, 1)
        weights = 0 if strategy.offload_weights else self.weights // share if strategy.shard_weights else self.weights
        gradients = self.gradients // share if strategy.shard_gradients else self.gradients
        optimizer = 0 if strategy.offload_optimizer else self.optimizer // share if strategy.shard_optimizer else self.optimizer
        if strategy.shard_weights:
            # The layer being computed is gathered whole (with the next one prefetched).
            buffers = 2 * (self.weights // max(self.layers, 1)) if gpus > 1 or strategy.offload_weights else 0
            if strategy.master_copy:
                # ZeRO-3's defaults: up to `stage3_max_live_parameters` gathered in 16 bits, and the
                # step upcasts one `sub_group_size` group of gradients to fp32 at a time.
                trained = self.gradients // 2  # 16-bit gradients: one per trained value
                buffers += min(ZERO3_DEFAULT_GROUP, self.weights // 2) * 2 + min(ZERO3_DEFAULT_GROUP, trained // share) * 4
        elif strategy.name == "ddp":
            buffers = 0  # tuneforge's DDP gradients are views into its buckets (`keep_gradients_in_buckets`)
        else:
            buffers = self.gradients if gpus > 1 and not strategy.shard_gradients else 0  # ZeRO-1's reduction buckets
        return replace(
            self, weights=weights, gradients=gradients, optimizer=optimizer, comm_buffers=buffers,
            forward_gradients=min(self.forward_gradients, gradients),
        )


def _decoder_layers(model: torch.nn.Module, layers: int) -> list[torch.nn.Module]:
    """The repeated decoder blocks: the largest ModuleList of `layers` entries."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    return max(lists, key=lambda m: sum(full_numel(p) for p in m.parameters()), default=[])


def _lora_modules(layer: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in layer.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _saved_per_token(
    shape: ModelShape, layer: torch.nn.Module, liger: bool, quantized: bool, compute_16bit: bool, compiled: bool = False
) -> int:
    """Elements (in the compute dtype) one decoder layer saves for the backward pass per token.

    Always: both norm inputs; queries after RoPE and the contiguous copy attention makes of them;
    keys and values and their copies; the attention output; the MLP's gate and up projections
    (and, without Liger's fused SwiGLU, the activation between them). Without Liger's RMSNorm a
    16-bit norm also keeps its fp32 input (twice the bytes).
    Linear inputs (norm outputs, the attention output's copy, the MLP activation; not the MLP
    activation when `install_fused_lora_mlp` applies, which recomputes it): kept once when
    the base weights train, or when adapters read them as they are (4-bit base, or tuneforge's
    fused LoRA forward). peft's LoRA forward on a 16-bit base instead keeps one copy per adapted
    linear: it casts the input to the adapters' fp32, autocast back to bf16, and that copy is what
    the adapter's matmul saves. Not the two norm outputs when every adapter runs with its base as
    one function over Liger's norms in layers not compiled (`install_norm_recompute`).
    """
    from tuneforge.methods.fused_lora import recomputes_swiglu_product, runs_with_its_base

    h, q, kv, ffn = shape.hidden, shape.q_width, shape.kv_width, shape.ffn
    norms = 2 * h if liger else 2 * h * (2 if compute_16bit else 1)
    # With the fused LoRA MLP neither the SwiGLU nor the down projection keeps their product.
    fused_mlp = recomputes_swiglu_product(getattr(layer, "mlp", torch.nn.Module()))
    saved = norms + 2 * q + 4 * kv + q + (2 if liger or fused_mlp else 3) * ffn
    linear_inputs = 2 * h + q + (0 if fused_mlp else ffn)
    base_trains = any(
        p.requires_grad for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name
        for p in m.parameters(recurse=False)
    )
    adapters = _lora_modules(layer)
    if base_trains or (adapters and (quantized or all(_reads_input_as_is(m) for m in adapters))):
        norms_recomputed = liger and not compiled and not base_trains and all(runs_with_its_base(m) for m in adapters)
        saved += linear_inputs - (2 * h if norms_recomputed else 0)
    elif adapters:
        saved += sum(m.base_layer.in_features for m in adapters if hasattr(m.base_layer, "in_features"))
    # Each adapter's low-rank activation, input of its second matmul.
    saved += sum(a.out_features for m in adapters for a in m.lora_A.values())
    return saved


def _reads_input_as_is(module: torch.nn.Module) -> bool:
    """The LoRA layer's adapters run tuneforge's fused forward (methods/fused_lora.py)."""
    from tuneforge.methods.fused_lora import FusedLora

    return all(isinstance(module.lora_variant.get(name), FusedLora) for name in module.lora_A)


def _is_quantized_weight(model: torch.nn.Module, module: torch.nn.Module, name: str) -> bool:
    """bitsandbytes quantizes every linear layer but the output head (and not peft's adapters)."""
    return (
        isinstance(module, torch.nn.Linear)
        and "lora_" not in name
        and module is not model.get_output_embeddings()
    )


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of fused mixture-of-experts weights in 16 bits: parameters of three or more
    dimensions (one matrix per expert, as transformers 5 stores Mixtral's and Qwen-MoE's
    experts). bitsandbytes quantizes `nn.Linear` layers only: with an 8-bit base these stay in
    16 bits; with a 4-bit one tuneforge stores them as NF4 (`models/quantized_experts.py`) and
    dequantizes one layer's at a time."""
    return sum(
        _expert_values(p) * 2 for name, p in model.named_parameters() if _is_expert(name, p)
    )


def _is_expert(name: str, parameter: torch.Tensor) -> bool:
    # A stored NF4 expert weight is the parametrization's packed `original0` (2-D, uint8).
    return "lora_" not in name and (len(full_shape(parameter)) >= 3 or name.endswith(".original0"))


def _expert_values(parameter: torch.Tensor) -> int:
    """Values of a fused expert weight, whether 16-bit or packed NF4 (two values a byte)."""
    return full_numel(parameter) * (2 if parameter.dtype == torch.uint8 else 1)


def weight_bytes(model: torch.nn.Module, quantization: str = "none") -> int:
    """Bytes of the weights; with `quantization` (4bit, 8bit) the linear layers' as bitsandbytes
    stores them, whether `model` is already quantized or a 16-bit (meta) model to plan for."""
    if quantization == "none":
        return sum(full_numel(p) * p.element_size() for p in model.parameters())
    quantized: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if _is_quantized_weight(model, module, name) and id(module.weight) not in quantized:
            weight = module.weight
            quantized.add(id(weight))
            # A loaded 4-bit weight is packed, two values a byte.
            values = weight.numel() * (2 if weight.dtype == torch.uint8 and quantization == "4bit" else 1)
            total += int(values * NF4_BYTES_PER_PARAMETER) if quantization == "4bit" else values + 4 * module.out_features
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) not in quantized and id(parameter) not in seen:
            seen.add(id(parameter))
            if quantization == "4bit" and _is_expert(name, parameter):
                total += int(_expert_values(parameter) * NF4_BYTES_PER_PARAMETER)
            else:
                total += full_numel(parameter) * parameter.element_size()
    return total


def computes_in_16bit(model: torch.nn.Module, train: Any) -> bool:
    """bf16/fp16 compute: 16-bit weights, or mixed precision (`train.bf16` / `train.fp16`)."""
    if getattr(train, "bf16", False) or getattr(train, "fp16", False):
        return True
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    return floating is not None and floating.element_size() == 2


def estimate_memory(
    model: torch.nn.Module,
    tokens: int,
    *,
    liger: bool,
    quantization: str | None = None,
    compute_16bit: bool = True,
    optim: str = "adamw_torch",
    gradient_accumulation: int = 1,
    fp32_master: bool = False,
    master_copy: bool = False,
    compiled: bool = False,
    graphed: bool = False,
) -> MemoryEstimate:
    """Estimate a decoder-only transformer's training memory for `tokens` per micro-batch.

    Args:
        model: the model as it will train (method applied); the meta device is enough.
        tokens: micro-batch size times sequence length.
        liger: Liger's kernels run (fused RMSNorm, SwiGLU, output layer + loss).
        quantization: the base weights' bitsandbytes quantization; None reads it from `model`.
        compute_16bit: bf16/fp16 compute (16-bit weights, or autocast); False for fp32.
        optim: `train.optim`, for the optimizer state's size.
        gradient_accumulation: above 1, the gradients stay allocated through the forward passes.
        fp32_master: the engine holds the trainable parameters in fp32 (`Strategy.fp32_master`).
        master_copy: the engine keeps an fp32 copy of them as optimizer state (`Strategy.master_copy`).
        compiled: the decoder layers are compiled (`speed.compile`): norm outputs are kept, and
            so are a 4-bit layer's dequantized weights.
        graphed: the recomputed layers replay CUDA graphs (`speed.cuda_graphs`), whose memory pool
            keeps what one layer's recomputation and backward use (measured 1.0-1.2 GiB on QLoRA-8B
            at 4096 tokens), with a copy of one layer's weights.
    """
    shape = ModelShape.from_config(getattr(model, "config", None))
    if quantization is None:
        quantization = "4bit" if getattr(model, "is_loaded_in_4bit", False) else (
            "8bit" if getattr(model, "is_loaded_in_8bit", False) else "none"
        )
    element = 2 if compute_16bit else 4
    gradients = optimizer = upcast = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            floating = parameter.is_floating_point()
            size = 4 if (fp32_master or master_copy) and floating else parameter.element_size()
            gradients += full_numel(parameter) * (parameter.element_size() if master_copy else size)
            optimizer += optimizer_state_bytes(optim, full_numel(parameter), size)
            if master_copy and floating:
                optimizer += full_numel(parameter) * 4
            else:
                upcast += full_numel(parameter) * (size - parameter.element_size())

    # A layer before which nothing trains passes no gradient back and saves nothing.
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    flowing = embeddings is not None and any(p.requires_grad for p in embeddings.parameters())
    per_layer, dense_weights, layer_weights = [], [], []
    for layer in _decoder_layers(model, shape.layers):
        flowing = flowing or any(p.requires_grad for p in layer.parameters())
        saved = _saved_per_token(shape, layer, liger, quantization != "none", compute_16bit, compiled) * tokens * element if flowing else 0
        # NF4 experts are dequantized while their layer computes, and the expert matmuls keep
        # the 16-bit weights for the backward pass.
        experts = expert_bytes(layer) if quantization == "4bit" and flowing else 0
        quantized = [module.weight for name, module in layer.named_modules() if _is_quantized_weight(model, module, name)]
        dense = 2 * sum(  # the layer's 4-bit linear weights in 16 bits
            weight.numel() * (2 if weight.dtype == torch.uint8 else 1) for weight in quantized  # packed: two values a byte
        ) if quantization == "4bit" and flowing else 0
        # A compiled layer's graph dequantizes each weight once for its forward and backward (one
        # call, merged), so it keeps them all; eager, only a recomputed layer keeps them, briefly.
        per_layer.append(saved + experts + (dense if compiled else 0))
        dense_weights.append(0 if compiled else dense)
        # A copy of the layer's weights as they are stored (4-bit ones packed, four to a 16-bit value).
        stored = sum(full_numel(p) * p.element_size() for p in layer.parameters())
        layer_weights.append(stored - sum(w.numel() * w.element_size() for w in quantized) + dense // 4 if dense else stored)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_trains = head is not None and head.weight.requires_grad
    if liger:
        # Final norm input and output, the gradient of its output, and fp32 logits of one chunk
        # (Liger sizes chunks so chunk x vocab is about tokens x hidden) and their gradient.
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / max(1, math.ceil(shape.vocab / shape.hidden))))))
        output_layer = 3 * tokens * shape.hidden * element + 2 * chunk * shape.vocab * 4
        # The fused loss computes the head's weight gradient during the forward pass.
        head_gradient = full_numel(head.weight) * head.weight.element_size() if head_trains else 0
    else:
        output_layer = 2 * tokens * shape.hidden * element + tokens * shape.vocab * (element + 4 + 4)  # logits, fp32, gradient
        head_gradient = 0
    return MemoryEstimate(
        weights=weight_bytes(model, quantization) + upcast,
        gradients=gradients,
        optimizer=optimizer,
        per_layer=max(per_layer, default=0),
        per_layer_checkpointed=shape.hidden * tokens * element,
        output_layer=output_layer,
        forward_gradients=gradients if gradient_accumulation > 1 else head_gradient,
        layers=shape.layers,
        recomputed_weights=max(dense_weights, default=0),
        graph_pool=max(per_layer, default=0) + max(dense_weights, default=0) + max(layer_weights, default=0) if graphed else 0,
    )


__all__ = [
    "CONTEXT_BYTES",
    "GIB",
    "MemoryEstimate",
    "ModelShape",
    "Strategy",
    "computes_in_16bit",
    "estimate_memory",
    "expert_bytes",
    "flops_per_token",
    "matmul_peak_tflops",
    "model_flops_per_token",
    "optimizer_state_bytes",
    "recompute_flops_per_token",
    "weight_bytes",
]
