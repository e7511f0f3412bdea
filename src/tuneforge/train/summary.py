"""What a run produced and measured: `summary.json`, `report.md` with `loss.png`, and the
closing lines on screen.

    write_summary(result)      # at the end of `train`
    write_report(run_dir)      # then, and from `tuneforge report RUN` for any run, even an interrupted one
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError
from tuneforge.methods.prepare import ParameterCounts
from tuneforge.train.checkpoints import find_good_checkpoint


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
    best_checkpoint: str | None = None
    # Preference methods: first and last logged `rewards/*` values (train/preference.py).
    preference: dict[str, dict[str, float]] = field(default_factory=dict)
    rollbacks: int = 0  # after loss spikes (train/spike.py)

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
        "best_checkpoint": result.best_checkpoint,
        "rollbacks": result.rollbacks,
        "eval_results": last_eval_results(read_metrics(result.run_dir)),
        "status": "complete",
    }
    if result.preference:
        summary["preference"] = result.preference
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of `metrics.jsonl`; a line cut short by a killed run is skipped."""
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_eval_results(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest value of each `eval_*` metric (the run's final evaluation when it finished)."""
    results: dict[str, Any] = {}
    for record in records:
        results.update({k: v for k, v in record.items() if k.startswith("eval_") and isinstance(v, (int, float))})
    return results


def summarize_interrupted(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """`summary.json` for a run that stopped before writing one, from its logs and newest checkpoint."""
    train_logs = [r for r in records if "loss" in r]
    tokens = max((r.get("num_input_tokens_seen", 0) for r in records), default=0)
    seconds = max((r.get("elapsed_seconds", 0.0) for r in records), default=0.0)
    checkpoint = find_good_checkpoint(run_dir)
    state: dict[str, Any] = {}
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return {
        "global_step": max(state.get("global_step", 0), records[-1].get("step", 0)),
        "train_loss": train_logs[-1]["loss"] if train_logs else None,
        "train_seconds": seconds,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "peak_gpu_memory_gib": max((r["gpu_memory_gib"] for r in records if "gpu_memory_gib" in r), default=None),
        "last_checkpoint": checkpoint,
        "best_checkpoint": state.get("best_model_checkpoint"),
        "rollbacks": max((r.get("rollbacks", 0) for r in records), default=0),
        "eval_results": last_eval_results(records),
        "status": "interrupted",
    }


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss over steps above the learning rate, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    rates = [(r["step"], r["learning_rate"]) for r in records if "learning_rate" in r]
    figure, (loss_axis, rate_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o--")):
        if points:
            loss_axis.plot(*zip(*points), style, label=label)
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    if rates:
        rate_axis.plot(*zip(*rates), color="tab:green")
    rate_axis.set_ylabel("learning rate")
    rate_axis.set_xlabel("step")
    rate_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _markdown(run_dir: Path, summary: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict) and v is not None]
    lines = [f"# Run report: {run_dir.name}", "", f"Status: **{summary.get('status', 'complete')}**.", "",
             "| | |", "| --- | --- |"]
    lines += [f"| {key.replace('_', ' ')} | {value(v)} |" for key, v in rows]
    if summary.get("eval_results"):
        lines += ["", "## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value(v)} |" for key, v in sorted(summary["eval_results"].items())]
    lines += ["", "## Loss and learning rate", "", "![loss](loss.png)", "",
              "Every logged value is in `metrics.jsonl`, the resolved config in `config.yaml`.", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Write `report.md` and `loss.png` (and, for a run that stopped early, `summary.json`).

    Raises:
        ConfigError: the directory holds no logged metrics yet.
    """
    records = read_metrics(run_dir)
    if not records:
        raise ConfigError(
            "nothing has been logged here yet (metrics.jsonl is missing or empty)",
            where=str(run_dir),
            hint="give a tuneforge run directory; steps are logged every train.logging_steps",
        )
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    else:
        summary = summarize_interrupted(run_dir, records)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_losses(records, run_dir / "loss.png")
    report = run_dir / "report.md"
    report.write_text(_markdown(run_dir, summary), encoding="utf-8")
    return report


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
    if result.rollbacks:
        lines.append(f"rolled back after a loss spike: {result.rollbacks} time(s)")
    for key, values in result.preference.items():
        lines.append(f"{key}: {values['first']:.4f} -> {values['last']:.4f}")
    lines.append(f"model: {result.model_dir}")
    lines.append(f"metrics: {result.run_dir / 'metrics.jsonl'}, {result.run_dir / 'summary.json'}")
    lines.append(f"report: {result.run_dir / 'report.md'} (plots: loss.png)")
    print("[tuneforge] run summary\n  " + "\n  ".join(lines), flush=True)


__all__ = ["RunResult", "print_summary", "read_metrics", "write_report", "write_summary"]
