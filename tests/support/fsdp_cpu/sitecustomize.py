"""Test support only: let accelerate run FSDP on a CPU (gloo) process group.

accelerate 1.15's `AcceleratorState.__init__` turns a given `fsdp_plugin` into
`DistributedType.FSDP` only for GPU-like distributed types; for `MULTI_CPU` it drops the plugin
and the run trains unsharded (which tuneforge's `check_engine` refuses, for real users). PyTorch's
FSDP2 (`fully_shard`) itself works on gloo, so the CPU test of the FSDP path
(tests/train/test_fsdp_cpu.py) puts this folder first on the workers' PYTHONPATH; Python imports
`sitecustomize` at start-up, before tuneforge, and this one makes that one choice as accelerate
makes it on GPUs: same plugin, same mixed-precision hand-over.

Nothing in src/ imports this; it is active only in processes whose PYTHONPATH names this folder.
"""

import os

# Only torchrun's workers build an Accelerator; the launcher need not import accelerate.
if "LOCAL_RANK" in os.environ:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _accelerate_init = AcceleratorState.__init__

    def _init_with_fsdp_on_cpu(self, *args, **kwargs):
        _accelerate_init(self, *args, **kwargs)
        fsdp_plugin = kwargs.get("fsdp_plugin")
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What accelerate does for MULTI_GPU (state.py, the ACCELERATE_USE_FSDP branch).
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
