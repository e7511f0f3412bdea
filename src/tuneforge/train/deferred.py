"""A value the GPU computes, read on the host without waiting for the work queued after it.

    count = DeferredValue.of(batch["attention_mask"].sum())   # queued before the forward
    loss = model(**batch).loss; loss.backward()
    tokens = int(count.get())                                  # waits for the sum, not the backward

`tensor.item()` (and `bool(tensor)`) copies on the compute stream, so the host waits until the GPU
has run everything queued so far, and the GPU then has nothing queued until the host launches the
next kernels: a gap in every step that reads one. Here the value is copied to pinned host memory
right behind the kernel that computes it, with an event after the copy; `get` waits for that event
only. Off CUDA the tensor is kept as it is.
"""

from __future__ import annotations

import torch


class DeferredValue:
    """A tensor's (or a host number's) value, readable on the host once its copy has landed."""

    __slots__ = ("_copied", "_host")

    def __init__(self, host: torch.Tensor, copied: torch.cuda.Event | None) -> None:
        self._host, self._copied = host, copied

    @classmethod
    def of(cls, value: torch.Tensor | int | float) -> DeferredValue:
        if not isinstance(value, torch.Tensor):
            return cls(torch.tensor(value), None)
        value = value.detach()
        if value.device.type != "cuda":
            return cls(value, None)
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(host, copied)

    def get(self) -> torch.Tensor:
        """The value as a CPU tensor (waits for its copy only)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self._host


__all__ = ["DeferredValue"]
