"""`tuneforge bench` on a tiny model: every system trains the same weights on the same rows, the
table and JSON report what was measured, and the kernel classes of a profile are right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuneforge.bench.cases import CASES, SHAPES
from tuneforge.bench.profile import classify, counted
from tuneforge.bench.runner import BenchOptions, flops_per_token, run_bench, runs_on
from tuneforge.errors import ConfigError


def test_tuneforge_and_plain_hf_train_the_same_model_on_the_same_rows(shared_dir, tmp_path, capsys):
    output = tmp_path / "bench.json"
    # A label that holds a path still names its log and result files.
    recompute = f"tuneforge+speed.activations=recompute+data.cache_dir={tmp_path / 'other-cache'}"
    # Two runs at a time (two GPUs on a GPU machine, two processes here).
    results = run_bench(BenchOptions(
        cases=["tiny-lora"], systems=["tuneforge", recompute, "hf", "trl"],
        data_dir=shared_dir / "data", work=tmp_path / "work", output=output, profile=True, timeout_s=300, parallel=2,
    ))
    by_system = {row["system"]: row for row in results}
    assert by_system["trl"]["status"].startswith("skipped: TRL's packing is for variable-length data")
    ran = [by_system[name] for name in ("tuneforge", recompute, "hf")]
    assert all(row["status"] == "ok" for row in ran), [row["status"] for row in ran]
    assert {row["gpu"] for row in ran} == {"0", "1"}
    # Two tuneforge runs of one case, each in its own run folder.
    assert len(list((tmp_path / "work" / "runs").glob("tuneforge*tiny-lora/summary.json"))) == 2
    case = CASES["tiny-lora"]
    for row in ran:
        assert row["steps"] == case.steps and row["tokens"] == case.steps * case.micro_batch * case.seq
        assert row["tokens_per_s"] > 0
    # Same saved weights, rows and order: the first losses agree; recomputation changes nothing.
    assert ran[0]["loss_first"] == pytest.approx(ran[2]["loss_first"], rel=1e-3)
    assert ran[1]["loss_last"] == pytest.approx(ran[0]["loss_last"], rel=1e-4)
    assert by_system["hf"]["x_hf"] == 1.0
    assert by_system["tuneforge"]["x_hf"] == pytest.approx(ran[0]["tokens_per_s"] / ran[2]["tokens_per_s"])
    assert set(by_system["tuneforge"]["profile_seconds"]) >= {"matmul", "data wait (host)"}
    assert by_system["tuneforge"]["step_seconds_median"] > 0
    import gzip

    traces = sorted((tmp_path / "work").glob("result-*tuneforge*.json.trace.json.gz"))
    assert len(traces) == 2  # the timeline of each tuneforge run's profiled step
    timeline = json.loads(gzip.decompress(traces[0].read_bytes()))
    assert any(event.get("name", "").startswith("aten::mm") for event in timeline["traceEvents"])
    out = capsys.readouterr().out
    assert f"| tiny-lora | {recompute} |" in out and "profile of one tiny-lora step" in out
    assert (tmp_path / "other-cache").is_dir()  # the override reached the run
    saved = json.loads(output.read_text())
    assert [row["system"] for row in saved["results"]] == [row["system"] for row in results]


def test_unknown_cases_and_systems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown case 'lora70b'"):
        run_bench(BenchOptions(cases=["lora70b"], systems=["hf"], data_dir=tmp_path, work=tmp_path))
    with pytest.raises(ConfigError, match="--parallel 0"):
        run_bench(BenchOptions(cases=["tiny-lora"], systems=["hf"], data_dir=tmp_path, work=tmp_path, parallel=0))
    with pytest.raises(ConfigError, match="unknown system 'hf\\+speed.liger=true'"):
        run_bench(BenchOptions(cases=["tiny-lora"], systems=["hf+speed.liger=true"], data_dir=tmp_path, work=tmp_path))


def test_which_system_runs_which_case():
    assert runs_on("trl", CASES["lora8b"], None) is not None
    assert runs_on("trl", CASES["varlen8b"], None) is None
    assert "no Unsloth environment" in runs_on("unsloth", CASES["lora8b"], None)
    assert runs_on("unsloth", CASES["lora8b"], "/peers") is None


def test_model_flops_per_token():
    # Llama-3.1-8B: ~7.5e9 matmul parameters (with the output head) -> 4N for LoRA, 6N for full.
    shape = SHAPES["llama-8b"]
    lora = flops_per_token(CASES["lora8b"])
    attention = 6 * shape["num_hidden_layers"] * shape["hidden_size"] * 2048
    assert (lora - attention) / 4 == pytest.approx(7.5e9, rel=0.01)
    full = flops_per_token(CASES["full1b"])
    assert full > 6 * 1.2e9


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_192x192_64x3_1x2_h_bz_coopA_TNT", "matmul"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>", "attention"),
        ("_rms_norm_forward_kernel", "norm"),
        ("_cross_entropy_kernel", "loss"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("Memcpy DtoH (Device -> Pinned)", "host-device copies"),
        ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("c10d::allreduce_", "communication"),
        ("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>", "elementwise and other"),
    ],
)
def test_kernel_classes(kernel, kind):
    assert classify(kernel) == kind


def test_a_step_profile_counts_each_kernel_once():
    """On a GPU an operator's device time is its kernels' and a `record_function` range spans
    the kernels inside it: counting them too showed a 2x2-GPU LoRA step spending 212 ms in
    `DistributedDataParallel.forward`, "elementwise and other"."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    kernel = SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=False)
    operator = SimpleNamespace(device_type=DeviceType.CPU, is_user_annotation=False)
    gpu_range = SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=True)
    cpu_range = SimpleNamespace(device_type=DeviceType.CPU, is_user_annotation=True)
    assert [counted(event, on_gpu=True) for event in (kernel, operator, gpu_range)] == [True, False, False]
    assert [counted(event, on_gpu=False) for event in (operator, cpu_range)] == [True, False]


def test_the_profile_says_how_long_the_gpu_waits_for_the_host():
    """Kernel time is compute-stream work; NCCL kernels overlap on their own stream and the data
    wait is host time, so neither fills the gap between the kernels and the step."""
    from tuneforge.bench.profile import format_profile, host_bound_seconds

    seconds = {"matmul": 0.20, "elementwise and other": 0.05, "communication": 0.10, "data wait (host)": 0.01}
    assert host_bound_seconds(seconds, step_seconds=0.30) == pytest.approx(0.05)
    assert host_bound_seconds(seconds, step_seconds=0.20) == 0.0  # a busier profiled step than the median
    assert "GPU without work      50.0 ms of the unprofiled median step's 300.0 ms" in format_profile(seconds, 0.30)
    assert "without work" not in format_profile(seconds)


def test_the_gpu_wait_is_measured_on_the_compute_stream_not_hidden_by_side_streams():
    """Offloading copies on its own stream and NCCL on another: their work overlaps the compute
    stream's gaps, so the idle time is the step less the compute stream's own busy time."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from tuneforge.bench.profile import compute_stream_seconds, format_profile

    def kernel(name: str, stream: int, start_us: float, end_us: float, device: DeviceType = DeviceType.CUDA):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start_us, end_us=end_us,
                             device_type=device, device_index=0, device_resource_id=stream)

    events = [
        kernel("ampere_bf16_gemm", 7, 0, 200_000),
        kernel("elementwise_kernel", 7, 250_000, 300_000),
        kernel("Memcpy DtoH (Device -> Pinned)", 20, 200_000, 250_000),  # fills the compute stream's gap
        kernel("ncclDevKernel_AllReduce", 30, 0, 290_000),  # more device time than the compute stream
        kernel("aten::mm", 7, 0, 400_000, device=DeviceType.CPU),  # the host operator, not device work
    ]
    assert compute_stream_seconds(events) == pytest.approx(0.25)
    assert compute_stream_seconds([events[-1]]) is None
    seconds = {"matmul": 0.20, "host-device copies": 0.05, "elementwise and other": 0.05}
    # Counting every class as compute work, the copies would hide 50 ms of the wait.
    assert "GPU without work      50.0 ms" in format_profile(seconds, 0.35)
    shown = format_profile(seconds, 0.35, compute_seconds=0.25)
    assert "GPU without work     100.0 ms of the unprofiled median step's 350.0 ms; the compute stream was busy 250.0 ms" in shown


def test_a_two_process_case_counts_every_rank_and_reports_scaling(shared_dir, tmp_path):
    results = run_bench(BenchOptions(
        cases=["tiny-full", "tiny-full-ddp2"], systems=["tuneforge", "hf", "unsloth"],
        data_dir=shared_dir / "data", work=tmp_path / "work", timeout_s=300,
    ))
    rows = {(row["case"], row["system"]): row for row in results}
    assert "multi-GPU cases compare with plain HF" in rows["tiny-full-ddp2", "unsloth"]["status"]
    case = CASES["tiny-full-ddp2"]
    for system in ("tuneforge", "hf"):
        two, one = rows["tiny-full-ddp2", system], rows["tiny-full", system]
        assert two["status"] == "ok", two["status"]
        # Both processes' tokens: twice the rows of one process per step.
        assert two["tokens"] == case.steps * case.micro_batch * case.seq * 2
        assert two["x_one_gpu"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
        assert one.get("x_one_gpu") is None
    # The same rows reach the same ranks in the same order under both systems.
    assert rows["tiny-full-ddp2", "tuneforge"]["loss_first"] == pytest.approx(rows["tiny-full-ddp2", "hf"]["loss_first"], rel=1e-3)


def test_a_profiled_step_and_the_profilers_own_work_count_in_no_figure():
    """A profiled step runs slowly and the trace is written after it (seconds on a long run);
    the whole-run rate of a variable-length case must not pay for either."""
    from tuneforge.bench.timing import StepTimer

    timer = StepTimer()
    timer.steps = [(1.0, 100), (0.5, 100), (3.0, 100), (0.5, 100)]  # step 3 profiled
    timer.train_seconds = 7.0  # 5 s of steps, the profiler's 1.5 s after step 3, 0.5 s of the rest
    plain = timer.result(warmup=1)
    assert plain["tokens_per_s_run"] == pytest.approx(400 / 7.0)
    left_out = timer.result(warmup=1, left_out=(3, 4.5))  # the step's 3 s and the trace's 1.5 s
    assert left_out["tokens_per_s_run"] == pytest.approx(300 / 2.5)
    assert left_out["tokens_per_s_median"] == pytest.approx(200)
    assert left_out["tokens"] == 400  # every step's tokens were trained
    # The rest of the run: 0.5 s outside the steps; 1 s in the warm-up step.
    assert left_out["seconds_outside_steps"] == pytest.approx(0.5)
    assert plain["seconds_outside_steps"] == pytest.approx(2.0)  # the profiler's 1.5 s counted there
    assert plain["warmup_step_seconds"] == pytest.approx(1.0)
    assert left_out["step_seconds"] == [1.0, 0.5, 3.0, 0.5]
    from tuneforge.bench.runner import format_whole_run

    line = format_whole_run({"case": "varlen8b", "system": "tuneforge", "wall_s": 31.04, **left_out})
    assert line == (
        "  whole run of varlen8b (tuneforge): 2.5 s, of which 1.0 s in the 1 warm-up steps and 0.5 s outside any "
        "step; the process took 31.0 s (imports, data, model loading and saving included)"
    )


def test_the_timer_imports_no_training_code_into_the_peers_environments():
    """The peers' workers import `bench.timing` inside Unsloth's and TRL's environments: it must
    not bring tuneforge's training stack (peft adapters, Triton kernels) along."""
    script = "import sys, tuneforge.bench.timing; print(' '.join(sorted(m for m in sys.modules if m.startswith('tuneforge'))))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert loaded == {"tuneforge", "tuneforge.errors", "tuneforge.train", "tuneforge.bench",
                      "tuneforge.train.layer_graphs", "tuneforge.bench.timing"}


def test_the_timer_tiles_the_run_with_steps_and_never_synchronises_inside_one(monkeypatch):
    """A step runs from its start to the next step's start, so the host's work between two steps
    (logging, the next batch) is counted in the step before it; the timer synchronises only where
    training begins and ends, never at a step's edges (that emptied the GPU's queue every step)."""
    import time
    from types import SimpleNamespace

    from tuneforge.bench import timing

    syncs = []
    monkeypatch.setattr(timing, "_sync", lambda: syncs.append(1))
    timer = timing.StepTimer()
    state = SimpleNamespace(num_input_tokens_seen=0)
    timer.on_train_begin(None, state, None)
    for work, between, tokens in ((0.05, 0.10, 100), (0.05, 0.0, 60)):
        timer.on_step_begin(None, state, None)
        time.sleep(work)
        state.num_input_tokens_seen += tokens
        timer.on_step_end(None, state, None)
        time.sleep(between)  # the host's work after a step: the log, the next batch
    assert syncs == [1]
    timer.on_train_end(None, state, None)
    assert syncs == [1, 1]
    (first, first_tokens), (second, second_tokens) = timer.steps
    assert (first_tokens, second_tokens) == (100, 60)
    assert 0.15 <= first < 0.25 and 0.05 <= second < 0.1


def test_runs_log_every_ten_steps_and_at_least_twice():
    """Each log reads the loss on the host (the GPU's queue empties there), so the bench logs as
    tuneforge does by default, not every step; a short run still logs a first and a last loss."""
    from tuneforge.bench.worker import logging_steps

    assert logging_steps(CASES["full1b"]) == 10 and logging_steps(CASES["lora8b"]) == 10
    assert logging_steps(CASES["varlen8b"]) == 10  # whole epochs
    assert logging_steps(CASES["tiny-lora"]) == CASES["tiny-lora"].steps // 2
