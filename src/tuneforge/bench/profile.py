"""Where one training step's time goes, by kernel class: `tuneforge bench --profile`.

A `TrainerCallback` profiles one optimizer step after warm-up with `torch.profiler` and sums
device time per class of kernel (matched on kernel names), plus the host's wait for the next
batch and host-device copies, so a missed target shows what to work on.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch
from transformers import TrainerCallback

# First match wins: attention kernels contain "gemm"-like names, so they come before matmul.
# Communication kernels overlap computation on their own stream, so the classes can add up to
# more than the step's wall time; the share spent communicating is still what a missed
# multi-GPU target needs to know.
KERNEL_CLASSES: list[tuple[str, re.Pattern[str]]] = [
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter|c10d::", re.IGNORECASE)),
    ("attention", re.compile(r"flash|fmha|attention|attn|varlen", re.IGNORECASE)),
    ("loss", re.compile(r"cross_entropy|crossentropy|nll_loss|log_softmax|liger.*(ce|cross)", re.IGNORECASE)),
    ("norm", re.compile(r"rms|layer_norm|layernorm|norm_kernel", re.IGNORECASE)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|fused_optim", re.IGNORECASE)),
    ("quantization", re.compile(r"dequant|kgemm_4bit|nf4|quantize", re.IGNORECASE)),
    # GPU kernels (gemm, cutlass, nvjet...) and, on a CPU, the operators (aten::mm, MmBackward0).
    ("matmul", re.compile(r"gemm|matmul|xmma|cutlass|nvjet|sm\d+_|wgmma|cublas|aten::(add|b)?mm\b|aten::linear|MmBackward", re.IGNORECASE)),
    ("host-device copies", re.compile(r"memcpy|memset", re.IGNORECASE)),
]


def classify(kernel_name: str) -> str:
    for name, pattern in KERNEL_CLASSES:
        if pattern.search(kernel_name):
            return name
    return "elementwise and other"


def counted(event: Any, on_gpu: bool) -> bool:
    """Whether an averaged profiler event is a unit of work, counted once.

    On a GPU only the kernels are: an operator's device time is its kernels' (`aten::mm` and
    its gemm would count twice), and a `record_function` range such as
    `DistributedDataParallel.forward` spans the kernels inside it. On a CPU the operators are
    the work.
    """
    if getattr(event, "is_user_annotation", False):
        return False
    if on_gpu:
        return event.device_type != torch.autograd.DeviceType.CPU
    return True


class StepProfiler(TrainerCallback):
    """Profiles optimizer step number `step` (1-based) and keeps the device time per kernel class;
    with `trace_path` (ending in .json.gz) also writes the step's timeline with Python stacks,
    for chrome://tracing or Perfetto: where the GPU waits, the host code it waits for."""

    def __init__(self, step: int, trace_path: str | None = None) -> None:
        self.step = step
        self.trace_path = trace_path
        self.seconds_by_class: dict[str, float] = {}
        self._profiler: Any = None
        self._last_step_end = 0.0
        self.data_wait_seconds = 0.0
        self.top_other: list[tuple[str, float]] = []  # the unclassified kernels that cost most
        self.compute_seconds: float | None = None  # the compute stream's busy time (GPU)
        # The profiled step and the profiler's own work after it (seconds on a long trace):
        # left out of the run's timings (`StepTimer.result`).
        self.seconds_spent = 0.0
        self._began = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 != self.step:
            return
        # The gap since the previous step ended is the dataloader and the host's bookkeeping.
        self._began = time.perf_counter()
        self.data_wait_seconds = self._began - self._last_step_end if self._last_step_end else 0.0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, with_stack=self.trace_path is not None)
        self._profiler.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_step_end = time.perf_counter()
        if self._profiler is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._profiler.__exit__(None, None, None)
        if self.trace_path:
            self._profiler.export_chrome_trace(self.trace_path)
        totals: dict[str, float] = {}
        on_gpu = torch.cuda.is_available()
        for event in self._profiler.key_averages():
            if not counted(event, on_gpu):
                continue
            spent_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
            if spent_us <= 0:
                continue
            group = classify(event.key)
            totals[group] = totals.get(group, 0.0) + spent_us / 1e6
            if group == "elementwise and other":
                self.top_other.append((event.key[:100], spent_us / 1e6))
        totals["data wait (host)"] = self.data_wait_seconds
        self.seconds_by_class = dict(sorted(totals.items(), key=lambda item: -item[1]))
        self.compute_seconds = compute_stream_seconds(self._profiler.events()) if on_gpu else None
        self.top_other = sorted(self.top_other, key=lambda item: -item[1])[:8]
        self._profiler = None
        self.seconds_spent = time.perf_counter() - self._began


# Classes that are not the compute stream's work: NCCL runs on its own stream, and the data
# wait is host time.
NOT_COMPUTE = ("communication", "data wait (host)")


def compute_stream_seconds(events: Any) -> float | None:
    """Device time of the stream that ran the most non-communication work (the compute stream),
    from a profile's events; None without device events. Kernels of one stream run one after
    another, so their durations add up to its busy time. Side streams (offloading's copies,
    NCCL) overlap it, so counting their work as busy would hide the compute stream's gaps."""
    busy: dict[tuple[int, int], float] = {}
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CPU or getattr(event, "is_user_annotation", False):
            continue
        if classify(event.name) == "communication":
            continue
        stream = (event.device_index, event.device_resource_id)
        busy[stream] = busy.get(stream, 0.0) + (event.time_range.end - event.time_range.start) / 1e6
    return max(busy.values()) if busy else None


def host_bound_seconds(
    seconds_by_class: dict[str, float], step_seconds: float, compute_seconds: float | None = None
) -> float:
    """How long the GPU's compute stream has nothing to run in a step of `step_seconds`
    (measured without the profiler, whose own per-operator cost would inflate it): the step's
    time less the compute stream's busy time (`compute_stream_seconds`; without it, the time of
    every class but communication). Large when the host cannot launch kernels as fast as the GPU
    runs them (many small operators, synchronising copies)."""
    if compute_seconds is None:
        compute_seconds = sum(seconds for name, seconds in seconds_by_class.items() if name not in NOT_COMPUTE)
    return max(step_seconds - compute_seconds, 0.0)


def format_profile(
    seconds_by_class: dict[str, float], step_seconds: float | None = None, compute_seconds: float | None = None
) -> str:
    total = sum(seconds_by_class.values()) or 1.0
    lines = [
        f"    {name:<24} {seconds * 1000:9.1f} ms  {100 * seconds / total:5.1f}%"
        for name, seconds in seconds_by_class.items()
    ]
    if step_seconds:
        idle = host_bound_seconds(seconds_by_class, step_seconds, compute_seconds)
        where = f"; the compute stream was busy {compute_seconds * 1000:.1f} ms" if compute_seconds is not None else ""
        lines.append(
            f"    GPU without work {idle * 1000:9.1f} ms of the unprofiled median step's {step_seconds * 1000:.1f} ms{where}"
        )
    return "\n".join(lines)


__all__ = ["KERNEL_CLASSES", "StepProfiler", "classify", "counted", "format_profile", "host_bound_seconds"]
