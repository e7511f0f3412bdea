"""One torchrun worker of tests/train/test_zero3_cpu.py: `tuneforge.train(CONFIG)` for each
config given, with a callback that records what the partitioned model really held.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/support/zero3_worker.py OUT CONFIG...

It runs the same `train()` that `tuneforge train` runs in each worker, plus `GatherLiveWeights`,
which needs the live model and so cannot be added from the command line. Several configs (a run,
then its resume) train one after the other in the same two processes, which saves a start-up;
`train()` starts the process group only once. Written to OUT, per config named NAME:

- `NAME-live-step-N.safetensors` (rank 0): every parameter, gathered in full from the partitions
  with DeepSpeed's own `zero.GatheredParameters` right after checkpoint N was saved and at the
  end of training (N = the last step): what each save must reload equal to.
- `NAME-sharding-rank-R.json`: for rank R after the first step, how many parameters were ZeRO-3
  parameters, their full size (`ds_numel`), the values rank R held (`ds_tensor`), and the size of
  the parameters' own tensors (empty while partitioned, but for the small ones DeepSpeed keeps
  whole on every rank: `persistent_numel`, `largest_persistent`).
- `NAME-returned-rank-R.json`: when `train()` returned on rank R.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback


class GatherLiveWeights(TrainerCallback):
    def __init__(self, out: Path, name: str) -> None:
        self.out = out
        self.name = name

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            parameters = list(model.parameters())
            partitioned = [p for p in parameters if hasattr(p, "ds_id")]
            record = {
                "parameters": len(parameters),
                "zero3_parameters": len(partitioned),
                "full_numel": sum(p.ds_numel for p in partitioned),
                "local_numel": sum(p.ds_tensor.numel() for p in partitioned),
                "own_numel": sum(p.numel() for p in parameters),
                # Small parameters DeepSpeed keeps whole on every rank (stage3_param_persistence_threshold).
                "persistent_numel": sum(p.ds_numel for p in partitioned if p.ds_persist),
                "largest_persistent": max((p.ds_numel for p in partitioned if p.ds_persist), default=0),
            }
            path = self.out / f"{self.name}-sharding-rank-{torch.distributed.get_rank()}.json"
            path.write_text(json.dumps(record), encoding="utf-8")

    def on_save(self, args, state, control, model=None, **kwargs):
        self._gather(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._gather(model, state.global_step)

    def _gather(self, model, step: int) -> None:
        import deepspeed

        named = list(model.named_parameters())
        # A collective: every rank gathers every parameter, rank 0 writes them.
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if torch.distributed.get_rank() == 0:
                weights = {name: p.detach().clone().contiguous() for name, p in named}
                save_file(weights, str(self.out / f"{self.name}-live-step-{step}.safetensors"))


if __name__ == "__main__":
    from tuneforge.cli.main import exit_process
    from tuneforge import train  # what `tuneforge train` runs: the recipe, then merge if asked

    out, configs = Path(sys.argv[1]), sys.argv[2:]
    for config in configs:
        name = Path(config).stem
        train(config, callbacks=[GatherLiveWeights(out, name)])
        (out / f"{name}-returned-rank-{torch.distributed.get_rank()}.json").write_text(json.dumps({"time": time.time()}))
    exit_process(0)  # as `tuneforge train` workers end: no interpreter teardown of the process group
