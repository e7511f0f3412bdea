"""`tuneforge train CONFIG [section.key=value ...]`: fine-tune as a YAML file says."""

from __future__ import annotations

import argparse

HELP = "fine-tune a model as a YAML config says (overrides: section.key=value)"
EXAMPLE = "tuneforge train examples/quickstart.yaml train.learning_rate=1e-3 output.dir=runs/try2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")


def run(args: argparse.Namespace) -> int:
    from tuneforge.train.recipe import train

    train(args.config, overrides=args.overrides)
    return 0
