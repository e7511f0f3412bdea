"""The size of a parameter, whichever engine holds it.

Under DeepSpeed ZeRO-3 a model is partitioned while it loads (`deepspeed.zero.Init`): each
parameter's own tensor is empty on every rank and its full size is kept in `ds_numel`. Counting
`numel()` there finds nothing to train and plans for no memory.
"""

from __future__ import annotations

import torch


def full_numel(parameter: torch.Tensor) -> int:
    """Values of the whole parameter (all shards). FSDP2's DTensors report it already."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """The whole parameter's shape; a ZeRO-3 partition keeps it in `ds_shape`."""
    return getattr(parameter, "ds_shape", None) or parameter.shape


def embedding_rows(model: torch.nn.Module) -> int:
    """Rows of the model's input embeddings (its vocabulary), whichever engine holds them."""
    return full_shape(model.get_input_embeddings().weight)[0]


__all__ = ["embedding_rows", "full_numel", "full_shape"]
