"""Test support only: let accelerate run DeepSpeed on a CPU (gloo) process group.

On GPUs transformers' `TrainingArguments._setup_devices` builds accelerate's `PartialState` in its
DeepSpeed branch, and accelerate 1.15 (`PartialState.__init__`, the `ACCELERATE_USE_DEEPSPEED`
branch, taken only when `not cpu`) starts DeepSpeed's comm (`deepspeed.comm.init_distributed`)
and marks the state `DistributedType.DEEPSPEED`. With `use_cpu` transformers takes its CPU branch
first (`PartialState(cpu=True)`), the group stays `MULTI_CPU` and DeepSpeed's comm is never
started: DeepSpeed then sees a world of 1, and `deepspeed.zero.Init`, which transformers runs
while loading the model, fails its batch check ("8 != 4 * 1 * 1").

DeepSpeed itself runs on gloo with `DS_ACCELERATOR=cpu`, so the CPU test of the ZeRO-3 path
(tests/train/test_zero3_cpu.py) puts this folder first on the workers' PYTHONPATH; Python imports
`sitecustomize` at start-up, before tuneforge, and this one makes, for arguments that carry a
DeepSpeed config, the choice accelerate makes on GPUs: DeepSpeed's comm on the existing process
group, and the state DeepSpeed. Everything after that (`deepspeed.zero.Init` at load, the
Trainer's `deepspeed.initialize`, its checkpoints and the gathered final save) is the real path.

Nothing in src/ imports this; it is active only in processes whose PYTHONPATH names this folder.
"""

import os

# Only torchrun's workers build TrainingArguments; the launcher need not import transformers.
if "LOCAL_RANK" in os.environ:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise look for CUDA

    from functools import cached_property

    from accelerate.utils import DistributedType
    from transformers import TrainingArguments

    _setup_devices = TrainingArguments.__dict__["_setup_devices"].func

    def _setup_devices_with_deepspeed_on_cpu(self):
        device = _setup_devices(self)
        state = self.distributed_state
        if self.deepspeed and state is not None and state.distributed_type == DistributedType.MULTI_CPU:
            # What accelerate does for GPUs (state.py, PartialState's ACCELERATE_USE_DEEPSPEED branch).
            import importlib

            from deepspeed import comm

            torch_comm = importlib.import_module("deepspeed.comm.torch")  # the attribute is torch itself

            # DeepSpeed's CPU all-reduce kernel is compiled (ninja, a C++ compiler, tens of seconds)
            # when its comm starts; only inference uses it, and GPUs never build it.
            torch_comm.build_shm_op = lambda: None
            if not comm.is_initialized():
                comm.init_distributed(dist_backend=state.backend, auto_mpi_discovery=False)
            state.distributed_type = DistributedType.DEEPSPEED  # the shared state: AcceleratorState sees it
        return device

    TrainingArguments._setup_devices = cached_property(_setup_devices_with_deepspeed_on_cpu)
    TrainingArguments._setup_devices.__set_name__(TrainingArguments, "_setup_devices")
