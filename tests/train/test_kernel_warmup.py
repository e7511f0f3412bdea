"""Liger's Triton kernels compiled in a process beside the run (train/kernel_warmup.py, kernel_compile.py)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import AutoConfig

from tests.conftest import write_jsonl
from tuneforge.config.loading import load_config
from tuneforge.train import kernel_compile, kernel_warmup, speed
from tuneforge.train.kernel_compile import (
    WarmupPlan,
    padded_batch_sizes,
    run_warmup_plan,
    token_counts,
    warmup_plan,
)
from tuneforge.train.kernel_warmup import (
    KernelWarmup,
    start_kernel_warmup,
    worth_starting,
)


def _classes(count: int, sm_count: int) -> tuple[bool, str]:
    """The classes Triton puts a token count's integers in: the count's divisibility by 16, and
    that of Liger's RMSNorm backward rows per program (1, a multiple of 16, other)."""
    per_program = math.ceil(count / sm_count)
    return count % 16 == 0, "one" if per_program == 1 else "16k" if per_program % 16 == 0 else "other"


@pytest.mark.parametrize("sm_count", [132, 114, 78])
@pytest.mark.parametrize("max_tokens", [4096, 2048, 1000, 100])
def test_the_token_counts_meet_every_class_a_run_can_meet(max_tokens, sm_count):
    counts = token_counts(max_tokens, sm_count)
    every_count = {_classes(count, sm_count) for count in range(16, max_tokens + 1)}
    assert {_classes(count, sm_count) for count in counts} == every_count
    assert max(counts) == max_tokens and len(counts) <= 8


def _size_class(size: int) -> str:
    return "one" if size == 1 else "16k" if size % 16 == 0 else "other"


@pytest.mark.parametrize("micro_batch", [1, 2, 3, 8, 15, 16, 17, 20, 32, 33])
def test_padded_batch_sizes_meet_every_class_an_epoch_s_batches_can_meet(micro_batch):
    sizes = padded_batch_sizes(micro_batch)
    # Full batches hold micro_batch rows; an epoch's last may hold any number from 1 up.
    assert {_size_class(size) for size in sizes} == {_size_class(size) for size in range(1, micro_batch + 1)}
    assert micro_batch in sizes and max(sizes) == micro_batch
    # RoPE's kernel is compiled for each batch size (a constant in it): every one, up to 8 rows.
    assert sizes == tuple(range(1, micro_batch + 1)) if micro_batch <= 8 else len(sizes) <= 3


def _settings(tmp_path, tiny_model_dir, **sections):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    settings = {
        "model": {"path": str(tiny_model_dir), "dtype": "bfloat16"},  # the tiny checkpoint is fp32
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}],
                 "max_length": 64},
        "method": {"name": "lora"},
        "train": {"per_device_train_batch_size": 4},
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        settings[section] = {**settings.get(section, {}), **values}
    return settings


@pytest.fixture
def gpu_with_liger(monkeypatch):
    # The plan only asks whether a GPU and Liger are there: none is touched.
    monkeypatch.setattr(speed, "liger_model_types", lambda: {"llama"})
    monkeypatch.setattr(kernel_compile.torch.cuda, "is_available", lambda: True)


def test_the_plan_follows_the_run_s_shapes_method_and_model(tmp_path, tiny_model_dir, gpu_with_liger):
    packed = run_warmup_plan(load_config(_settings(tmp_path, tiny_model_dir, data={"packing": True})))
    assert isinstance(packed, WarmupPlan)
    # Packed batches are one padding-free row of up to micro-batch x max_length tokens.
    assert (packed.batch_sizes, packed.max_tokens) == ((1,), 4 * 64)
    model = AutoConfig.from_pretrained(tiny_model_dir)
    assert (packed.hidden_size, packed.num_heads, packed.num_kv_heads, packed.head_dim, packed.vocab_size) == (
        model.hidden_size, 4, 2, model.hidden_size // 4, model.vocab_size,
    )
    assert packed.trains_norms == (False,) and not packed.trains_output_layer  # LoRA freezes them
    assert packed.elementwise and packed.dtype == torch.bfloat16 and packed.device == torch.device("cuda", 0)

    # Padded rows: micro-batches of 4, and an epoch's last batch of any fewer.
    padded = run_warmup_plan(load_config(_settings(tmp_path, tiny_model_dir)), local_rank=1)
    assert (padded.batch_sizes, padded.max_tokens, padded.device) == ((1, 2, 3, 4), 64, torch.device("cuda", 1))

    full = run_warmup_plan(load_config(_settings(tmp_path, tiny_model_dir, method={"name": "full"}, speed={"compile": True})))
    assert full.trains_norms == (True,) and full.trains_output_layer
    assert not full.elementwise  # compiled layers leave RMSNorm, RoPE and SwiGLU to inductor


@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        ({"speed": {"warm_kernels": False}}, "off (speed.warm_kernels: false)"),
        ({"train": {"use_cpu": True}}, "no CUDA GPU"),
        ({"speed": {"liger": False}}, "Liger kernels off (speed.liger: false)"),
        ({"model": {"dtype": "float32"}}, "not for torch.float32 activations"),
        ({"distributed": {"strategy": "deepspeed"}}, "not under FSDP or DeepSpeed"),
    ],
)
def test_where_no_kernel_is_compiled_the_plan_says_why(tmp_path, tiny_model_dir, gpu_with_liger, sections, reason):
    plan = run_warmup_plan(load_config(_settings(tmp_path, tiny_model_dir, **sections)), world_size=2)
    assert isinstance(plan, str) and plan.startswith(reason)


def test_a_model_type_outside_llama_s_patch_is_not_warmed():
    gpt2 = AutoConfig.for_model("gpt2")
    reason = warmup_plan(gpt2, dtype=torch.bfloat16, device=torch.device("cuda"), batch_sizes=(1,), max_tokens=64,
                         method="lora", elementwise=True)
    assert reason == "not for model type 'gpt2' (kernels compile in the first steps)"


def test_the_process_starts_only_where_it_can_compile_something(tmp_path, monkeypatch):
    driver = tmp_path / "nvidiactl"
    driver.touch()
    monkeypatch.setattr(kernel_warmup, "NVIDIA_DRIVER", driver)
    monkeypatch.setattr(kernel_warmup.importlib.util, "find_spec", lambda name: object())
    assert worth_starting({})
    assert worth_starting({"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert not worth_starting({"LOCAL_RANK": "1"})  # the node's first process compiles for all
    assert not worth_starting({"CUDA_VISIBLE_DEVICES": ""})
    monkeypatch.setattr(kernel_warmup.importlib.util, "find_spec", lambda name: None)
    assert not worth_starting({})  # no liger-kernel
    monkeypatch.setattr(kernel_warmup.importlib.util, "find_spec", lambda name: object())
    driver.unlink()
    assert not worth_starting({})  # no NVIDIA driver
    # Where it does not start, finishing says nothing and waits for nothing.
    with start_kernel_warmup({"model": {}}) as warmup:
        assert warmup.finish() is None


def test_a_process_that_cannot_start_leaves_the_steps_to_compile(monkeypatch):
    monkeypatch.setattr(kernel_warmup, "worth_starting", lambda: True)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kernel_warmup.tempfile, "mkdtemp", full_disk)
    with start_kernel_warmup({"model": {}}) as warmup:
        assert warmup.finish() is None


def _finished(warmup: KernelWarmup) -> str | None:
    warmup._process.wait(timeout=300)  # as when training begins after the process is done
    return warmup.finish()


def test_the_process_reads_the_run_s_config_and_overrides_and_reports(tmp_path, tiny_model_dir, monkeypatch):
    # The real process on this CPU machine: it validates the same config and says why it compiled nothing.
    monkeypatch.setattr(kernel_warmup, "worth_starting", lambda: True)
    settings = _settings(tmp_path, tiny_model_dir)
    with start_kernel_warmup(settings, ["speed.warm_kernels=false"]) as warmup:
        assert _finished(warmup) == "Triton kernel warm-up: off (speed.warm_kernels: false)"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(settings), encoding="utf-8")  # JSON is YAML
    with start_kernel_warmup(config_file) as warmup:
        assert _finished(warmup) == "Triton kernel warm-up: no CUDA GPU"
    # A validated Config travels as the run directory's config.yaml is written, its values with it.
    with start_kernel_warmup(load_config(settings, ["speed.warm_kernels=false"])) as warmup:
        assert _finished(warmup) == "Triton kernel warm-up: off (speed.warm_kernels: false)"
    # A bad config fails in the process as in the run, which reports it once itself.
    with start_kernel_warmup(settings, ["speed.warm_kernel=false"]) as warmup:
        message = _finished(warmup)
    assert message.startswith("Triton kernel warm-up failed (ConfigError: ") and "warm_kernel" in message
    assert message.endswith("; the first steps compile the kernels")


def _started(tmp_path, code: str, compiling: bool = False) -> KernelWarmup:
    folder = tmp_path / "warmup"
    folder.mkdir()
    if compiling:
        (folder / kernel_warmup.COMPILING).touch()
    with open(folder / "log.txt", "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    return KernelWarmup(process, folder)


@pytest.mark.parametrize(("compiling", "phase"), [(False, "importing its libraries"), (True, "compiling")])
def test_training_does_not_wait_for_the_process_but_stops_it(tmp_path, compiling, phase):
    running = _started(tmp_path, "import time; time.sleep(60)", compiling=compiling)
    process = running._process
    time.sleep(0.3)
    started = time.perf_counter()
    message = running.finish()
    assert time.perf_counter() - started < 10
    ran = float(message.split("still ")[1].split(" s after")[0].split()[-1])
    assert 0.3 <= ran < 10
    # "the rest": each kernel it finished is in Triton's cache already.
    assert message == f"Triton kernel warm-up stopped: still {phase} {ran:.1f} s after it started; the first steps compile the rest"
    assert process.poll() is not None  # killed, not left holding the GPU
    assert not (tmp_path / "warmup").exists()  # its files are removed


def test_a_process_that_died_is_reported_and_training_goes_on(tmp_path):
    crashed = _started(tmp_path, "print('Segmentation fault'); raise SystemExit(139)")
    assert _finished(crashed) == (
        "Triton kernel warm-up failed (exit code 139: Segmentation fault); the first steps compile the kernels"
    )


def test_finish_says_what_the_process_compiled(tmp_path):
    report = {"shapes": 8, "compile_seconds": 6.04}
    warmup = _started(tmp_path, f"import json, time; open({str(tmp_path / 'warmup' / kernel_warmup.REPORT)!r}, 'w').write("
                                f"json.dumps({{**{report!r}, 'finished_at': time.time()}}))", compiling=True)
    message = _finished(warmup)
    assert message.startswith("Triton kernel warm-up: Liger's kernels compiled for 8 step shapes in 6.0 s, by a process that ended ")
    assert message.endswith(" s after it started, before training began")


_RUN = textwrap.dedent(
    """
    import json, sys
    from triton import knobs
    from transformers import TrainerCallback
    from tuneforge import train
    from tuneforge.train.kernel_warmup import start_kernel_warmup

    model_dir, data, out, packing, warm = sys.argv[1:]
    compiled, training = [], []

    class Begin(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            training.append(True)

    def listener(src, metadata, metadata_group, times, cache_hit):
        if training and not cache_hit:  # a kernel the steps compiled, not read from Triton's cache
            compiled.append(src.name)

    knobs.compilation.listener = listener
    config = {
        "model": {"path": model_dir, "dtype": "bfloat16"},
        "data": {"datasets": [{"path": data, "prompt_fields": ["question"], "response_field": "answer"}],
                 "max_length": 256, "packing": packing == "1"},
        "method": {"name": "lora"},
        "train": {"per_device_train_batch_size": 3, "num_train_epochs": 1, "logging_steps": 1, "bf16": True,
                  "save_strategy": "no"},
        "speed": {"warm_kernels": warm == "1", "liger": True},
        "output": {"dir": out},
    }
    if warm == "1":
        # A tiny model is ready before the process has imported its libraries, so training would
        # stop it: here it runs to its end first, as beside an 8B model's loading.
        with start_kernel_warmup(config) as warmup:
            warmup._process.wait()
            print(warmup.finish())
    result = train(config, callbacks=[Begin()])
    losses = [json.loads(line).get("loss") for line in open(f"{out}/metrics.jsonl")]
    print("RESULT " + json.dumps({"compiled": compiled, "losses": [x for x in losses if x is not None]}))
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packing", [True, False])
def test_after_the_warmup_no_step_waits_for_a_kernel_to_compile(tmp_path, tiny_model_dir, packing):
    pytest.importorskip("liger_kernel")
    random.seed(0)
    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three"]
    rows = [{"question": " ".join(random.choices(words, k=random.randint(2, 120))),
             "answer": " ".join(random.choices(words, k=random.randint(1, 60)))}
            for _ in range(40)]  # a few tokens to over 256 (those are cut or dropped: the last padded batch's size varies)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    script = tmp_path / "run.py"
    script.write_text(_RUN, encoding="utf-8")

    def run(warm: bool) -> dict:
        # Each run in its own process with an empty Triton cache, as on a fresh host.
        env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / f"triton-{warm}")}
        done = subprocess.run(
            [sys.executable, str(script), str(tiny_model_dir), str(data), str(tmp_path / f"run-{warm}"),
             "1" if packing else "0", "1" if warm else "0"],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert ("Triton kernel warm-up: Liger's kernels compiled" in done.stdout) == warm, done.stdout[-3000:]
        return json.loads(done.stdout.split("RESULT ")[-1])

    cold, warmed = run(False), run(True)
    assert cold["compiled"], "without the warm-up the steps compile Liger's kernels (else this test shows nothing)"
    assert warmed["compiled"] == []
    assert warmed["losses"] == pytest.approx(cold["losses"], rel=1e-5)


def test_a_run_stops_the_process_as_training_begins_and_says_so(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from transformers import TrainerCallback

    import tuneforge
    from tests.train.test_recipe import config as recipe_config

    monkeypatch.setattr(kernel_warmup, "worth_starting", lambda: True)  # the process runs here on the CPU
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(kernel_warmup.tempfile, "tempdir", str(tmp_path / "tmp"))  # where its files go

    class Begin(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            print("training begins")

    tuneforge.train(recipe_config(tmp_path, tiny_model_dir, max_steps=1), callbacks=[Begin()])
    out = capsys.readouterr().out
    # The tiny run is usually ready before the process has imported torch and transformers (this
    # test's process has them already): training does not wait, the process is stopped. On a slow
    # machine it may have ended first, having found no GPU. Either way it is reported as training begins.
    said = next(line for line in out.splitlines() if "Triton kernel warm-up" in line)
    assert ("stopped: still importing its libraries" in said) or said.endswith("Triton kernel warm-up: no CUDA GPU")
    assert out.index("training begins") < out.index(said)
    assert not list((tmp_path / "tmp").iterdir())  # its files are removed
    # With speed.warm_kernels off the process is stopped once the config is read, without a word.
    tuneforge.train(recipe_config(tmp_path, tiny_model_dir, max_steps=1),
                    overrides=["speed.warm_kernels=false", f"output.dir={tmp_path / 'run-off'}"])
    assert "Triton kernel warm-up" not in capsys.readouterr().out
    assert not list((tmp_path / "tmp").iterdir())
