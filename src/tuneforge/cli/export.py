"""`tuneforge export MODEL_OR_RUN --out DIR`: a self-contained Hugging Face checkpoint."""

from __future__ import annotations

import argparse

from tuneforge.cli.merge import add_checkpoint_arguments, print_written

HELP = "write a standalone checkpoint (safetensors, tokenizer, template, generation config) of a run or model"
EXAMPLE = "tuneforge export runs/pythia-lamini --out exports/pythia-lamini --max-shard-size 2GB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_RUN", help="run directory, model directory (e.g. RUN/merged) or hub id")
    add_checkpoint_arguments(parser)
    # Kept for the familiar flag: pickle (.bin) weights are never written.
    parser.add_argument("--safe-serialization", choices=["always"], default="always",
                        help="weights are always safetensors; pickle is never written")


def run(args: argparse.Namespace) -> int:
    from tuneforge.infer.export import export_model

    out_dir = export_model(
        args.model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
        max_logit_gap=args.max_logit_gap, base_model=args.base, trust_remote_code=args.trust_remote_code,
    )
    print_written(out_dir)
    return 0
