"""`tuneforge bench`: every case for every system in one invocation, a table printed last.

    tuneforge bench --data ../shared/data --cases lora8b,full1b --systems tuneforge,hf,unsloth

Each (case, system) runs in its own process (`tuneforge.bench.worker`) on shared assets
(`cases.py`), or in `case.nproc` processes under torchrun for the multi-GPU cases. Per case and
system: tokens/s (median of the steps after warm-up; whole-run real tokens/s for variable-length
data; all processes' tokens), the ratio to plain HF, to the best peer and, for a multi-GPU case,
to the same system on one GPU (scaling), peak memory (rank 0), model FLOPs utilisation against
the matmul peak measured at the start (per GPU), and the loss of the first and last step.
`--parallel N` runs N one-GPU runs at a time, each on a GPU of its own, so a machine with N GPUs
runs the whole table in about 1/N of the time; each run still has its GPU to itself.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.bench.cases import CASES, SHAPES, Case, build_assets, write_rows
from tuneforge.bench.profile import format_profile
from tuneforge.errors import ConfigError
from tuneforge.plan.estimate import ModelShape, matmul_peak_tflops
from tuneforge.plan.estimate import flops_per_token as model_flops_per_token

PEERS = ("hf", "trl", "unsloth")


@dataclass
class BenchOptions:
    cases: list[str]
    systems: list[str]
    data_dir: Path
    work: Path
    output: Path | None = None
    profile: bool = False
    peers_path: str | None = None  # PYTHONPATH of an environment holding Unsloth
    timeout_s: int = 900
    parallel: int = 1  # one-GPU runs at a time, each on its own GPU


def runs_on(system: str, case: Case, peers_path: str | None) -> str | None:
    """Why `system` does not run `case`, or None when it does."""
    if case.nproc > 1 and system in ("trl", "unsloth"):
        return "the multi-GPU cases compare with plain HF's engines"
    if case.nproc > 1 and torch.cuda.is_available() and torch.cuda.device_count() < case.nproc:
        return f"needs {case.nproc} GPUs, this machine has {torch.cuda.device_count()}"
    if system == "trl" and case.data != "varlen":
        return "TRL's packing is for variable-length data"
    if system == "unsloth" and peers_path is None:
        return "no Unsloth environment (--peers-path)"
    if system == "unsloth" and case.data == "varlen":
        return "Unsloth's figure for this case comes from its SFTTrainer path (see docs/benchmarks.md)"
    return None


def flops_per_token(case: Case) -> float:
    """Model FLOPs per trained token of a case (see `tuneforge.plan.estimate.flops_per_token`)."""
    return model_flops_per_token(ModelShape.from_config(SHAPES[case.shape]), case.seq, weight_gradients=case.method == "full")


def run_one(case: Case, system: str, options: BenchOptions, gpu: str | None = None) -> dict[str, Any]:
    """`gpu`: the GPU a one-GPU case runs on (by default the first visible one)."""
    logs = options.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    case_path = options.work / f"case-{case.name}.json"
    case_path.write_text(json.dumps(case.to_json()), encoding="utf-8")
    # A system label may hold a path (`tuneforge+distributed.deepspeed_config=/x/zero3.json`).
    stem = re.sub(r"[^\w.+=-]", "_", f"{system}-{case.name}")
    result_path = options.work / f"result-{stem}.json"
    result_path.unlink(missing_ok=True)
    environment = dict(os.environ)
    if system == "unsloth":
        environment["PYTHONPATH"] = os.pathsep.join([options.peers_path or "", environment.get("PYTHONPATH", "")])
    worker = ["tuneforge.bench.worker", system, str(case_path), str(options.work), str(result_path)]
    if case.nproc == 1:
        # A one-GPU case sees one GPU: plain HF's Trainer would otherwise spread it over all of
        # them with DataParallel.
        environment["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else visible_gpus()[0]
    if case.nproc > 1:
        from tuneforge.train.launch import resolve_rendezvous, torchrun_arguments

        one_node = resolve_rendezvous(None, None, None, None, {})
        command = [sys.executable, "-m", "torch.distributed.run", *torchrun_arguments(str(case.nproc), one_node, worker)]
    else:
        command = [sys.executable, "-m", *worker]
    if options.profile and system.startswith("tuneforge"):
        command.append("--profile")
    log = logs / f"{stem}.log"
    where = f" (GPU {environment['CUDA_VISIBLE_DEVICES']})" if options.parallel > 1 and case.nproc == 1 else ""
    print(f"[bench] {case.name} / {system}{where} ...", flush=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        # Its own process group: a timeout stops torchrun's workers too, which would otherwise
        # keep their GPU memory through the next cases.
        process = subprocess.Popen(command, env=environment, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=options.timeout_s)
            status = "ok" if returncode == 0 and result_path.exists() else f"failed (exit {returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out after {options.timeout_s} s"
    wall = time.perf_counter() - started
    placed = {"gpu": environment["CUDA_VISIBLE_DEVICES"]} if case.nproc == 1 else {}
    if status != "ok":
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if log.exists() else []
        print(f"[bench]   {status}: {tail[0] if tail else ''} (log: {log})", flush=True)
        return {"case": case.name, "system": system, "status": status, "wall_s": wall, **placed}
    result = json.loads(result_path.read_text(encoding="utf-8"))
    return {**result, "status": "ok", "wall_s": wall, **placed}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    named = [name for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name]
    if named:
        return named
    return [str(index) for index in range(max(1, torch.cuda.device_count()))]


def run_all(
    jobs: list[tuple[Case, str]], options: BenchOptions, done: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """Every (case, system) run, results in the order of `jobs`; `done(results)` after each run.

    With `options.parallel` > 1, one-GPU runs go `parallel` at a time, each on a GPU of its own
    (on a machine without CUDA, as that many CPU processes); a multi-GPU case runs alone, after
    them, since it needs every GPU.
    """
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    finished = threading.Lock()

    def run(index: int, gpu: str | None) -> None:
        case, system = jobs[index]
        reason = runs_on(system, case, options.peers_path)
        row = run_one(case, system, options, gpu) if reason is None else {"case": case.name, "system": system, "status": f"skipped: {reason}"}
        with finished:
            results[index] = row
            done([r for r in results if r is not None])

    alone = [i for i, (case, _) in enumerate(jobs) if case.nproc > 1 or options.parallel == 1]
    shared = [i for i in range(len(jobs)) if i not in alone]
    if shared:
        gpus = visible_gpus() if torch.cuda.is_available() else [str(slot) for slot in range(options.parallel)]
        free: queue.Queue[str] = queue.Queue()
        for gpu in gpus[: options.parallel]:
            free.put(gpu)

        def on_a_free_gpu(index: int) -> None:
            gpu = free.get()
            try:
                run(index, gpu)
            finally:
                free.put(gpu)

        with ThreadPoolExecutor(max_workers=options.parallel) as pool:
            for future in [pool.submit(on_a_free_gpu, index) for index in shared]:
                future.result()
    for index in alone:
        run(index, None)
    return [row for row in results if row is not None]


def _rate(result: dict[str, Any], case: Case) -> float | None:
    key = "tokens_per_s_run" if case.data == "varlen" else "tokens_per_s_median"
    return result.get(key)


def add_ratios(results: list[dict[str, Any]], peak_tflops: float | None) -> None:
    def rates_of(name: str) -> dict[str, float | None]:
        # tuneforge+... variants are rows too
        return {r["system"]: _rate(r, CASES[name]) for r in results if r["case"] == name and r["status"] == "ok"}

    for name in {r["case"] for r in results}:
        case = CASES[name]
        rates = rates_of(name)
        one_gpu = rates_of(case.one_gpu_case) if case.one_gpu_case else {}
        best_peer = max((rate for system, rate in rates.items() if system in ("trl", "unsloth") and rate), default=None)
        for row in (r for r in results if r["case"] == name and r["status"] == "ok"):
            rate = rates[row["system"]]
            row["tokens_per_s"] = rate
            row["x_hf"] = rate / rates["hf"] if rate and rates.get("hf") else None
            row["x_best_peer"] = rate / best_peer if rate and best_peer else None
            row["x_one_gpu"] = rate / one_gpu[row["system"]] if rate and one_gpu.get(row["system"]) else None
            per_gpu = rate / case.nproc if rate else None
            row["mfu"] = per_gpu * flops_per_token(case) / (peak_tflops * 1e12) if per_gpu and peak_tflops else None


def format_whole_run(row: dict[str, Any]) -> str:
    """What a whole-run rate (the figure for variable-length data) pays beyond its median step,
    and the whole process around it: work moved before the first step shows there."""
    return (
        f"  whole run of {row['case']} ({row['system']}): {row['run_seconds']:.1f} s, of which "
        f"{row['warmup_step_seconds']:.1f} s in the {row['warmup_steps']} warm-up steps and "
        f"{row['seconds_outside_steps']:.1f} s outside any step; the process took {row['wall_s']:.1f} s "
        "(imports, data, model loading and saving included)"
    )


def format_table(results: list[dict[str, Any]]) -> str:
    def number(value: Any, pattern: str) -> str:
        return pattern.format(value) if isinstance(value, (int, float)) else "—"

    lines = [
        "| case | system | tokens/s | x plain HF | x best peer | x 1 GPU | peak GiB | MFU | loss first → last | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results:
        loss = f"{number(row.get('loss_first'), '{:.3f}')} → {number(row.get('loss_last'), '{:.3f}')}"
        lines.append(
            f"| {row['case']} | {row['system']} | {number(row.get('tokens_per_s'), '{:,.0f}')} | "
            f"{number(row.get('x_hf'), '{:.2f}x')} | {number(row.get('x_best_peer'), '{:.2f}x')} | "
            f"{number(row.get('x_one_gpu'), '{:.2f}x')} | "
            f"{number(row.get('peak_gib'), '{:.1f}')} | {number(row.get('mfu'), '{:.1%}')} | {loss} | {row['status']} |"
        )
    return "\n".join(lines)


def run_bench(options: BenchOptions) -> list[dict[str, Any]]:
    unknown = [name for name in options.cases if name not in CASES]
    if unknown:
        raise ConfigError(f"unknown case {unknown[0]!r}", where="--cases", hint=f"known: {', '.join(CASES)}")
    if options.parallel < 1 or (torch.cuda.is_available() and options.parallel > len(visible_gpus())):
        raise ConfigError(
            f"--parallel {options.parallel}: this machine has {len(visible_gpus())} GPU(s)", where="--parallel",
            hint="each run at once needs a GPU of its own; 1 runs them one after another",
        )
    systems = [s for s in options.systems if s.split("+")[0] not in ("tuneforge", *PEERS) or ("+" in s and not s.startswith("tuneforge+"))]
    if systems:
        raise ConfigError(f"unknown system {systems[0]!r}", where="--systems", hint="tuneforge, hf, trl, unsloth")
    options.work.mkdir(parents=True, exist_ok=True)
    data_link = options.work / "data"
    if not data_link.exists():
        data_link.symlink_to(options.data_dir.resolve(), target_is_directory=True)
    cases = [CASES[name] for name in options.cases]
    assets = build_assets(options.work, data_link, {case.shape for case in cases})
    for case in cases:
        write_rows(case, options.work, data_link, assets["tokenizer"])
    peak = matmul_peak_tflops()
    if peak:
        print(f"[bench] bf16 matmul peak on this GPU: {peak:.0f} TFLOP/s", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"

    def after_each_run(results: list[dict[str, Any]]) -> None:
        # After every run: a long benchmark cut short keeps what finished.
        add_ratios(results, peak)
        if options.output is not None:
            options.output.write_text(
                json.dumps({"device": device, "matmul_peak_tflops": peak, "parallel": options.parallel, "results": results}, indent=1) + "\n",
                encoding="utf-8",
            )

    results = run_all([(case, system) for case in cases for system in options.systems], options, after_each_run)
    import transformers

    print(f"\ndevice: {device}; torch {torch.__version__}; transformers {transformers.__version__}")
    for row in results:
        if row.get("profile_seconds"):
            profile = format_profile(row["profile_seconds"], row.get("step_seconds_median"), row.get("profile_compute_seconds"))
            print(f"  profile of one {row['case']} step ({row['system']}):\n{profile}")
            for name, seconds in row.get("profile_top_other", []):
                print(f"      other: {seconds * 1000:8.1f} ms  {name}")
        if CASES[row["case"]].data == "varlen" and row.get("run_seconds"):
            print(format_whole_run(row))
    print(format_table(results), flush=True)
    return results


__all__ = ["BenchOptions", "flops_per_token", "format_table", "run_all", "run_bench", "runs_on", "visible_gpus"]
