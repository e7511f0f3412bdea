"""Liger's Triton kernels compiled ahead of the first step, in a process of their own.

Triton compiles a kernel when a step first calls it. On a host whose Triton cache is empty, the
8B variable-length benchmark's steps waited 3.5 s of a 25 s run for 14 compilations of Liger's
RMSNorm, RoPE, SwiGLU and cross-entropy kernels (docs/benchmarks.md), some of them several times:
Triton compiles a kernel again for each class an integer argument falls in (1, a multiple of 16,
other), and the rows' lengths change from step to step. What a kernel compiles to depends only on
the model's widths, the dtype, which weights train, and those classes. So calling the functions
the patched model calls, on tensors of the model's widths with token counts that meet every class
(`token_counts`), compiles what the run will use into Triton's on-disk cache, where the run's
steps find it.

This runs in its own interpreter, started by `kernel_warmup.start_kernel_warmup` before the
run imports its libraries: a thread in the run's process was tried, and it slowed the model's
loading as much as it saved (Triton's compiler and autograd hold the GIL; docs/benchmarks.md).

    python -m tuneforge.train.kernel_compile FOLDER   # FOLDER/request.json in, FOLDER/report.json out
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.config.schema import Config
from tuneforge.errors import ConfigError
from tuneforge.models.loading import DTYPES, load_model_config, resolve_dtype
from tuneforge.train.kernel_warmup import COMPILING, REPORT, REQUEST

# Model types whose Liger patch is Llama's: its RMSNorm with the default arguments, its RoPE, the
# SwiGLU MLP and the causal-LM loss over the output layer. Qwen3 also normalises each attention
# head's queries and keys (the value: whether it does).
LLAMA_STYLE_MODEL_TYPES = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}

IGNORE_INDEX = -100
EVERY_BATCH_SIZE_UP_TO = 8  # padded rows: every batch size up to this many is called (`padded_batch_sizes`)


@dataclass(frozen=True)
class WarmupPlan:
    """What one run's Liger kernels are called with: the model's widths, dtype and step shapes."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    head_norms: bool
    dtype: torch.dtype
    device: torch.device
    batch_sizes: tuple[int, ...]  # rows in a step's batch: 1 for packed batches
    max_tokens: int  # the most tokens a batch row holds
    trains_norms: tuple[bool, ...]  # whether norm weights train: the backward kernel differs
    trains_output_layer: bool
    elementwise: bool  # RMSNorm, RoPE and SwiGLU (off where compiled layers leave them to inductor)


def warmup_plan(
    model_config: Any, *, dtype: torch.dtype, device: torch.device, batch_sizes: tuple[int, ...],
    max_tokens: int, method: str, elementwise: bool,
) -> WarmupPlan | str:
    """The plan for a transformers model config, or why there is none (a sentence)."""
    model_type = getattr(model_config, "model_type", "")
    if model_type not in LLAMA_STYLE_MODEL_TYPES:
        return f"not for model type '{model_type}' (kernels compile in the first steps)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"not for {dtype} activations"
    heads = model_config.num_attention_heads
    return WarmupPlan(
        hidden_size=model_config.hidden_size,
        intermediate_size=model_config.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(model_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(model_config, "head_dim", None) or model_config.hidden_size // heads,
        vocab_size=model_config.vocab_size,
        rms_norm_eps=model_config.rms_norm_eps,
        head_norms=LLAMA_STYLE_MODEL_TYPES[model_type],
        dtype=dtype,
        device=device,
        batch_sizes=batch_sizes,
        max_tokens=max_tokens,
        # LoRA freezes every norm and the output layer; partial fine-tuning may train some.
        trains_norms=(False,) if method == "lora" else (True,) if method == "full" else (False, True),
        trains_output_layer=method != "lora",
        elementwise=elementwise,
    )


def run_warmup_plan(config: Config, local_rank: int = 0, world_size: int = 1) -> WarmupPlan | str:
    """The plan for a run of `config` whose processes on this node share local rank `local_rank`'s
    GPU architecture (all of a node's GPUs are one model), or why there is none (a sentence)."""
    from tuneforge.train.distributed import planned_engine
    from tuneforge.train.speed import resolve_liger

    if not config.speed.warm_kernels:
        return "off (speed.warm_kernels: false)"
    if config.train.use_cpu or not torch.cuda.is_available():
        return "no CUDA GPU"
    if config.method.name not in ("full", "freeze", "lora"):
        return f"not for {config.method.name} (its trainer computes its own loss)"
    if config.model.builder is not None or config.model.vision is not None:
        return "not for models built by model.builder or with a vision encoder"
    if planned_engine(config.distributed, world_size) != "ddp":
        return "not under FSDP or DeepSpeed (their weights may train in fp32)"
    model_config = load_model_config(config.model)
    try:
        liger, why = resolve_liger(config.speed.liger, getattr(model_config, "model_type", ""), cuda=True)
    except ConfigError as exc:
        return str(exc)
    if not liger:
        return f"Liger kernels {why}"
    # bitsandbytes computes 4- and 8-bit layers in bf16 (models.loading.quantization_config).
    dtype = torch.bfloat16 if config.model.quantization != "none" else resolve_dtype(config.model)
    if dtype == "auto":
        stored = getattr(model_config, "dtype", None)
        dtype = DTYPES.get(stored, stored) if isinstance(stored, str) else stored
    micro_batch = config.train.per_device_train_batch_size
    if config.data.packing:  # a step's rows flattened into one padding-free sequence
        batch_sizes, max_tokens = (1,), micro_batch * config.data.max_length
    else:
        batch_sizes, max_tokens = padded_batch_sizes(micro_batch), config.data.max_length
    return warmup_plan(
        model_config, dtype=dtype, device=torch.device("cuda", local_rank), batch_sizes=batch_sizes,
        max_tokens=max_tokens, method=config.method.name, elementwise=config.speed.compile is not True,
    )


def padded_batch_sizes(micro_batch: int) -> tuple[int, ...]:
    """Batch sizes padded rows come in: `micro_batch`, and fewer in an epoch's last batch. Liger's
    RoPE kernel takes the batch size as a compile-time constant, so up to `EVERY_BATCH_SIZE_UP_TO`
    rows each size is called; above, one size of each class Triton puts the other kernels' integers
    in (1, a multiple of 16, other), and a last batch of another size compiles RoPE in its step."""
    if micro_batch <= EVERY_BATCH_SIZE_UP_TO:
        return tuple(range(1, micro_batch + 1))
    sizes = {micro_batch, 1}
    if micro_batch % 16 == 0:
        sizes.add(micro_batch - 1)
    elif micro_batch > 16:
        sizes.add(16)
    return tuple(sorted(sizes))


def token_counts(max_tokens: int, sm_count: int) -> list[int]:
    """Token counts, up to `max_tokens`, that put the integers Liger's kernels take in each of
    Triton's classes: the count itself (a multiple of 16 or not), and the rows each program of
    Liger's RMSNorm backward takes, `ceil(count / sm_count)` (1, a multiple of 16, other)."""
    counts = {max_tokens, max_tokens - 1}
    for rows_per_program in (1, 2, 16):  # one, other, a multiple of 16
        low, high = (rows_per_program - 1) * sm_count + 1, rows_per_program * sm_count
        multiple = math.ceil(low / 16) * 16
        counts |= {count for count in (multiple, multiple + 1) if low <= count <= high}
    return sorted(count for count in counts if 1 <= count <= max_tokens)


def _run_norm(plan: WarmupPlan, rows: tuple[int, ...], width: int, trains: bool) -> None:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    norm = LigerRMSNorm(width, eps=plan.rms_norm_eps).to(plan.device, plan.dtype).requires_grad_(trains)
    x = torch.ones(*rows, width, device=plan.device, dtype=plan.dtype, requires_grad=True)
    norm(x).backward(torch.ones_like(x))


def _run_rope(plan: WarmupPlan, batch: int, seq: int) -> None:
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def states(heads: int) -> torch.Tensor:  # as the attention makes them: a transposed view
        x = torch.ones(batch, seq, heads * plan.head_dim, device=plan.device, dtype=plan.dtype, requires_grad=True)
        return x.view(batch, seq, heads, plan.head_dim).transpose(1, 2)

    # One position row: transformers' rotary embedding for positions shared by the batch, or packed ones.
    cos = sin = torch.ones(1, seq, plan.head_dim, device=plan.device, dtype=plan.dtype)
    q, k = liger_rotary_pos_emb(states(plan.num_heads), states(plan.num_kv_heads), cos, sin)
    (q.sum() + k.sum()).backward()


def _run_swiglu(plan: WarmupPlan, batch: int, seq: int) -> None:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    gate, up = (
        torch.ones(batch, seq, plan.intermediate_size, device=plan.device, dtype=plan.dtype, requires_grad=True)
        for _ in range(2)
    )
    LigerSiLUMulFunction.apply(gate, up).sum().backward()


def _run_loss(plan: WarmupPlan, batch: int, seq: int, multiple_of_16: bool, weight: torch.Tensor) -> None:
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

    hidden = torch.ones(batch, seq, plan.hidden_size, device=plan.device, dtype=plan.dtype, requires_grad=True)
    # Liger shifts the labels (each row's first drops out) and counts those not ignored: its
    # kernel takes that count, a multiple of 16 or not.
    predicted = batch * (seq - 1)
    count = predicted // 16 * 16 if multiple_of_16 and predicted >= 16 else predicted - (predicted % 16 == 0)
    shifted = torch.full((batch * (seq - 1),), IGNORE_INDEX, device=plan.device)
    shifted[:count] = 1
    first = torch.full((batch, 1), IGNORE_INDEX, device=plan.device)
    labels = torch.cat([first, shifted.view(batch, seq - 1)], dim=1)
    # The Trainer passes the batch's label count, with which Liger sums the loss (its kernel's reduction).
    items = (labels != IGNORE_INDEX).sum()
    loss = LigerForCausalLMLoss(hidden, weight, labels, plan.hidden_size, num_items_in_batch=items)
    loss.backward()


def compile_kernels(plan: WarmupPlan) -> int:
    """Call each Liger kernel the run will call, at every token count of `token_counts`; returns
    how many step shapes were called. What compiles depends on shapes, strides and dtypes, not on
    values: the tensors hold ones."""
    with torch.cuda.device(plan.device):
        sm_count = torch.cuda.get_device_properties(plan.device).multi_processor_count
        weight = torch.ones(plan.vocab_size, plan.hidden_size, device=plan.device, dtype=plan.dtype)
        weight.requires_grad_(plan.trains_output_layer)
        shapes = 0
        for batch in plan.batch_sizes:
            for index, tokens in enumerate(token_counts(plan.max_tokens * batch, sm_count)):
                seq = max(2, math.ceil(tokens / batch))
                if plan.elementwise:
                    for trains in plan.trains_norms:
                        _run_norm(plan, (batch, seq), plan.hidden_size, trains)
                        if plan.head_norms:
                            _run_norm(plan, (batch, seq, plan.num_heads), plan.head_dim, trains)
                    _run_rope(plan, batch, seq)
                    _run_swiglu(plan, batch, seq)
                _run_loss(plan, batch, seq, multiple_of_16=index % 2 == 0, weight=weight)
                shapes += 1
        torch.cuda.synchronize(plan.device)
    return shapes


def main(folder: str) -> None:
    """Compile what the run described in FOLDER/request.json (`config`: a YAML path or a dict,
    `overrides`: `section.key=value` strings) will call, leaving FOLDER/compiling once it starts
    to. FOLDER/report.json says what was done (`shapes`, `compile_seconds`) or why nothing was
    (`skipped`), or the error (the kernels then compile in the run's first steps, as without this
    process), and when it finished."""
    from tuneforge.config.loading import load_config
    from tuneforge.train.distributed import Ranks

    report: dict[str, Any] = {}
    try:
        request = json.loads((Path(folder) / REQUEST).read_text(encoding="utf-8"))
        ranks = Ranks.from_env()
        plan = run_warmup_plan(load_config(request["config"], request["overrides"]), ranks.local_rank, ranks.world_size)
        if isinstance(plan, str):
            report["skipped"] = plan
        else:
            (Path(folder) / COMPILING).touch()
            started = time.perf_counter()
            report["shapes"] = compile_kernels(plan)
            report["compile_seconds"] = round(time.perf_counter() - started, 2)
    except Exception as exc:  # noqa: BLE001 - reported to the run, which goes on without the warm-up
        report["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"  # one line for the log
    report["finished_at"] = time.time()  # the launcher knows when it started the process
    (Path(folder) / REPORT).write_text(json.dumps(report), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])


__all__ = [
    "LLAMA_STYLE_MODEL_TYPES",
    "WarmupPlan",
    "compile_kernels",
    "main",
    "padded_batch_sizes",
    "run_warmup_plan",
    "token_counts",
    "warmup_plan",
]
