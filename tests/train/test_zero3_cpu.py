"""DeepSpeed ZeRO-3 through tuneforge's real path on 2 CPU processes (full fine-tuning and LoRA).

Each run is `tuneforge.train.train` in two gloo workers started by torchrun with
`distributed: {strategy: deepspeed, zero_stage: 3}`: transformers loads the model partitioned
(`deepspeed.zero.Init`), the Trainer wraps it in DeepSpeed's engine, tuneforge writes its atomic
checkpoints, the final gathered save and `verify_export`. Then a second run resumes from the
step-2 checkpoint in the same two processes. Two test-only pieces, both in tests/support/:

- `zero3_cpu/sitecustomize.py`, first on the workers' PYTHONPATH: with `use_cpu` transformers
  never starts DeepSpeed's comm nor tells accelerate to use DeepSpeed (it does so on GPUs only);
  the shim makes that choice for the CPU group as accelerate makes it for GPUs.
- `zero3_worker.py`, each worker's entry point: `train(CONFIG)` per config plus a callback that
  gathers the live weights (`deepspeed.zero.GatheredParameters`) at each save and at the end,
  and records what each rank held after step 1.

DeepSpeed comes with the `test` extra (on a CPU it installs as plain Python); without it (or
without gloo) these tests skip. A DeepSpeed installed elsewhere (`pip install --target DIR
deepspeed`) works too: `PYTHONPATH=DIR pytest tests/train/test_zero3_cpu.py`; the workers get the
same DeepSpeed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from tests.train.test_distributed import STEPS, write_config
from tuneforge.train.checkpoints import read_manifest

SUPPORT = Path(__file__).resolve().parents[1] / "support"
SAVE_STEP = 2  # the mid-run checkpoint; the run ends at STEPS (4), which saves too
ZERO3 = {"strategy": "deepspeed", "zero_stage": 3}


def _zero3_on_cpu_missing() -> str | None:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return "needs torch.distributed with the gloo backend"
    if importlib.util.find_spec("deepspeed") is None:
        return "needs DeepSpeed (in the test extra): pip install -e \".[test]\", or put it on PYTHONPATH"
    try:
        importlib.metadata.version("deepspeed")  # transformers checks the installed version
    except importlib.metadata.PackageNotFoundError:
        return "DeepSpeed is importable but has no package metadata (transformers refuses it)"
    return None


MISSING = _zero3_on_cpu_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def _worker_path() -> str:
    deepspeed_home = Path(importlib.util.find_spec("deepspeed").origin).parents[1]
    return os.pathsep.join([str(SUPPORT / "zero3_cpu"), str(Path(tuneforge.__file__).parents[1]), str(deepspeed_home)])


def zero3_runs(tmp_path: Path, model_dir: Path, name: str, method: dict) -> tuple[Path, Path]:
    """Train 4 steps on 2 partitioned ranks, saving at steps 2 and 4; then, in the same two
    processes, resume from the step-2 checkpoint into `<name>-resumed`. Returns the folder
    holding the runs and the one holding what the workers' callback recorded."""
    train_args = {"save_strategy": "steps", "save_steps": SAVE_STEP, "report_to": "none"}
    run = write_config(tmp_path, model_dir, name, method=method, distributed=ZERO3, train=train_args)
    resumed = write_config(
        tmp_path, model_dir, f"{name}-resumed", method=method, distributed=ZERO3, train=train_args,
        output={"dir": str(tmp_path / f"{name}-resumed"), "resume": str(tmp_path / name / f"checkpoint-{SAVE_STEP}")},
    )
    recorded = tmp_path / "live"
    recorded.mkdir()
    env = dict(os.environ, PYTHONPATH=_worker_path(), DS_ACCELERATOR="cpu")
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(SUPPORT / "zero3_worker.py"), str(recorded), str(run), str(resumed)],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "resuming from" in finished.stdout
    return tmp_path, recorded


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    return zero3_runs(tmp_path_factory.mktemp("zero3-full"), tiny_model_dir, "full", {"name": "full"})


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    return zero3_runs(tmp_path_factory.mktemp("zero3-lora"), tiny_model_dir, "lora", {"name": "lora", "r": 4})


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def live(recorded: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(recorded / f"{name}-live-step-{step}.safetensors"))


def assert_same(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(saved) == sorted(expected), what
    for name, value in expected.items():
        assert saved[name].shape == value.shape and torch.equal(saved[name], value), f"{what}: {name}"


def assert_trains(runs: Path, name: str) -> None:
    """4 finite losses, falling; the resumed run logs the original's steps 3 and 4."""
    logged = losses(runs / name)
    assert len(logged) == STEPS and all(math.isfinite(loss) for loss in logged), logged
    assert logged[-1] < logged[0], logged
    assert losses(runs / f"{name}-resumed") == pytest.approx(logged[SAVE_STEP:], rel=1e-5)


def assert_partitioned(recorded: Path, name: str) -> None:
    """During training every parameter was a ZeRO-3 one, each rank held about half of the
    values, and the parameters' own tensors were empty but for the small ones DeepSpeed keeps
    whole on every rank (`stage3_param_persistence_threshold`, 10 x hidden size with the shipped
    `auto`: norms, and here the tiny model's LoRA matrices too): not a DDP run."""
    ranks = [json.loads((recorded / f"{name}-sharding-rank-{rank}.json").read_text()) for rank in (0, 1)]
    for held in ranks:
        assert held["zero3_parameters"] == held["parameters"] > 0, held
        assert held["local_numel"] < 0.6 * held["full_numel"], held
        assert held["own_numel"] == held["persistent_numel"], held
        assert held["largest_persistent"] < 0.01 * held["full_numel"], held
    assert ranks[0]["full_numel"] <= sum(held["local_numel"] for held in ranks) <= ranks[0]["full_numel"] + 2 * ranks[0]["parameters"]


def assert_deepspeed_checkpoint(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A DeepSpeed ZeRO checkpoint written by 2 ranks; returns its trained weights, joined by
    DeepSpeed's own `zero_to_fp32` (what a user recovers from it without the run)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    manifest = read_manifest(checkpoint)
    assert (manifest["engine"], manifest["world_size"]) == ("deepspeed", 2)
    tag = (checkpoint / "latest").read_text().strip()
    assert tag == f"global_step{checkpoint.name.split('-')[-1]}"
    assert sorted(path.name for path in (checkpoint / tag).iterdir()) == [
        f"zero_pp_rank_{rank}_mp_rank_00_{part}_states.pt" for rank in (0, 1) for part in ("model", "optim")
    ]
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def test_full_fine_tuning_trains_partitioned_and_resumes(full_runs):
    runs, recorded = full_runs
    assert_trains(runs, "full")
    assert_partitioned(recorded, "full")
    assert_same(live(recorded, "full-resumed", STEPS), live(recorded, "full", STEPS), "resumed weights")


def test_full_fine_tuning_checkpoints_and_export_hold_the_gathered_weights(full_runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    runs, recorded = full_runs
    at_save, final = live(recorded, "full", SAVE_STEP), live(recorded, "full", STEPS)
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(not torch.equal(final[name], initial[name]) for name in initial)  # every tensor trained
    checkpoint = runs / "full" / f"checkpoint-{SAVE_STEP}"
    assert_same(assert_deepspeed_checkpoint(checkpoint), at_save, "checkpoint (zero_to_fp32)")
    # stage3_gather_16bit_weights_on_model_save: a loadable model next to the partitions.
    assert_same(load_file(str(checkpoint / "model.safetensors")), at_save, "checkpoint model.safetensors")
    exported = AutoModelForCausalLM.from_pretrained(str(runs / "full" / "model")).state_dict()
    assert_same(exported, final, "export")


def adapter_only(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in weights.items() if "lora_" in name}


def test_lora_trains_partitioned_and_resumes(lora_runs):
    runs, recorded = lora_runs
    assert_trains(runs, "lora")
    assert_partitioned(recorded, "lora")  # the adapters too
    assert_same(live(recorded, "lora-resumed", STEPS), live(recorded, "lora", STEPS), "resumed weights")


def test_lora_checkpoint_and_export_hold_the_gathered_adapters(lora_runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    runs, recorded = lora_runs
    at_save, final = live(recorded, "lora", SAVE_STEP), live(recorded, "lora", STEPS)
    assert all(value.abs().max() > 0 for name, value in final.items() if "lora_B" in name)  # B starts at 0
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    base = {name.removeprefix("base_model.model.").replace(".base_layer", ""): value
            for name, value in final.items() if "lora_" not in name}
    assert_same(base, initial, "frozen base")

    checkpoint = runs / "lora" / f"checkpoint-{SAVE_STEP}"
    assert_same(assert_deepspeed_checkpoint(checkpoint), adapter_only(at_save), "checkpoint (zero_to_fp32)")
    peft_names = {name.replace(".default", ""): value for name, value in adapter_only(at_save).items()}
    assert_same(load_file(str(checkpoint / "adapter_model.safetensors")), peft_names, "checkpoint adapter file")

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(runs / "lora" / "model"))
    assert_same(adapter_only(reloaded.state_dict()), adapter_only(final), "export")


def test_evaluation_before_training_packing_merge_and_a_full_dpo_reference_work_partitioned(tmp_path, tiny_model_dir):
    """Three runs that failed under ZeRO-3 while the plain full and LoRA runs passed: an eval set
    (the evaluation before `train()` left the model in an inference engine, so the first backward
    failed), packing (the attention isolation probe ran a forward pass on empty partitions),
    `method.merge` (every rank merged, loading the base partitioned) and full DPO (`deepcopy` of a
    partitioned model made a reference without weights)."""
    import yaml
    from transformers import AutoModelForCausalLM

    from tests.train.test_preference import preference_config

    evaluated = write_config(tmp_path, tiny_model_dir, "evaluated", method={"name": "full"}, distributed=ZERO3,
                             train={"report_to": "none"})
    settings = yaml.safe_load(evaluated.read_text())
    settings["data"].update(packing=True, eval_split=0.25)
    evaluated.write_text(yaml.safe_dump(settings), encoding="utf-8")
    merged = write_config(tmp_path, tiny_model_dir, "merged", method={"name": "lora", "r": 4, "merge": True},
                          distributed=ZERO3, train={"report_to": "none"})
    dpo_settings = preference_config(tmp_path / "dpo-data", tiny_model_dir, {"name": "dpo", "beta": 0.1}, STEPS,
                                     per_device_train_batch_size=4, logging_steps=1, report_to="none")
    dpo_settings["output"]["dir"] = str(tmp_path / "dpo")
    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(yaml.safe_dump({**dpo_settings, "distributed": ZERO3}), encoding="utf-8")
    recorded = tmp_path / "live"
    recorded.mkdir()
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(SUPPORT / "zero3_worker.py"), str(recorded), str(evaluated), str(merged), str(dpo)],
        check=False, env=dict(os.environ, PYTHONPATH=_worker_path(), DS_ACCELERATOR="cpu"),
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    summary = json.loads((tmp_path / "evaluated" / "summary.json").read_text())
    assert math.isfinite(summary["eval_loss_before"]) and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert "packed batches use attention implementation" in finished.stdout
    merged_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged" / "merged"))
    assert not any("lora_" in name for name in merged_model.state_dict())
    dpo_losses = losses(tmp_path / "dpo")
    assert len(dpo_losses) == STEPS and all(math.isfinite(loss) for loss in dpo_losses), dpo_losses
