"""What a finished run produced and measured: `summary.json` and the closing lines on screen."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.methods.prepare import ParameterCounts


@dataclass
class RunResult:
    """What a finished run produced and measured."""

    run_dir: Path
    model_dir: Path
    global_step: int
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_seconds: float
    tokens_seen: int
    parameters: ParameterCounts
    resumed_from: str | None = None
    peak_gpu_memory_gib: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    # Preference methods: first and last logged `rewards/*` values (train/preference.py).
    preference: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0



def write_summary(result: RunResult) -> None:
    summary = {
        "global_step": result.global_step,
        "train_loss": result.train_loss,
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
        "train_seconds": round(result.train_seconds, 3),
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "peak_gpu_memory_gib": result.peak_gpu_memory_gib,
        "trainable_parameters": result.parameters.trainable,
        "total_parameters": result.parameters.total,
        "resumed_from": result.resumed_from,
    }
    if result.preference:
        summary["preference"] = result.preference
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def print_summary(result: RunResult) -> None:
    lines = [
        f"steps: {result.global_step}"
        + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""),
        f"time: {result.train_seconds:.1f} s, {result.tokens_seen:,} tokens, "
        f"{result.tokens_per_second:,.0f} tokens/s",
    ]
    if result.peak_gpu_memory_gib is not None:
        lines.append(f"peak GPU memory: {result.peak_gpu_memory_gib:.1f} GiB")
    if result.train_loss is not None:
        lines.append(f"train loss (mean): {result.train_loss:.4f}")
    if result.eval_loss_after is not None:
        before = f"{result.eval_loss_before:.4f} -> " if result.eval_loss_before is not None else ""
        lines.append(f"eval loss: {before}{result.eval_loss_after:.4f}")
    for key, values in result.preference.items():
        lines.append(f"{key}: {values['first']:.4f} -> {values['last']:.4f}")
    lines.append(f"model: {result.model_dir}")
    lines.append(f"metrics: {result.run_dir / 'metrics.jsonl'}, {result.run_dir / 'summary.json'}")
    print("[tuneforge] run summary\n  " + "\n  ".join(lines), flush=True)


__all__ = ["RunResult", "print_summary", "write_summary"]
