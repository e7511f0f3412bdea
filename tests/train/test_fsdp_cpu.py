"""FSDP2 through tuneforge's real path on 2 CPU processes (PITFALLS 14; freeze and LoRA under FSDP).

Each run is `tuneforge.train.train` in two gloo workers started by torchrun with
`distributed.strategy: fsdp`: transformers' Trainer, accelerate's FSDP2 (`fully_shard`),
tuneforge's atomic checkpoints, final save and `verify_export`. Two test-only pieces, both in
tests/support/:

- `fsdp_cpu/sitecustomize.py`, first on the workers' PYTHONPATH: accelerate enables FSDP for GPU
  process groups only (tuneforge refuses FSDP on CPU for real users, see test_distributed.py); the
  shim lets it choose FSDP for the CPU group as it does for GPUs.
- `fsdp_worker.py`, each worker's entry point: `train(CONFIG)` plus a callback that gathers the
  live weights in full from the shards (torch's `get_model_state_dict(full_state_dict=True)`) at
  each save and at the end of training, and records what each rank held during step 1.

Per method, the weights were really sharded (every parameter a DTensor, each rank holding about
half the values), and the saves reload equal to the gathered live weights: the mid-run checkpoint
(a sharded distributed checkpoint, or for LoRA with `checkpoint: full` accelerate's gathered
adapter, the case of accelerate PR#4206) and the final export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tuneforge
from tests.train.test_distributed import STEPS, write_config
from tuneforge.errors import ModelError
from tuneforge.train.distributed import export_shapes, verify_export

SUPPORT = Path(__file__).resolve().parents[1] / "support"
SAVE_STEP = 2  # the mid-run checkpoint; the run ends at STEPS (4), which saves too


def _fsdp_on_cpu_missing() -> str | None:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return "needs torch.distributed with the gloo backend"
    try:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return f"needs PyTorch's FSDP2 and distributed checkpoints ({error})"
    return None


MISSING = _fsdp_on_cpu_missing()
needs_fsdp_on_cpu = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def fsdp_run(tmp_path: Path, model_dir: Path, name: str, method: dict, distributed: dict | None = None) -> tuple[Path, Path]:
    """Train 4 steps on 2 sharded ranks, saving at steps 2 and 4; returns the run directory and
    the folder holding what the workers' callback recorded."""
    config = write_config(
        tmp_path, model_dir, name, method=method, distributed={"strategy": "fsdp", **(distributed or {})},
        train={"save_strategy": "steps", "save_steps": SAVE_STEP, "report_to": "none"},
    )
    recorded = tmp_path / f"{name}-live"
    recorded.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SUPPORT / "fsdp_cpu"), str(Path(tuneforge.__file__).parents[1])]
    ))
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(SUPPORT / "fsdp_worker.py"), str(config), str(recorded)],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    # The lines naming an error or a native abort, then the end of the log: a rank that dies can
    # otherwise be hidden behind the other rank's "connection reset by peer".
    lines = (finished.stdout + finished.stderr).splitlines()
    causes = [line for line in lines if any(mark in line for mark in ("Error", "terminate called", "what():", "exitcode"))]
    assert finished.returncode == 0, "\n".join(causes[-40:]) + "\n...\n" + finished.stdout[-3000:] + finished.stderr[-3000:]
    return tmp_path / name, recorded


def assert_sharded(recorded: Path) -> None:
    """Every parameter was a DTensor and each rank held about half the values: not a DDP run."""
    ranks = [json.loads((recorded / f"sharding-rank-{rank}.json").read_text()) for rank in (0, 1)]
    for held in ranks:
        assert held["dtensor_parameters"] == held["parameters"] > 0, held
        assert held["local_numel"] < 0.6 * held["full_numel"], held
    assert sum(held["local_numel"] for held in ranks) == ranks[0]["full_numel"]


def live(recorded: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(recorded / f"live-step-{step}.safetensors"))


def assert_same(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(saved) == sorted(expected), what
    for name, value in expected.items():
        assert saved[name].shape == value.shape and torch.equal(saved[name], value), f"{what}: {name}"


def sharded_checkpoint(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The weights of an FSDP sharded checkpoint (one distributed-checkpoint file per rank), joined
    into whole tensors in this single process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    shards = checkpoint / "pytorch_model_fsdp_0"
    assert sorted(path.name for path in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    joined = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(shards, joined)
    return torch.load(joined)["model"]


def assert_fsdp_manifest(checkpoint: Path) -> None:
    manifest = json.loads((checkpoint / "tuneforge_checkpoint.json").read_text())
    assert (manifest["engine"], manifest["world_size"]) == ("fsdp", 2)


@needs_fsdp_on_cpu
def test_full_fine_tuning_is_sharded_and_its_checkpoint_and_export_equal_the_gathered_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run, recorded = fsdp_run(tmp_path, tiny_model_dir, "full", {"name": "full"})
    assert_sharded(recorded)
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    final = live(recorded, STEPS)
    assert all(not torch.equal(final[name], initial[name]) for name in initial)  # every tensor trained
    assert any(not torch.equal(live(recorded, SAVE_STEP)[name], final[name]) for name in final)

    assert_fsdp_manifest(run / f"checkpoint-{SAVE_STEP}")
    assert_same(sharded_checkpoint(run / f"checkpoint-{SAVE_STEP}", tmp_path), live(recorded, SAVE_STEP), "checkpoint")
    assert_same(sharded_checkpoint(run / f"checkpoint-{STEPS}", tmp_path), final, "last checkpoint")
    exported = AutoModelForCausalLM.from_pretrained(str(run / "model")).state_dict()
    assert_same(exported, final, "export")
    # No rank left train() while rank 0 still wrote the export: a rank that exits with its part
    # of the (asynchronous, on NCCL) final gather in flight leaves rank 0 waiting for ever.
    written = max(path.stat().st_mtime for path in (run / "model").iterdir())
    returned = json.loads((recorded / "returned-rank-1.json").read_text())["time"]
    assert returned >= written


@needs_fsdp_on_cpu
def test_freeze_under_fsdp_trains_only_the_chosen_layer_and_saves_whole_weights(tmp_path, tiny_model_dir):
    run, recorded = fsdp_run(tmp_path, tiny_model_dir, "freeze", {"name": "freeze", "last_layers": 1})
    assert_sharded(recorded)  # frozen and trained parameters are sharded alike
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    final = live(recorded, STEPS)
    trained = {name for name in initial if not torch.equal(final[name], initial[name])}
    assert trained == {name for name in initial if name.startswith("model.layers.1.")}

    assert_same(sharded_checkpoint(run / f"checkpoint-{SAVE_STEP}", tmp_path), live(recorded, SAVE_STEP), "checkpoint")
    assert_same(load_file(str(run / "model" / "model.safetensors")), final, "export")


def adapter_only(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in weights.items() if "lora_" in name}


@needs_fsdp_on_cpu
def test_lora_under_fsdp_saves_every_ranks_slice_of_each_adapter_tensor(tmp_path, tiny_model_dir):
    """`checkpoint: full` is where accelerate once saved only rank 0's slice of each adapter tensor
    (PR#4206): the checkpoint and the export must hold the whole adapters, and no base weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, recorded = fsdp_run(tmp_path, tiny_model_dir, "lora", {"name": "lora", "r": 4}, distributed={"checkpoint": "full"})
    assert_sharded(recorded)  # the adapters too: each holds half of every A and B
    final, at_save = live(recorded, STEPS), live(recorded, SAVE_STEP)
    assert all(value.abs().max() > 0 for name, value in final.items() if "lora_B" in name)  # B starts at 0
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    base = {name.removeprefix("base_model.model.").replace(".base_layer", ""): value
            for name, value in final.items() if "lora_" not in name}
    assert_same(base, initial, "frozen base")

    # The checkpoint: accelerate's gathered adapter (no base weights: PITFALLS 15) and the
    # adapter file transformers writes next to it, in peft's names (without the adapter's name).
    checkpoint = run / f"checkpoint-{SAVE_STEP}"
    assert_fsdp_manifest(checkpoint)
    assert_same(torch.load(checkpoint / "pytorch_model_fsdp.bin"), adapter_only(at_save), "checkpoint")
    peft_names = {name.replace(".default", ""): value for name, value in adapter_only(at_save).items()}
    assert_same(load_file(str(checkpoint / "adapter_model.safetensors")), peft_names, "checkpoint adapter file")

    # The export, loaded by peft onto the base.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(run / "model"))
    assert_same(adapter_only(reloaded.state_dict()), adapter_only(final), "export")


def test_an_export_holding_part_of_a_tensor_or_lacking_an_adapter_tensor_fails_verification(tmp_path, tiny_model_dir):
    """A gather that kept one rank's slice writes tensors with values but the wrong shape (accelerate
    PR#4206); verification compares the saved shapes with the trained model's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    full = tmp_path / "full"
    model.save_pretrained(str(full))
    verify_export(full, export_shapes(model))
    weights = load_file(str(full / "model.safetensors"))
    save_file({**weights, "lm_head.weight": weights["lm_head.weight"][: len(weights["lm_head.weight"]) // 2]},
              str(full / "model.safetensors"))
    verify_export(full)  # without the model's shapes only emptiness is checked
    with pytest.raises(ModelError, match=r"'lm_head.weight' in model.safetensors has shape \[\d+, 32\], the trained one"):
        verify_export(full, export_shapes(model))

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    expected = export_shapes(peft_model)
    assert expected["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 32)
    assert len(expected) == 2 * 2 * 2  # two layers x two modules x A and B: no base weights
    verify_export(adapter, expected)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({name: value for name, value in saved.items() if name != dropped}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match=f"lacks 1 trained tensors, first '{dropped}'"):
        verify_export(adapter, expected)
