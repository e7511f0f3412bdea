"""One torchrun worker of tests/train/test_fsdp_cpu.py: `tuneforge.train.train(CONFIG)` with a
callback that records what the sharded model really held.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/support/fsdp_worker.py CONFIG OUT

It runs the same `train()` that `tuneforge train` runs in each worker, plus `GatherLiveWeights`,
which needs the live model and so cannot be added from the command line. Written to OUT:

- `live-step-N.safetensors` (rank 0): every parameter, gathered in full from the shards with
  torch's own `get_model_state_dict(full_state_dict=True)` right after checkpoint N was saved
  and at the end of training (N = the last step): what each save must reload equal to.
- `sharding-rank-R.json`: for rank R during the first step, how many parameters were DTensors
  and how many values the rank held locally, against the model's full count.
- `returned-rank-R.json`: when `train()` returned on rank R.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback


class GatherLiveWeights(TrainerCallback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            parameters = list(model.parameters())
            record = {
                "parameters": len(parameters),
                "dtensor_parameters": sum(isinstance(p, DTensor) for p in parameters),
                "full_numel": sum(p.numel() for p in parameters),
                "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parameters),
            }
            path = self.out / f"sharding-rank-{torch.distributed.get_rank()}.json"
            path.write_text(json.dumps(record), encoding="utf-8")

    def on_save(self, args, state, control, model=None, **kwargs):
        self._gather(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._gather(model, state.global_step)

    def _gather(self, model, step: int) -> None:
        # A collective: every rank takes part, rank 0 receives the full tensors.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        if torch.distributed.get_rank() == 0:
            save_file({name: value.contiguous() for name, value in weights.items()},
                      str(self.out / f"live-step-{step}.safetensors"))


if __name__ == "__main__":
    from tuneforge.train import train

    from tuneforge.cli.main import exit_process

    config, out = sys.argv[1], Path(sys.argv[2])
    train(config, callbacks=[GatherLiveWeights(out)])
    (out / f"returned-rank-{torch.distributed.get_rank()}.json").write_text(json.dumps({"time": time.time()}))
    exit_process(0)  # as `tuneforge train` workers end: no interpreter teardown of the process group
