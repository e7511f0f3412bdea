"""Attention that keeps packed examples apart.

    name = enable_packed_attention(model)   # after loading, before the Trainer

Packed batches (see `tuneforge.data.packing`) are one flattened sequence whose examples must
not see each other. Two backends are trusted to do that:

- `tuneforge_varlen` (CUDA): PyTorch's FlashAttention varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`), registered through transformers'
  `AttentionInterface`. It reads the example offsets (`cu_seq_lens_q/k`, `max_length_q/k`) the
  collator adds to the batch, so no mask is materialised.
- `sdpa` / `eager` (everywhere): transformers builds a block-diagonal causal mask from the
  packed `position_ids` (`masking_utils.find_packed_sequence_indices`), but only when there
  is neither an `attention_mask` nor a KV cache, hence `use_cache=False` in every packed
  batch. The mask is dense: memory grows with the square of the flattened length (on an H100,
  attention over 32k flattened tokens took 27x longer and 3x the memory of the varlen kernel).

Any other backend is refused (PITFALLS 5), and the chosen one is checked on the model itself:
a packed probe must give the logits of the examples run alone.

In a vision-language model only the language model's attention is set: packed examples meet
there. The vision tower attends within each image, without causality, and keeps its backend;
LLaVA hands it the batch's keyword arguments too, example offsets included, which its `sdpa`
or `eager` attention ignores.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_flash_attention_utils import (
    prepare_fa_kwargs_from_position_ids,
)

from tuneforge.data.packing import PackedCollator
from tuneforge.errors import ConfigError
from tuneforge.models.vlm import is_vlm_config

VARLEN_ATTENTION = "tuneforge_varlen"
# Backends whose isolation of packed examples is proven by tests/data/test_packing.py.
MASK_ATTENTIONS = ("sdpa", "eager")


@lru_cache(maxsize=1)
def _varlen_kernel() -> tuple[Callable[..., Any], frozenset[str]] | None:
    """`varlen_attn` and its keyword names, or None where this torch has none (< 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # Its keywords changed between releases: 2.10 takes `is_causal`; 2.11 `window_size` and
    # `scale`; 2.12 adds `enable_gqa`.
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available() -> bool:
    """Whether `tuneforge_varlen` can run its kernel here (CUDA and torch >= 2.10)."""
    return torch.cuda.is_available() and _varlen_kernel() is not None


def _varlen_mask(*, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    # Flattened and unpadded batches need no mask: boundaries come from cu_seq_lens or
    # position_ids. A padding mask (batched generation) becomes sdpa's dense mask, which
    # `varlen_attention_forward` hands to sdpa.
    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def _boundaries(
    kwargs: dict[str, Any], query: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """Sequence offsets over the batch's flattened tokens, or None when keys outnumber queries.

    From the collator's metadata if present; else from position_ids that restart (another
    packing collator); else each row is one sequence.
    """
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        return (
            kwargs["cu_seq_lens_q"],
            kwargs["cu_seq_lens_k"],
            int(kwargs["max_length_q"]),
            int(kwargs["max_length_k"]),
        )
    batch, tokens = query.shape[0], query.shape[2]
    if key.shape[2] != tokens:  # decoding against a cache: sdpa's job
        return None
    positions = kwargs.get("position_ids")
    if batch == 1 and tokens > 1 and positions is not None and bool((positions.reshape(-1)[1:] == 0).any()):
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(positions)
        return cu_q, cu_k, int(max_q), int(max_k)
    cu = torch.arange(batch + 1, device=query.device, dtype=torch.int32) * tokens
    return cu, cu, tokens, tokens


def _half_dtype(query: torch.Tensor, module: torch.nn.Module) -> torch.dtype | None:
    """The half dtype the kernel should run in, or None to stay in float32 (as transformers' FA path)."""
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    # PEFT keeps norms in float32, so activations can arrive upcast next to half weights.
    weight = next((m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
    if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
        return weight.dtype
    return None


def _run_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor, int, int],
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """`varlen_attn` on [tokens, heads, dim] tensors, causal, whatever this torch's keywords are."""
    found = _varlen_kernel()
    assert found is not None  # the caller checked
    kernel, names = found
    cu_q, cu_k, max_q, max_k = bounds
    kwargs: dict[str, Any] = {}
    if "window_size" in names:
        # The kernel's window is inclusive: (W - 1, 0) lets a token see itself and W - 1 before.
        kwargs["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    else:
        if sliding_window is not None and max_k > sliding_window:
            raise ValueError("this torch's varlen_attn has no sliding window; use sdpa")
        kwargs["is_causal"] = True
    if scaling is not None:
        if "scale" in names:
            kwargs["scale"] = scaling
        else:
            query = query * (scaling * query.shape[-1] ** 0.5)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            # Same head order as transformers' repeat_kv: kv head j serves query heads j*g ... j*g+g-1.
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cu_q = cu_q.to(device=query.device, dtype=torch.int32)
    cu_k = cu_k.to(device=query.device, dtype=torch.int32)
    return kernel(query, key, value, cu_q, cu_k, max_q, max_k, **kwargs)


def _dense_packed_mask(
    bounds: tuple[torch.Tensor, torch.Tensor, int, int], length: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [1, 1, T, T] causal block-diagonal mask from example offsets (float32 fallback)."""
    lengths = bounds[0].to(device=device, dtype=torch.long).diff()
    example = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    index = torch.arange(length, device=device)
    allowed = (example[:, None] == example[None, :]) & (index[None, :] <= index[:, None])
    if sliding_window is not None:
        allowed &= index[:, None] - index[None, :] < sliding_window
    return allowed[None, None]


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for flattened packed batches, in transformers' `AttentionInterface` convention.

    Args:
        module: the attention layer.
        query: [batch, heads, tokens, head_dim]; key, value: [batch, kv_heads, tokens, head_dim].
        attention_mask: None for flattened or unpadded batches; a dense mask from sdpa's mask
            builder when the batch is padded (generation), which sdpa then applies.
        dropout: must be 0 (the kernel has none).
        scaling: softmax scale; default 1/sqrt(head_dim).
        sliding_window: window of sliding-window layers (Mistral, Qwen2), or None.
        softcap: unsupported (Gemma 2).
        is_causal: must not be False, nor the module's own `is_causal`: packed training is causal.
        **kwargs: `cu_seq_lens_q/k` and `max_length_q/k` from `PackedCollator`, `position_ids`.

    Returns:
        (attn_output [batch, tokens, heads, head_dim], None), like transformers' own backends.
    """
    # As sdpa decides: a layer marked non-causal (a vision tower's) must not run causal here.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    bounds = None if attention_mask is not None else _boundaries(kwargs, query, key)
    if bounds is None:
        # A padded batch with its dense mask, or decoding with a cache where sdpa_mask judged
        # no mask is needed (generation). Only a caller decoding without any attention_mask
        # past a sliding window would lose the window here.
        if attention_mask is None and sliding_window is not None and key.shape[2] > sliding_window:
            raise ValueError(f"{VARLEN_ATTENTION}: pass an attention_mask beyond the sliding window")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs,
        )
    if dropout > 0.0 or softcap is not None or kwargs.get("s_aux") is not None or is_causal is False:
        raise ValueError(
            f"{VARLEN_ATTENTION} supports causal attention without dropout, softcap or sinks"
        )
    if value.shape[-1] != query.shape[-1]:
        raise ValueError(f"{VARLEN_ATTENTION} needs equal query and value head sizes")
    batch, tokens = query.shape[0], query.shape[2]
    half = _half_dtype(query, module)
    if query.is_cuda and half is not None and _varlen_kernel() is not None:
        # [batch, heads, tokens, dim] -> [batch * tokens, heads, dim], the kernel's layout.
        q, k, v = (x.transpose(1, 2).flatten(0, 1).to(half) for x in (query, key, value))
        out = _run_kernel(q, k, v, bounds, scaling, sliding_window)
        return out.view(batch, tokens, *out.shape[1:]), None
    # FlashAttention has no float32 (nor CPU) kernel: same result through sdpa and a dense
    # block-diagonal mask, quadratic in memory but exact.
    # [batch, heads, tokens, dim] -> [1, heads, batch * tokens, dim]: one flattened sequence.
    q, k, v = (x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3]) for x in (query, key, value))
    mask = _dense_packed_mask(bounds, batch * tokens, sliding_window, query.device)
    out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=scaling)
    return out.view(batch, tokens, *out.shape[2:]), None


def register_varlen_attention() -> str:
    """Register `tuneforge_varlen` with transformers (idempotent); returns its name."""
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


def check_packed_isolation(model: Any, tolerance: float = 0.1) -> float:
    """Run a packed probe through `model` and fail if its examples see each other.

    Two examples are packed and flattened as `PackedCollator` does; the second one's logits
    are compared with those of the example alone. The gap must be below `tolerance` times
    the gap a real leak produces (the same example with the first one as context).

    Args:
        model: a causal LM with its attention implementation set.
        tolerance: allowed gap, as a fraction of the leak's gap (absorbs bf16 rounding).

    Returns:
        The largest absolute logit gap of the packed example.

    Raises:
        ConfigError: the packed example's logits differ from its logits alone.
    """
    vocab = model.config.get_text_config().vocab_size
    first = [(7 * i + 3) % vocab for i in range(5)]
    second = [(11 * i + 5) % vocab for i in range(7)]
    row = {"input_ids": first + second, "labels": first + second, "position_ids": [*range(5), *range(7)]}
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in PackedCollator()([row]).items()}
    batch.pop("labels")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**batch).logits[0, 5:].float()
            alone = model(input_ids=torch.tensor([second], device=device)).logits[0].float()
            leaked = model(input_ids=torch.tensor([first + second], device=device)).logits[0, 5:].float()
    finally:
        model.train(was_training)
    gap = (packed - alone).abs().max().item()
    leak = (leaked - alone).abs().max().item()
    if not gap <= tolerance * leak:
        raise ConfigError(
            f"attention `{model.config.get_text_config()._attn_implementation}` lets packed examples see each "
            f"other in this model (logit gap {gap:.3g}, a leak gives {leak:.3g})",
            where="data.packing",
            hint="set data.packing: false, or use a model whose attention follows transformers' "
            "AttentionInterface",
        )
    return gap


def enable_packed_attention(model: Any, *, device: Any = None, verify: bool = True) -> str:
    """Set the attention implementation that isolates packed examples on the training device.

    `tuneforge_varlen` on CUDA (torch >= 2.10); elsewhere the model's `sdpa` or `eager`.

    Args:
        model: a loaded transformers model (before PEFT wrapping is simplest).
        device: where training will run; defaults to where the model's weights are now (models
            are loaded on the CPU and moved by the Trainer, so the recipe passes it).
        verify: run `check_packed_isolation` on the model (skip where a forward pass is not
            possible yet, e.g. parameters sharded by ZeRO-3 before the Trainer starts).

    Returns:
        The attention implementation now set (on a vision-language model: its language model's).

    Raises:
        ConfigError: the model's attention backend cannot isolate examples, the model cannot
            switch backend, or the probe shows leakage.
    """
    # Packed examples meet in the language model; a VLM's vision tower keeps its backend.
    language_model = model.get_decoder() if is_vlm_config(model.config) else model
    current = language_model.config._attn_implementation
    if current not in (*MASK_ATTENTIONS, VARLEN_ATTENTION):
        raise ConfigError(
            f"packing needs an attention backend that keeps examples apart; `{current}` is not "
            f"one tuneforge has verified (supported: {', '.join(MASK_ATTENTIONS)}, and "
            f"{VARLEN_ATTENTION} on CUDA, chosen automatically)",
            where="model.attn_implementation",
            hint="unset model.attn_implementation or set it to sdpa, or set data.packing: false",
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dropout = getattr(model.config.get_text_config(), "attention_dropout", 0.0) or 0.0
    if device.type == "cuda" and varlen_available() and dropout == 0.0:
        wanted = register_varlen_attention()
    else:
        wanted = "sdpa" if current == VARLEN_ATTENTION else current
    if wanted != current:
        language_model.set_attn_implementation(wanted)
    # transformers only warns when a model (remote code) cannot switch; packing must not go on.
    if language_model.config._attn_implementation != wanted:
        raise ConfigError(
            f"{type(language_model).__name__} did not switch its attention to `{wanted}`",
            where="data.packing",
            hint="this architecture does not use transformers' AttentionInterface; set data.packing: false",
        )
    if verify:
        check_packed_isolation(model)
    return wanted


__all__ = [
    "MASK_ATTENTIONS",
    "VARLEN_ATTENTION",
    "check_packed_isolation",
    "enable_packed_attention",
    "register_varlen_attention",
    "varlen_attention_forward",
    "varlen_available",
]
