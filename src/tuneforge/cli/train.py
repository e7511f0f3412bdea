"""`tuneforge train CONFIG [section.key=value ...]`: fine-tune as a YAML file says.

With `--nproc-per-node N` the command starts N processes through torchrun (train/launch.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from tuneforge.cli.config_arguments import add_config_arguments

HELP = "fine-tune a model as a YAML config says (overrides: section.key=value)"
EXAMPLE = "tuneforge train examples/quickstart.yaml train.learning_rate=1e-3 output.dir=runs/try2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    launch = parser.add_argument_group("several processes (docs/distributed.md)")
    launch.add_argument(
        "--nproc-per-node", metavar="N",
        help="start N training processes on this node through torchrun (a number, or gpu / auto)",
    )
    launch.add_argument("--nnodes", type=int, help="number of nodes (default: from SLURM/PBS, else 1)")
    launch.add_argument("--node-rank", type=int, help="this node's rank, 0 on the first (default: from SLURM/PBS)")
    launch.add_argument("--master-addr", help="address of the node with rank 0 (default: from SLURM/PBS)")
    launch.add_argument("--master-port", type=int, help="a free port on that node (default: $MASTER_PORT or 29500)")


def run(args: argparse.Namespace) -> int:
    if args.nproc_per_node is not None:
        return _launch(args)
    if any(value is not None for value in (args.nnodes, args.node_rank, args.master_addr, args.master_port)):
        from tuneforge.errors import ConfigError

        raise ConfigError(
            "--nnodes, --node-rank, --master-addr and --master-port describe a launch",
            where="command line",
            hint="add --nproc-per-node N (processes on this node)",
        )
    from tuneforge import train
    from tuneforge.train.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted

    try:
        train(args.config, overrides=args.overrides)
    except TrainingPreempted as stopped:
        print(f"tuneforge: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def _launch(args: argparse.Namespace) -> int:
    from tuneforge.config.loading import load_config
    from tuneforge.train.launch import launch, resolve_rendezvous

    load_config(args.config, args.overrides)  # a config error shows once, before any process starts
    rendezvous = resolve_rendezvous(args.nnodes, args.node_rank, args.master_addr, args.master_port, os.environ)
    debug = ["--debug"] if args.debug else []
    return launch(args.nproc_per_node, rendezvous, ["tuneforge.cli.main", *debug, "train", args.config, *args.overrides])
