"""Several processes: the engine (DDP, FSDP2, DeepSpeed ZeRO) and what each rank may do.

tuneforge has no engine of its own. The `distributed` section becomes `TrainingArguments`
fields (`fsdp` + `fsdp_config` with `version: 2`, `deepspeed`, `ddp_timeout`, `bf16`/`fp16`),
transformers' Trainer hands them to accelerate, and accelerate wraps the model. Processes are
started by torchrun, `accelerate launch` or `tuneforge train --nproc-per-node` (`launch.py`),
which set `RANK`, `LOCAL_RANK` and `WORLD_SIZE`; those are read here before anything else
runs, so only rank 0 touches the run directory.

    ranks = Ranks.from_env()
    runtime = engine_arguments(config.distributed, ranks.world_size)
    ...
    check_engine(trainer, config.distributed, ranks.world_size)   # the engine really is on
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tuneforge.config.schema import DistributedConfig
from tuneforge.errors import ConfigError, ModelError
from tuneforge.models.parameters import full_shape
from tuneforge.train.checkpoints import read_manifest

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """What the launcher (torchrun, accelerate launch, tuneforge --nproc-per-node) set."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def die_with_launcher() -> None:
    """End this worker when the torchrun launcher that started it dies.

    torchrun starts each worker in a session of its own, so a SIGKILL of the launcher (`kill -9`
    of the job, the OOM killer) does not reach the workers: they train on, hold the GPUs, and
    keep writing and rotating checkpoints that a resumed run is reading. Linux's parent-death
    signal ends them with the launcher. Elsewhere, or outside torchrun, a no-op.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the signal was asked for
        os._exit(1)


def start_process_group(section: DistributedConfig, ranks: Ranks) -> None:
    """Join the other ranks, with `distributed.timeout_minutes` on every collective.

    Started here rather than by `TrainingArguments`: transformers passes `ddp_timeout` on to
    accelerate only for GPU runs (with `use_cpu` the default 30 minutes stays), and the run
    directory needs a barrier before the Trainer exists. accelerate adopts the existing group.
    It is not destroyed when the run ends: see `tuneforge.cli.main.exit_process` for why a
    worker process ends without tearing it down.
    """
    if ranks.world_size == 1 or torch.distributed.is_initialized():
        return
    die_with_launcher()
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)  # NCCL binds each rank to its own GPU
    torch.distributed.init_process_group(timeout=timedelta(minutes=section.timeout_minutes))


def barrier() -> None:
    """Wait for every rank; a no-op in a single process. Only for short waits: it counts
    against `distributed.timeout_minutes` (long ones use a file barrier, see data/cache.py)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def deepspeed_config(section: DistributedConfig) -> dict[str, Any]:
    """The DeepSpeed JSON as a dict: the user's file, or the shipped `zero<stage>.json` with offload."""
    if section.deepspeed_config is not None:
        path = Path(section.deepspeed_config)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(
                f"cannot read the DeepSpeed config: {error.strerror or error}",
                where=f"distributed.deepspeed_config={path}",
                hint=f"give a JSON file, or leave it unset to use the shipped ones in {DEEPSPEED_DIR}",
            ) from None
        except ValueError as error:
            raise ConfigError(
                f"the DeepSpeed config is not valid JSON: {error}", where=f"distributed.deepspeed_config={path}"
            ) from None
    config = json.loads((DEEPSPEED_DIR / f"zero{section.zero_stage}.json").read_text(encoding="utf-8"))
    zero = config["zero_optimization"]
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # ZeRO-Offload steps on the CPU: DeepSpeed's own CPU Adam, not torch's (which it refuses there).
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if section.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


def engine_arguments(section: DistributedConfig, world_size: int) -> dict[str, Any]:
    """`TrainingArguments` values for the engine; the user's own `train.*` values win over them."""
    values: dict[str, Any] = {"ddp_timeout": round(section.timeout_minutes * 60)}
    if section.mixed_precision in ("bf16", "fp16"):
        values[section.mixed_precision] = True
    if section.strategy == "deepspeed":
        values["deepspeed"] = deepspeed_config(section)
    elif section.strategy == "fsdp" and world_size > 1:
        values["fsdp"] = True
        values["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": section.reshard_after_forward,
            "cpu_offload": section.offload_params,
            "state_dict_type": "SHARDED_STATE_DICT" if section.checkpoint == "sharded" else "FULL_STATE_DICT",
        }
    return values


def check_engine(trainer: Any, section: DistributedConfig, world_size: int) -> None:
    """Fail when the engine asked for is not what accelerate set up.

    accelerate enables FSDP only for GPU-type process groups: on CPU (gloo) it drops the plugin
    and the run would silently train as DDP, every rank holding the whole model.
    """
    if section.strategy == "fsdp" and world_size > 1 and not trainer.is_fsdp_enabled:
        raise ConfigError(
            f"FSDP is not available on this {trainer.args.device.type} process group: accelerate enables it "
            "on GPUs only, and the run would otherwise train unsharded",
            where="distributed.strategy=fsdp",
            hint="run on GPUs, or use distributed.strategy: ddp on CPU",
        )
    if section.strategy == "deepspeed" and not trainer.is_deepspeed_enabled:
        raise ConfigError(
            "DeepSpeed was asked for but accelerate did not enable it",
            where="distributed.strategy=deepspeed",
            hint="pip install deepspeed, and start the run with a launcher (tuneforge train --nproc-per-node N)",
        )


def use_full_state_dict(trainer: Any) -> None:
    """Make `trainer.save_model` gather FSDP weights into one state dict on rank 0.

    With sharded checkpoints transformers' `save_model` writes nothing under FSDP; the final
    export must be a standard Hugging Face checkpoint, so switch before saving it.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")


def skip_unused_parameter_search(args: Any, model: Any, section: DistributedConfig, world_size: int) -> None:
    """Turn off DDP's search for parameters that got no gradient, where every trained parameter
    gets one at every step.

    The Trainer turns the search on whenever gradient checkpointing is off; it walks the autograd
    graph after every forward pass. Models where a step can leave trained parameters unused keep
    it: mixture-of-experts (an expert that got no token) and vision-language models (a text-only
    batch skips the vision tower). A `train.ddp_find_unused_parameters` the user set wins.
    """
    if section.strategy != "ddp" or world_size < 2 or args.ddp_find_unused_parameters is not None:
        return
    config = getattr(model, "config", None)
    experts = any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))
    if not experts and getattr(config, "vision_config", None) is None:
        args.ddp_find_unused_parameters = False


def keep_gradients_in_buckets(trainer: Any, section: DistributedConfig, world_size: int) -> None:
    """DDP: make each gradient a view into the all-reduce bucket that carries it (PyTorch's
    `gradient_as_bucket_view`), instead of a second copy the buckets copy from and back.

    One copy of the gradients per GPU instead of two, and no copy each step: 2.5 GB for full
    fine-tuning of a 1B model in bf16, 16 GB for an 8B one. The Trainer has no argument for
    it, so the flag goes on the DDP settings accelerate keeps until it wraps the model.
    """
    if section.strategy != "ddp" or world_size < 2 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = trainer.accelerator
    if accelerator.ddp_handler is None:
        accelerator.ddp_handler = DistributedDataParallelKwargs()
    accelerator.ddp_handler.gradient_as_bucket_view = True


def export_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The name and full shape of each tensor the final save must hold, read from the live model.

    Read from metadata, without gathering: an FSDP2 parameter (a DTensor) reports its full shape
    and a DeepSpeed ZeRO-3 one keeps it in `ds_shape`, whatever slice this rank holds. For a peft
    model, peft's own selection and names: those its `save_pretrained` writes.
    """
    shapes = {
        name: torch.empty(full_shape(parameter), device="meta")
        for name, parameter in model.named_parameters()
    }
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        # Without the embeddings peft may add when the vocabulary grew: finding that out can ask
        # the Hub for the base's config, and the adapter's own tensors are what a gather can break.
        shapes = get_peft_model_state_dict(model, state_dict=shapes, save_embedding_layers=False)
    return {name: tuple(value.shape) for name, value in shapes.items()}


def verify_export(model_dir: Path, expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Every saved tensor holds all its values (PITFALLS 14).

    A ZeRO-3/FSDP save that missed the gather writes placeholder tensors of size 0, or no weights
    at all; one that gathered badly writes one rank's slice (accelerate PR#4206: rank 0's part of
    each adapter tensor), which has values but the wrong shape. `expected` (`export_shapes` of the
    trained model) catches that: a saved tensor of another shape fails, and so does an adapter
    tensor that is missing. A full model's file is checked only where names match, because
    transformers may rename or split tensors on save (tied weights, converted layouts).

    Raises:
        ModelError: naming the first empty, partial or missing tensor, or saying no weights were written.
    """
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(
            "the final save wrote no safetensors weights",
            where=str(model_dir),
            hint="with your own DeepSpeed ZeRO-3 config set zero_optimization.stage3_gather_16bit_weights_on_model_save: true",
        )
    retry = "resume from the newest checkpoint and save again; report the engine and versions"
    saved = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 -- a safe_open handle is not iterable
                shape = tuple(handle.get_slice(name).get_shape())
                saved.add(name)
                if math.prod(shape) == 0:
                    raise ModelError(
                        f"the saved tensor '{name}' in {file.name} is empty: the weights were not gathered from the shards",
                        where=str(model_dir),
                        hint=retry,
                    )
                if expected is not None and name in expected and shape != expected[name]:
                    raise ModelError(
                        f"the saved tensor '{name}' in {file.name} has shape {list(shape)}, the trained one "
                        f"{list(expected[name])}: only part of it was gathered from the shards",
                        where=str(model_dir),
                        hint=retry,
                    )
    if expected is not None and (model_dir / "adapter_config.json").is_file():
        missing = sorted(set(expected) - saved)
        if missing:
            raise ModelError(
                f"the saved adapter lacks {len(missing)} trained tensors, first '{missing[0]}'",
                where=str(model_dir),
                hint=retry,
            )


def planned_engine(section: DistributedConfig, world_size: int) -> str:
    """The engine `engine_arguments` asks for: FSDP needs more than one process to shard over."""
    if section.strategy == "fsdp" and world_size == 1:
        return "ddp"
    return section.strategy


def checkpoint_layout(section: DistributedConfig, world_size: int) -> dict[str, Any]:
    """Recorded in each checkpoint's manifest, so a resume on another process count can be checked."""
    return {"world_size": world_size, "engine": planned_engine(section, world_size)}


def check_resume_layout(checkpoint: str, section: DistributedConfig, world_size: int) -> None:
    """Whether this launch can resume `checkpoint` (its manifest says who wrote it).

    DDP checkpoints hold whole weights and optimizer state; FSDP2's sharded checkpoints are
    PyTorch distributed checkpoints, which reshard on load. DeepSpeed ZeRO partitions are tied
    to the data-parallel size they were written with.

    Raises:
        ConfigError: the engine differs, or DeepSpeed is resumed on another number of processes.
    """
    saved = read_manifest(checkpoint)
    engine = planned_engine(section, world_size)
    saved_engine, saved_size = saved.get("engine", "ddp"), saved.get("world_size", 1)
    if saved_engine != engine:
        raise ConfigError(
            f"the checkpoint was written by {saved_engine} ({saved_size} processes), this run uses {engine} "
            f"({world_size} processes); their checkpoint files differ",
            where=f"output.resume ({checkpoint})",
            hint="resume with the strategy that wrote it, or start from the run's exported model/",
        )
    if engine == "deepspeed" and saved_size != world_size:
        raise ConfigError(
            f"a DeepSpeed ZeRO checkpoint written by {saved_size} processes cannot be resumed on {world_size}: "
            "its optimizer partitions belong to the original data-parallel size",
            where=f"output.resume ({checkpoint})",
            hint=f"launch {saved_size} processes again, or convert it with DeepSpeed's ds_to_universal.py "
            "and resume from the universal checkpoint (distributed.deepspeed_config with "
            '"checkpoint": {"load_universal": true})',
        )


__all__ = [
    "Ranks",
    "barrier",
    "check_engine",
    "check_resume_layout",
    "checkpoint_layout",
    "deepspeed_config",
    "die_with_launcher",
    "engine_arguments",
    "export_shapes",
    "keep_gradients_in_buckets",
    "planned_engine",
    "skip_unused_parameter_search",
    "start_process_group",
    "use_full_state_dict",
    "verify_export",
]
