"""`tuneforge bench`: tuneforge against plain Hugging Face, TRL and Unsloth on the same GPU."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "benchmark training speed against plain Hugging Face, TRL and Unsloth on this GPU"
EXAMPLE = "tuneforge bench --data ../shared/data --cases lora8b,full1b --systems tuneforge,hf --output bench.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tuneforge.bench.cases import CASES

    parser.add_argument("--data", type=Path, required=True, help="folder holding lamini_docs/ (../shared/data)")
    parser.add_argument("--cases", default="lora8b,qlora8b,full1b,varlen8b", help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--systems", default="tuneforge,hf,trl,unsloth", help="comma-separated, of: tuneforge, hf, trl, unsloth; tuneforge+KEY=VALUE[+...] adds a tuneforge run with config overrides")
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="assets, rows, logs (weights are large)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--profile", action="store_true", help="also show where one tuneforge step's time goes (and write its timeline beside the results: *.trace.json.gz)")
    parser.add_argument("--peers-path", help="PYTHONPATH of an environment with Unsloth installed")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case and system")
    parser.add_argument("--parallel", type=int, default=1, help="one-GPU runs at a time, each on its own GPU (multi-GPU cases still run alone)")


def run(args: argparse.Namespace) -> int:
    from tuneforge.bench.runner import BenchOptions, run_bench

    results = run_bench(
        BenchOptions(
            cases=args.cases.split(","), systems=args.systems.split(","), data_dir=args.data, work=args.work,
            output=args.output, profile=args.profile, peers_path=args.peers_path, timeout_s=args.timeout,
            parallel=args.parallel,
        )
    )
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1
