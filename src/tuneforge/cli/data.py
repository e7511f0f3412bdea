"""`tuneforge data preview CONFIG`: the tokenised examples (untrained tokens marked) and statistics.

Preference configs show their pairs (prompt, chosen, rejected), KTO replies or GRPO prompts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tuneforge.cli.config_arguments import add_config_arguments

HELP = "inspect the training data as tuneforge tokenises it (sub-command: preview)"
EXAMPLE = "tuneforge data preview examples/quickstart.yaml --count 3"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_verb", metavar="preview", required=True)
    preview = sub.add_parser("preview", help="print tokenised examples and statistics")
    add_config_arguments(preview)
    preview.add_argument("--count", type=int, default=3, help="examples to print")
    preview.add_argument(
        "--color", choices=["auto", "always", "never"], default="auto",
        help="colour trained tokens (auto: when writing to a terminal); otherwise untrained text is «marked»",
    )


def _supervised_example(tokenizer: Any, datasets: Any, index: int, row: dict[str, Any], color: bool) -> str:
    from tuneforge.data.images import collapse_image_tokens
    from tuneforge.data.preview import render_example

    input_ids, labels = row["input_ids"], row["labels"]
    trained = sum(label != -100 for label in labels)
    header = f"--- example {index}: {len(input_ids)} tokens, {trained} trained"
    if datasets.images is not None:
        # Each image's run of feature tokens is shown as one placeholder.
        input_ids, labels, counts = collapse_image_tokens(input_ids, labels, datasets.images)
        header += f", {counts}"
    return f"{header}\n{render_example(tokenizer, input_ids, labels, color=color)}"


def run(args: argparse.Namespace) -> int:
    from tuneforge.config.loading import load_config
    from tuneforge.config.schema import PreferenceMethod
    from tuneforge.data.preview import length_histogram, render_preference_example
    from tuneforge.data.run import build_run_datasets
    from tuneforge.models.loading import load_tokenizer

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.model)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    preference = isinstance(config.method, PreferenceMethod)
    datasets = build_run_datasets(config, tokenizer)
    train = datasets.train
    legend = "trained tokens in green, untrained in grey" if color else "untrained text is shown «like this»"
    print(f"template: {datasets.template.name if datasets.template else 'n/a'}; {legend}\n")
    for index in range(min(args.count, len(train))):
        row = train[index]
        if preference:
            print(render_preference_example(tokenizer, index, row, color=color))
        else:
            print(_supervised_example(tokenizer, datasets, index, row, color))
        print()
    print("--- statistics")
    for stats in datasets.stats:
        print(stats.describe())
    lengths = [length for stats in datasets.stats for length in stats.lengths]
    print(f"length histogram (tokens per example, max_length {config.data.max_length}):")
    print("\n".join(length_histogram(lengths)))
    if datasets.packing is not None:
        print(datasets.packing.describe())
    return 0
