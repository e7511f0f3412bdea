"""Pack examples into rows and flatten batches, padding-free, without cross-contamination.

    dataset, stats = build_packed_dataset(examples, max_length=1024)
    collator = PackedCollator()   # the Trainer's data_collator

A packed row holds several whole examples, at most `max_length` tokens, with `position_ids`
restarting at 0 for each example: that column is how every later stage finds the example
boundaries. Any other per-example list (an image example's `images`) is concatenated in the
same order as the tokens, so a row's images follow its image placeholders. The collator
flattens the rows of a batch into ONE sequence [1, total_tokens] with no padding, and adds the
varlen metadata (`cu_seq_lens_q/k`, `max_length_q/k`) that attention kernels use to keep
examples apart, and `use_cache=False` so that transformers' sdpa and eager masks keep them
apart too (see `tuneforge.models.attention`). For image rows, `ImageCollator` wraps it and adds
the pixels.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from transformers import DataCollatorWithFlattening

from tuneforge.data.tokenize import IGNORE_INDEX, Example, example_columns


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens (best-fit decreasing).

    Examples are placed longest first (ties by index), each into the open row with the least
    room that still fits it, else into a new row. The result depends only on the input.

    Args:
        lengths: token count of each example.
        max_length: row capacity in tokens.

    Returns:
        One list of example indices per row, rows in creation order, each row's indices in
        placement order (longest first).

    Raises:
        ValueError: an example is empty or longer than `max_length` (the length policy in
            preprocessing should have cut or dropped it).

    Example:
        >>> pack_examples([5, 3, 8, 2, 4], max_length=10)
        [[2, 3], [0, 4], [1]]
    """
    for index, length in enumerate(lengths):
        if not 0 < length <= max_length:
            raise ValueError(
                f"example {index} has {length} tokens; packing needs 1..max_length={max_length}"
            )
    groups: list[list[int]] = []
    # Rows by remaining room: a sorted list of the distinct room values (at most max_length + 1
    # of them, so insertion stays cheap) and, per value, a heap of the rows with that room.
    rooms: list[int] = []
    rows_by_room: dict[int, list[int]] = {}
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect.bisect_left(rooms, length)
        if slot < len(rooms):
            room = rooms[slot]
            rows = rows_by_room[room]
            row = heapq.heappop(rows)  # the oldest row with this room: deterministic
            if not rows:
                del rows_by_room[room]
                rooms.pop(slot)
        else:
            row, room = len(groups), max_length
            groups.append([])
        groups[row].append(index)
        left = room - length
        if left > 0:
            if left not in rows_by_room:
                bisect.insort(rooms, left)
                rows_by_room[left] = []
            heapq.heappush(rows_by_room[left], row)
    return groups


def packing_efficiency(lengths: Sequence[int], groups: Sequence[Sequence[int]], max_length: int) -> float:
    """Share of the row slots (`len(groups) * max_length`) that hold real tokens."""
    slots = len(groups) * max_length
    return sum(lengths[i] for group in groups for i in group) / slots if slots else 0.0


def padded_efficiency(lengths: Sequence[int], batch_size: int) -> float:
    """Share of real tokens when consecutive batches of `batch_size` are padded to their longest.

    This is the baseline packing is compared with (`DataCollatorForSeq2Seq(padding=True)`); pass
    the lengths in the order the sampler would see them.
    """
    padded = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        padded += len(batch) * max(batch)
    return sum(lengths) / padded if padded else 0.0


@dataclass(frozen=True)
class PackingStats:
    """What packing did; printed before training."""

    examples: int
    rows: int
    tokens: int
    max_length: int
    efficiency: float
    padded_efficiency: float
    baseline_batch_size: int

    def describe(self) -> str:
        return (
            f"packing: {self.examples} examples -> {self.rows} rows of <= {self.max_length} "
            f"tokens, {self.efficiency:.1%} of row slots hold real tokens (padding to the "
            f"longest in batches of {self.baseline_batch_size}: {self.padded_efficiency:.1%})"
        )


def build_packed_dataset(
    examples: Sequence[Example], max_length: int, *, baseline_batch_size: int = 8, seed: int = 0
) -> tuple[Dataset, PackingStats]:
    """Pack tokenised examples into a `Dataset` of rows for `PackedCollator`.

    Args:
        examples: tokenised examples, each at most `max_length` tokens.
        max_length: row capacity in tokens.
        baseline_batch_size: batch size of the padded baseline reported in the stats (use
            `per_device_train_batch_size`).
        seed: shuffles the lengths for the baseline, as a random sampler would.

    Returns:
        Rows with columns `input_ids`, `labels` (the examples' own labels), every other
        per-example list of the examples (`images`: paths in placeholder order), each the
        row's examples' values concatenated in the row's order, and `position_ids`
        (restarting at 0 per example); and the packing stats.

    Raises:
        ValueError: see `pack_examples`.
    """
    lengths = [len(example.input_ids) for example in examples]
    groups = pack_examples(lengths, max_length)
    columns = {
        name: [[value for i in group for value in values[i]] for group in groups]
        for name, values in example_columns(examples).items()
    }
    columns["position_ids"] = [[p for i in group for p in range(lengths[i])] for group in groups]
    shuffled = list(lengths)
    random.Random(seed).shuffle(shuffled)
    stats = PackingStats(
        examples=len(examples),
        rows=len(groups),
        tokens=sum(lengths),
        max_length=max_length,
        efficiency=packing_efficiency(lengths, groups, max_length),
        padded_efficiency=padded_efficiency(shuffled, baseline_batch_size),
        baseline_batch_size=baseline_batch_size,
    )
    return Dataset.from_dict(columns), stats


def split_packed_row(row: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The examples of one packed row, cut where `position_ids` restarts at 0.

    A row without `position_ids` (an unpacked dataset, e.g. for evaluation) is one example.
    """
    input_ids, labels = list(row["input_ids"]), list(row["labels"])
    positions = row.get("position_ids")
    if positions is None:
        return [{"input_ids": input_ids, "labels": labels}]
    starts = [i for i, position in enumerate(positions) if position == 0]
    if not starts or starts[0] != 0:
        raise ValueError("a packed row's position_ids must start at 0")
    ends = starts[1:] + [len(input_ids)]
    return [{"input_ids": input_ids[a:b], "labels": labels[a:b]} for a, b in zip(starts, ends)]


class PackedCollator:
    """Flatten a batch of packed rows into one padding-free sequence.

    The `per_device_train_batch_size` rows of a batch become ONE sequence of shape
    [1, total_tokens] (at most batch_size * max_length tokens), holding every example of every
    row. Returns `input_ids`, `labels` (each example's first label set to -100, so no token
    is trained to predict the next example), `position_ids` (0, 1, ... per example), and
    `cu_seq_lens_q/k` (int32 example offsets) and `max_length_q/k` (int), which transformers
    forwards to the attention function, and `use_cache=False`. There is no `attention_mask`
    and no padding.

    The flattening itself is transformers' `DataCollatorWithFlattening`; this class only cuts
    packed rows back into their examples first.
    """

    def __init__(self) -> None:
        self._flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=True
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [example for row in rows for example in split_packed_row(row)]
        batch = self._flatten(examples, return_tensors="pt")
        # transformers 5 builds the block-diagonal mask from packed position_ids only when
        # there is no KV cache, and its models create one whenever `use_cache` is on (the
        # config default, also in training): without this, sdpa and eager attend across
        # examples. A training batch has no use for a cache anyway.
        batch["use_cache"] = False
        return batch


__all__ = [
    "PackedCollator",
    "PackingStats",
    "build_packed_dataset",
    "pack_examples",
    "packing_efficiency",
    "padded_efficiency",
    "split_packed_row",
]
