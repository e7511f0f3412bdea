"""`tuneforge plan CONFIG [--gpus N] [--gpu-memory GiB]`: memory, FLOPs and time before launching."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from tuneforge.cli.config_arguments import add_config_arguments

HELP = "predict memory per GPU, FLOPs and training time for a config, without loading weights"
EXAMPLE = "tuneforge plan examples/quickstart.yaml --gpus 2 --gpu-memory 80"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tuneforge.plan.estimate import Strategy

    add_config_arguments(parser)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs training together (default 1)")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: this GPU's, else 80)")
    parser.add_argument("--strategy", choices=Strategy.NAMES, help="default: the distributed section's (or train.fsdp / train.deepspeed), else ddp")
    parser.add_argument("--peak-tflops", type=float, help="GPU bf16 peak (default: this GPU's datasheet peak, else an H100's 989)")
    parser.add_argument("--utilisation", type=float, default=0.4, help="model FLOPs utilisation the time estimate assumes (default 0.4)")
    parser.add_argument("--tokens", type=int, help="tokens in one epoch of the data (default: tokenise the config's data)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _epoch_tokens(config) -> int | None:
    """Tokens of one epoch of the training data, tokenised as training will (and cached)."""
    if config.data.streaming:
        return None
    from tuneforge.data.build import build_datasets
    from tuneforge.models.loading import load_tokenizer

    # The data pipeline reports on stdout; the plan (maybe JSON) must be all that is printed there.
    with contextlib.redirect_stdout(sys.stderr):
        datasets = build_datasets(
            config.data, load_tokenizer(config.model), seed=config.train.seed, batch_size=config.train.per_device_train_batch_size
        )
    return sum(stats.tokens for stats in datasets.stats if not stats.name.endswith("(eval)"))


def run(args: argparse.Namespace) -> int:
    from tuneforge.config.loading import load_config
    from tuneforge.plan.planner import PlanOptions, plan_config

    config = load_config(args.config, args.overrides)
    needs_tokens = args.tokens is None and not (config.train.max_steps and config.train.max_steps > 0)
    options = PlanOptions(
        gpus=args.gpus, gpu_memory_gib=args.gpu_memory, strategy=args.strategy, peak_tflops=args.peak_tflops,
        utilisation=args.utilisation, tokens=_epoch_tokens(config) if needs_tokens else args.tokens,
    )
    plan = plan_config(config, options)
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0 if plan.fits else 1
