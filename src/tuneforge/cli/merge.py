"""`tuneforge merge RUN --out DIR`: fold a LoRA run's adapter into its base weights."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "merge a LoRA run's adapter into its base and write a standalone checkpoint"
EXAMPLE = "tuneforge merge runs/llama3-8b-lora --out exports/llama3-8b-merged --dtype bfloat16"


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Options `merge` and `export` share."""
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="new or empty output directory")
    parser.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
        help="dtype to save in, and to merge in for an adapter (default: the checkpoint's own)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument(
        "--max-logit-gap", type=float, default=None,
        help="refuse the result if its logits differ from the source's by more than this "
        "(default by dtype: float32 0.001, float16 0.1, bfloat16 0.5)",
    )
    parser.add_argument("--base", default=None, help="for an adapter: unquantized base weights to merge into "
                        "instead of the ones the run records")
    parser.add_argument("--trust-remote-code", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="LoRA run directory (or adapter directory)")
    add_checkpoint_arguments(parser)


def print_written(out_dir: Path) -> None:
    print(f"written to {out_dir}:")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path.name:<40} {path.stat().st_size:>14,} bytes")


def run(args: argparse.Namespace) -> int:
    from tuneforge.infer.merge import merge_run

    report = merge_run(
        args.run, args.out, dtype=args.dtype, max_logit_gap=args.max_logit_gap,
        max_shard_size=args.max_shard_size, base_model=args.base, trust_remote_code=args.trust_remote_code,
    )
    print_written(report.out_dir)
    print(f"max logit gap vs adapter-on-base: {report.max_logit_gap:.3g} (limit {report.threshold:.3g}, {report.dtype})")
    return 0
