"""A LoRA forward that adds the adapter's product to the base output in one matmul.

peft's LoRA linear computes `result + lora_B(lora_A(x.to(fp32))) * scaling`: with a bf16 base and
fp32 adapters (peft's default) every adapted linear copies its input to fp32, autocast copies it
back to bf16 and keeps that copy for the backward pass (q, k and v each keep their own), and the
scale and the add are two more passes over the output. On an 8B model those copies were 30-60% of
a LoRA step's GPU time (docs/benchmarks.md). Here the same sum is one autograd function:

    x_a = x @ A.T                       (tokens x r)
    out = addmm(result, x_a, B.T, alpha=scaling)   (the add and the scale in the matmul)

(in a compiled layer on a GPU, the add is `low_rank_add`'s Triton kernel, in place) in the base
output's dtype, with the adapters' weights cast (r rows, small) instead of the
activations, and the input saved as it is (the same tensor the base layer and the other adapters
reading it hold). Gradients for A and B come back in the adapters' own dtype (fp32 master copies).

It plugs into peft through its LoRA-variant slot (`LoraLayer.lora_variant`, the hook DoRA uses)
and peft's `cast_input_dtype_enabled` switch; the adapter, its config and saved files stay plain
LoRA. `speed.fused_lora: false` keeps peft's own forward.

A SwiGLU MLP whose down projection carries such an adapter goes one step further
(`install_fused_lora_mlp`): the adapter needs the down projection's input, `silu(gate) * up`, for
its gradient, and keeping it costs `ffn` values a token in every layer (3.5 GiB on an 8B model at
4096 tokens a step). `_SwiGLUDownLora` keeps the gate and up projections instead, which the
SwiGLU backward keeps anyway, and recomputes the product, one elementwise pass, in the backward.

When the layer has just that one adapter, without dropout, over a frozen 16-bit or bitsandbytes
4-bit linear, the base matmul joins it (`_FrozenLinearLora`) and peft's forward is skipped: a LoRA
step is partly bound by host work (Python launching small kernels), and on a 4-bit base peft runs
bitsandbytes' own autograd function through several Python layers, clones its output and adds
the adapter in a second autograd node, which left the GPU idle for a third of an 8B QLoRA step
(docs/benchmarks.md). A 4-bit weight is dequantized with bitsandbytes' kernel in the forward and
again in the backward, except in a re-entrant checkpoint's recomputation: its backward follows at
once, so the recomputed dense weight is kept for it (one layer's weights at a time) instead of
being dequantized a third time.
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch.nn.modules import module as torch_module

from tuneforge.methods import low_rank_add
from tuneforge.models.dequantize import dequantize_4bit


class _LoraAdd(torch.autograd.Function):
    """`result + scaling * (x @ A.T) @ B.T`, computed in `result`'s dtype; with `in_place`, added
    into `result` itself (the base linear's fresh output, which nothing else keeps): an out-of-place
    `addmm` first copies `result` into its output (a 5 ms device-to-device copy a step on 8B LoRA)."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scaling: float, in_place: bool) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight_a.dtype, weight_b.dtype)
        with torch.autocast(x.device.type, enabled=False):  # the dtype is chosen here, not by autocast
            dtype = result.dtype
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            x = x.to(dtype)  # a no-op when the input is already in the compute dtype (the usual case)
            x_a = x.reshape(-1, x.shape[-1]) @ a.t()
            if in_place and result.is_contiguous():
                ctx.mark_dirty(result)
                result.view(-1, result.shape[-1]).addmm_(x_a, b.t(), alpha=scaling)
                out = result
            else:
                # Written through a 2-D view into a tensor of the output's shape: the function must
                # not return a view (models such as Falcon add into a linear's output in place).
                out = torch.empty(result.shape, dtype=dtype, device=result.device)
                torch.addmm(result.reshape(-1, result.shape[-1]), x_a, b.t(), alpha=scaling, out=out.view(-1, result.shape[-1]))
        ctx.save_for_backward(x, x_a, a, b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, x_a, a, b = ctx.saved_tensors
        need_result, need_x, need_a, need_b, _, _ = ctx.needs_input_grad
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
            g_xa = (g @ b).mul_(ctx.scaling)  # tokens x r
            grad_x = (g_xa @ a).view(x.shape).to(ctx.dtypes[0]) if need_x else None
            grad_a = (g_xa.t() @ x.reshape(-1, x.shape[-1])).to(ctx.dtypes[1]) if need_a else None
            grad_b = (g.t() @ x_a).mul_(ctx.scaling).to(ctx.dtypes[2]) if need_b else None
        return grad if need_result else None, grad_x, grad_a, grad_b, None, None


def _is_4bit(base: torch.nn.Module) -> bool:
    return base.__class__.__name__ == "Linear4bit"  # bitsandbytes' (checked by name: an optional dependency)


def _compute_dtype(base: torch.nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a frozen base linear computes in: a 4-bit one's compute dtype, a 16-bit one's own."""
    if _is_4bit(base):
        return getattr(base, "compute_dtype", None) or x.dtype
    return base.weight.dtype if base.weight.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _frozen_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base linear's weight as a dense `dtype` matrix; a 4-bit one dequantized by bitsandbytes."""
    if _is_4bit(base):
        return dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
    return base.weight.to(dtype)


def _plus_low_rank(out: torch.Tensor, left: torch.Tensor, right_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """`out + alpha * left @ right_t.T` added into `out` (rows x cols in any shape) for a rank-r
    update (left: rows x r, right_t: cols x r). A compiled layer on a GPU takes Triton's kernel
    (`low_rank_add`): under `torch.compile` an `addmm_` would copy `out` first."""
    flat = out.view(-1, out.shape[-1])
    if torch.compiler.is_compiling() and low_rank_add.runs_on(flat):
        torch.ops.tuneforge.add_low_rank_(flat, left, right_t, alpha)
    else:
        flat.addmm_(left, right_t.t(), alpha=alpha)
    return out  # itself, not a view: models such as Falcon add into a linear's output in place


_backward_follows = 0  # `backward_follows()` contexts open now


@contextlib.contextmanager
def backward_follows() -> Iterator[None]:
    """Forwards run inside are followed at once by their backward, as a re-entrant recomputation
    is: a CUDA graph capture of a layer's forward and backward (`train/layer_graphs.py`)."""
    global _backward_follows
    _backward_follows += 1
    try:
        yield
    finally:
        _backward_follows -= 1


def _reentrant_recomputation() -> bool:
    """Whether this forward is a re-entrant checkpoint's recomputation (what tuneforge uses where
    it is exact, `train/speed.py`) or under `backward_follows`: the backward of the graph it builds
    runs next. A non-re-entrant recomputation only refills the first forward's saved tensors, so
    what its `ctx` kept would go unused. Not traced under `torch.compile` (whose partitioner
    decides what a compiled layer keeps)."""
    if torch.compiler.is_compiling():
        return False
    if _backward_follows:
        return True
    node = torch._C._current_autograd_node()  # the backward node running now, if any
    return node is not None and type(node).__name__ == "CheckpointFunctionBackward"


def _weight_for_backward(ctx: Any, weight: torch.Tensor) -> None:
    """Keep a recomputed 4-bit base's dense weight on `ctx` for the backward that follows
    (`_backward_weight`); a 16-bit base's backward reads its weight as it is."""
    keep = _is_4bit(ctx.base) and ctx.needs_input_grad[0] and _reentrant_recomputation()
    ctx.weight = weight if keep else None


def _backward_weight(ctx: Any, dtype: torch.dtype) -> torch.Tensor:
    weight, ctx.weight = ctx.weight, None  # freed as soon as the input's gradient has it
    return weight if weight is not None else _frozen_weight(ctx.base, dtype)


_NORM_SOURCE = "_tuneforge_norm_source"


class _NormSource:
    """What a norm's output is recomputed from, attached to the output by `install_norm_recompute`'s
    hook. The adapters reading the output (q, k and v; gate and up) keep the norm's input instead,
    which the norm's own backward keeps anyway; the first of them to run its backward recomputes
    the output (one elementwise pass, deterministic: the same values) and the last one drops it."""

    __slots__ = ("norm", "input_ref", "readers", "output")

    def __init__(self, norm: torch.nn.Module, norm_input: torch.Tensor) -> None:
        self.norm, self.readers, self.output = norm, 0, None
        self.input_ref = weakref.ref(norm_input)  # not a strong reference: recomputation may drop it

    def input_of(self, output: torch.Tensor) -> torch.Tensor:
        norm_input = self.input_ref()
        if norm_input is None:
            raise RuntimeError(f"the input of {self.norm._get_name()} is gone; its output {tuple(output.shape)} cannot be recomputed")
        return norm_input

    def read(self, norm_input: torch.Tensor) -> torch.Tensor:
        output = self.output
        if output is None:
            with torch.no_grad():
                output = self.output = self.norm.forward(norm_input)  # hooks skipped: no new source
        self.readers -= 1
        if self.readers <= 0:
            self.output = None
        return output


def _attach_norm_source(norm: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
        setattr(output, _NORM_SOURCE, _NormSource(norm, args[0]))


def keeps_its_input(norm: torch.nn.Module) -> bool:
    """Norms whose backward keeps their input as it is, so their output can be recomputed from it
    at no memory cost: Liger's RMSNorm (transformers' keeps an fp32 copy of a 16-bit input)."""
    return norm._get_name() == "LigerRMSNorm"


def install_norm_recompute(model: torch.nn.Module) -> int:
    """Hook every norm that `keeps_its_input`, so that fused adapters reading its output keep its
    input instead (`_NormSource`): on an 8B LoRA model the two norm outputs of each layer are 2 GiB
    at 4096 tokens a step. After Liger's patch, like `install_fused_lora_mlp`. Returns how many."""
    hooked = 0
    for module in model.modules():
        if keeps_its_input(module) and not getattr(module, "_tuneforge_norm_hook", None):
            module._tuneforge_norm_hook = module.register_forward_hook(_attach_norm_source)
            hooked += 1
    return hooked


class _FrozenLinearLora(torch.autograd.Function):
    """`x @ W.T + bias + scaling * (x @ A.T) @ B.T` for a frozen linear `base`; a 4-bit W is
    dequantized for the forward and again for the input's gradient, kept only when recomputed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: torch.nn.Module, bias: torch.Tensor | None,
                weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float) -> torch.Tensor:
        ctx.base, ctx.scaling = base, scaling
        ctx.dtypes = (x.dtype, weight_a.dtype, weight_b.dtype, None if bias is None else bias.dtype)
        with torch.autocast(x.device.type, enabled=False):
            dtype = _compute_dtype(base, x)
            x = x.to(dtype)  # a no-op when the input is already in the compute dtype (the usual case)
            flat = x.reshape(-1, x.shape[-1])
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            # Not a view of a 2-D result: models such as Falcon add into a linear's output in place.
            weight = _frozen_weight(base, dtype)
            out = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(dtype))
            _weight_for_backward(ctx, weight)
            x_a = flat @ a.t()
            out = _plus_low_rank(out, x_a, b, scaling)
        ctx.shape = x.shape
        source = getattr(x, _NORM_SOURCE, None)  # x as the norm gave it (no cast above)
        if source is not None and ctx.needs_input_grad[3]:
            # Keep the norm's input, which the norm's own backward keeps anyway, not its output.
            ctx.source = source
            source.readers += 1
            ctx.save_for_backward(source.input_of(x), x_a, a, b)
        else:
            ctx.source = None
            ctx.save_for_backward(flat, x_a, a, b)
        return out if out.dtype == ctx.dtypes[0] else out.to(ctx.dtypes[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, x_a, a, b = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        if ctx.source is not None:
            flat = ctx.source.read(flat).reshape(-1, ctx.shape[-1])
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
            g_xa = (g @ b).mul_(ctx.scaling)  # tokens x r
            grad_x = None
            if need_x:
                grad_x = _plus_low_rank(g @ _backward_weight(ctx, a.dtype), g_xa, a.t(), 1.0).view(ctx.shape).to(ctx.dtypes[0])
            grad_a = (g_xa.t() @ flat).to(ctx.dtypes[1]) if need_a else None
            grad_b = (g.t() @ x_a).mul_(ctx.scaling).to(ctx.dtypes[2]) if need_b else None
            grad_bias = g.sum(0).to(ctx.dtypes[3]) if need_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


def _frozen_linear_lora_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA forward, through `_FrozenLinearLora` when one plain fused adapter is active."""
    name = _single_fused_adapter(self)
    base = self.get_base_layer()
    if (
        name is None or args or kwargs or base.weight.requires_grad or _has_hooks(base)
        or (_is_4bit(base) and not _dequantizable(base))
    ):
        return type(self).forward(self, x, *args, **kwargs)
    return _FrozenLinearLora.apply(x, base, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])


def _has_hooks(base: torch.nn.Module) -> bool:
    """Whether calling the base module would run hooks (accelerate's device placement for an
    offloaded model, a user's forward hook) that reading its weight directly would skip."""
    return bool(
        base._forward_hooks or base._forward_pre_hooks or "_hf_hook" in vars(base)
        or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
    )


def _dequantizable(base: torch.nn.Module) -> bool:
    """Whether a 4-bit base's weight is in the layout `dequantize_4bit` reads, after restoring its
    quantization state as bitsandbytes' own forward does first. (bitsandbytes repacks CPU weights
    for its inference kernel on a no-grad CPU call in eval mode.)"""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    return not getattr(base.weight.quant_state, "packing_format_for_cpu", False)


def _single_fused_adapter(layer: torch.nn.Module) -> str | None:
    """The name of the layer's one adapter when it is active, plain, fused and without dropout;
    None when the layer's own forward must run (adapters off or merged, several, DoRA, dropout)."""
    names = list(layer.lora_A)
    if len(names) != 1 or layer.disable_adapters or layer.merged or names[0] not in layer.active_adapters:
        return None
    name = names[0]
    plain = (
        isinstance(layer.lora_variant.get(name), FusedLora)
        and isinstance(layer.lora_dropout[name], torch.nn.Identity)
        and getattr(layer.lora_A[name].weight, "ds_id", None) is None  # ZeRO-3 gathers in each module's call
    )
    return name if plain else None


def _liger_swiglu_runs(gate: torch.Tensor) -> bool:
    """Liger's SwiGLU kernels run on a GPU in eager mode. A compiled layer gets PyTorch's
    operators, which inductor fuses alike: Liger's backward kernel writes over its inputs, and
    inductor (torch 2.11) failed on it when a new sequence length recompiled the layer."""
    return gate.is_cuda and not torch.compiler.is_compiling() and _liger_swiglu() is not None


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: Liger's one-pass kernel on a GPU, PyTorch's operators elsewhere."""
    if _liger_swiglu_runs(gate):
        return _liger_swiglu()[0](gate, up)[2]
    return torch.nn.functional.silu(gate) * up


def _swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of silu(gate) * up for gate and up (Liger's kernel writes them over `gate` and `up`)."""
    if _liger_swiglu_runs(gate):
        return _liger_swiglu()[1](gate, up, grad)
    sig = torch.sigmoid(gate.float())
    silu = gate.float() * sig
    grad_up = (grad.float() * silu).to(up.dtype)
    grad_gate = (grad.float() * up.float() * sig * (1 + gate.float() * (1 - sig))).to(gate.dtype)
    return grad_gate, grad_up


@functools.cache
def _liger_swiglu() -> tuple[Any, Any] | None:
    """Liger's SwiGLU forward and backward ops, looked up once (called in every MLP's passes)."""
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return None
    return swiglu_forward, swiglu_backward


class _SwiGLUDownLora(torch.autograd.Function):
    """`down(silu(gate) * up) + scaling * (silu(gate) * up) @ A.T @ B.T` for a frozen down
    projection `base` (16-bit, or 4-bit: dequantized as in `_FrozenLinearLora`), saving `gate`
    and `up` (not their product) for the backward pass."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, base: torch.nn.Module,
                weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float) -> torch.Tensor:
        ctx.dtypes = (weight_a.dtype, weight_b.dtype)
        ctx.base, ctx.scaling = base, scaling
        with torch.autocast(gate.device.type, enabled=False):
            dtype = _compute_dtype(base, gate)
            gate, up = gate.to(dtype), up.to(dtype)
            product = _swiglu(gate, up)
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            flat = product.reshape(-1, product.shape[-1])
            x_a = flat @ a.t()
            bias = None if base.bias is None else base.bias.to(dtype)
            weight = _frozen_weight(base, dtype)
            out = torch.nn.functional.linear(product, weight, bias)  # not a view (see above)
            _weight_for_backward(ctx, weight)
            out = _plus_low_rank(out, x_a, b, scaling)
        ctx.save_for_backward(gate, up, x_a, a, b)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, x_a, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
        g_xa = (g @ b).mul_(ctx.scaling)  # tokens x r
        grad_product = _plus_low_rank(g @ _backward_weight(ctx, a.dtype), g_xa, a.t(), 1.0)
        product = _swiglu(gate, up).reshape(-1, gate.shape[-1])  # recomputed: not kept from the forward
        grad_a = (g_xa.t() @ product).to(ctx.dtypes[0])
        grad_b = (g.t() @ x_a).mul_(ctx.scaling).to(ctx.dtypes[1])
        del product
        grad_gate, grad_up = _swiglu_backward(gate, up, grad_product.view(gate.shape))
        return grad_gate, grad_up, None, grad_a, grad_b, None


class FusedLora(LoraVariant):
    """Plain LoRA with `_LoraAdd` as its forward; merging is plain LoRA's."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to create: the adapter's A and B are the plain LoRA ones."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        if getattr(lora_a.weight, "ds_id", None) is not None:
            # DeepSpeed ZeRO-3 gathers a partitioned weight only when its module runs: call them.
            return result + lora_b(lora_a(dropout(x.to(lora_a.weight.dtype)))).to(result.dtype) * scaling
        # A plain linear's output is kept by nothing else; other bases (bitsandbytes) may keep theirs.
        in_place = type(module.get_base_layer()) is torch.nn.Linear
        return _LoraAdd.apply(result, dropout(x), lora_a.weight, lora_b.weight, scaling, in_place)


def _is_linear_lora(module: torch.nn.Module) -> bool:
    """A LoRA layer around a linear base (peft's Linear, or bitsandbytes' 8/4-bit ones)."""
    if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
        return False
    base = module.get_base_layer()
    return isinstance(base, torch.nn.Linear) or base.__class__.__name__ in ("Linear4bit", "Linear8bitLt")


def install_fused_lora(model: torch.nn.Module) -> int:
    """Give every plain LoRA linear adapter of `model` the fused forward, and LoRA layers on a
    16-bit or 4-bit linear `_FrozenLinearLora`'s. Adapters with a variant of their own (DoRA and
    others) keep it. Returns how many adapters were switched."""
    switched = 0
    for module in model.modules():
        if not _is_linear_lora(module):
            continue
        plain = [name for name in module.lora_A if name not in module.lora_variant]
        for name in plain:
            module.lora_variant[name] = FusedLora()
        switched += len(plain)
        if all(isinstance(module.lora_variant.get(name), FusedLora) for name in module.lora_A):
            module.cast_input_dtype_enabled = False  # the input reaches the variant in its own dtype
        base = module.get_base_layer()
        if (_is_4bit(base) or type(base) is torch.nn.Linear) and getattr(base.weight, "ds_id", None) is None:
            module.forward = types.MethodType(_frozen_linear_lora_forward, module)
    return switched


# transformers MLP classes whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`:
# the fused forward replaces theirs, so any other (multipliers, a fused gate_up) keeps its own.
SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2MoeMLP", "Qwen3MoeMLP"})


def _fused_down(mlp: torch.nn.Module) -> Any:
    """The down projection's LoRA layer when `_SwiGLUDownLora` can stand in for the MLP's
    forward: a SwiGLU MLP (silu, gate/up/down) whose down projection is a frozen 16-bit or
    bitsandbytes 4-bit linear with one plain, fused LoRA adapter. None otherwise."""
    down = getattr(mlp, "down_proj", None)
    if type(mlp).__name__ not in SWIGLU_MLP_CLASSES or not _is_linear_lora(down):
        return None
    act = getattr(mlp, "act_fn", None)
    base = down.get_base_layer()
    plain = (
        (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation")  # transformers' silu
        and (type(base) is torch.nn.Linear or _is_4bit(base))
        and not base.weight.requires_grad
        and getattr(base.weight, "ds_id", None) is None  # DeepSpeed ZeRO-3 gathers it only in the module's call
        and len(down.lora_A) == 1
        and all(isinstance(variant, FusedLora) for variant in down.lora_variant.values())
        and all(isinstance(dropout, torch.nn.Identity) for dropout in down.lora_dropout.values())
    )
    return down if plain else None


def _swiglu_down_lora_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    name = next(iter(getattr(down, "lora_A", {})), None)
    if name is None or down.disable_adapters or down.merged or name not in down.active_adapters:
        # A reference model (adapters off), a merged or unloaded adapter: the layer's own path.
        return down(torch.nn.functional.silu(gate) * up)
    base = down.get_base_layer()
    if _is_4bit(base) and not _dequantizable(base):
        return down(torch.nn.functional.silu(gate) * up)
    return _SwiGLUDownLora.apply(gate, up, base, down.lora_A[name].weight, down.lora_B[name].weight, down.scaling[name])


def runs_with_its_base(module: torch.nn.Module) -> bool:
    """Whether a LoRA layer's forward is `_FrozenLinearLora` (base and adapter as one function)
    once `install_fused_lora` ran: one plain fused adapter without dropout over a frozen 16-bit or
    4-bit linear, no DeepSpeed partitioning."""
    if not _is_linear_lora(module) or getattr(module, "forward", None).__func__ is not _frozen_linear_lora_forward:
        return False
    base = module.get_base_layer()
    return _single_fused_adapter(module) is not None and not base.weight.requires_grad and not _has_hooks(base)


def recomputes_swiglu_product(mlp: torch.nn.Module) -> bool:
    """Whether `install_fused_lora_mlp` gives this MLP the forward that keeps no product."""
    return _fused_down(mlp) is not None


def install_fused_lora_mlp(model: torch.nn.Module) -> int:
    """Give every SwiGLU MLP whose down projection carries a plain fused LoRA adapter the
    forward of `_SwiGLUDownLora`. It replaces the MLP's bound `forward` (as Liger's SwiGLU does,
    so it must come after Liger's patch: the Trainer applies Liger inside `train()`). Returns
    how many MLPs were switched."""
    switched = 0
    for module in model.modules():
        if _fused_down(module) is not None:
            module.forward = types.MethodType(_swiglu_down_lora_forward, module)
            switched += 1
    return switched


__all__ = [
    "FusedLora",
    "backward_follows",
    "install_fused_lora",
    "install_fused_lora_mlp",
    "install_norm_recompute",
    "keeps_its_input",
    "recomputes_swiglu_product",
    "runs_with_its_base",
]
