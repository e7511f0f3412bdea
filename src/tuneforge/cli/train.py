"""`tuneforge train CONFIG [section.key=value ...]`: fine-tune as a YAML file says."""

from __future__ import annotations

import argparse
import sys

from tuneforge.cli.config_arguments import add_config_arguments

HELP = "fine-tune a model as a YAML config says (overrides: section.key=value)"
EXAMPLE = "tuneforge train examples/quickstart.yaml train.learning_rate=1e-3 output.dir=runs/try2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tuneforge import train
    from tuneforge.train.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted

    try:
        train(args.config, overrides=args.overrides)
    except TrainingPreempted as stopped:
        print(f"tuneforge: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0
