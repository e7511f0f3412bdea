"""Show what the model will be trained on: tokens with the untrained ones marked, and statistics.

    tuneforge data preview examples/quickstart.yaml --count 3
    tuneforge data preview examples/dpo_lora.yaml --count 3     # prompt, chosen and rejected
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.tokenize import IGNORE_INDEX

# ANSI: trained tokens green, untrained grey.
TRAINED_STYLE, MASKED_STYLE, RESET = "\033[32m", "\033[90m", "\033[0m"
MASK_OPEN, MASK_CLOSE = "«", "»"


def segments(input_ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of (trained?, token ids)."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs


def render_example(tokenizer: Any, input_ids: list[int], labels: list[int], *, color: bool) -> str:
    """The example's text with untrained spans greyed (terminal) or wrapped in «…» (otherwise)."""
    parts = []
    for trained, ids in segments(input_ids, labels):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if color:
            parts.append(f"{TRAINED_STYLE if trained else MASKED_STYLE}{text}{RESET}")
        else:
            parts.append(text if trained else f"{MASK_OPEN}{text}{MASK_CLOSE}")
    return "".join(parts)


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def render_preference_example(tokenizer: Any, index: int, row: dict[str, Any], *, color: bool) -> str:
    """A preference example: its prompt (never trained) above each reply (trained), one per line.

    Pairs show `chosen` and `rejected`, KTO examples their one reply and its label, GRPO prompts
    the prompt alone (the completions are generated in training) and the columns the reward
    functions receive.
    """
    prompt = row["prompt_ids"]
    if "chosen_ids" in row:
        replies = {"chosen": row["chosen_ids"], "rejected": row["rejected_ids"]}
        header = (
            f"pair {index}: prompt {len(prompt)} tokens, chosen {len(replies['chosen'])} and rejected "
            f"{len(replies['rejected'])} trained"
        )
    elif "completion_ids" in row:
        replies = {"reply": row["completion_ids"]}
        label = "desirable" if row["label"] else "undesirable"
        header = f"reply {index} ({label}): prompt {len(prompt)} tokens, reply {len(replies['reply'])} trained"
    else:
        replies = {}
        header = f"prompt {index}: {len(prompt)} tokens; the completions are generated in training"
    width = max(len(name) for name in ["prompt", *replies]) + 2
    lines = [f"--- {header}", f"{'prompt:':<{width}}{render_example(tokenizer, prompt, [IGNORE_INDEX] * len(prompt), color=color)}"]
    lines += [f"{name + ':':<{width}}{render_example(tokenizer, ids, ids, color=color)}" for name, ids in replies.items()]
    if not replies:
        columns = {name: value for name, value in row.items() if name not in ("prompt", "prompt_ids")}
        if columns:
            lines.append("for the rewards: " + ", ".join(f"{name}={_short(value)}" for name, value in columns.items()))
    return "\n".join(lines)


def length_histogram(lengths: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of sequence lengths."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for length in lengths:
        counts[min((length - low) // step, bins - 1)] += 1
    peak = max(counts)
    lines = []
    for index, count in enumerate(counts):
        start = low + index * step
        if start > high:
            break
        bar = "#" * max(1 if count else 0, round(width * count / peak))
        lines.append(f"  {start:>6}-{start + step - 1:<6} {count:>7}  {bar}")
    return lines


__all__ = ["length_histogram", "render_example", "render_preference_example", "segments"]
