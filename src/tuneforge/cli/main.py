"""The `tuneforge` command: one verb per module in this package.

    tuneforge train examples/quickstart.yaml train.max_steps=50
    tuneforge generate runs/quickstart --prompt "Write forty two in digits."
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from typing import NoReturn

from tuneforge import __version__
from tuneforge.cli import (
    bench,
    chat,
    compare,
    data,
    export,
    generate,
    merge,
    plan,
    preprocess,
    report,
    train,
)
from tuneforge.cli import eval as eval_verb
from tuneforge.errors import TuneforgeError

# verb -> module with `add_arguments(parser)` and `run(args) -> int`; the modules call the library.
VERBS = {
    "plan": plan,
    "train": train,
    "preprocess": preprocess,
    "data": data,
    "generate": generate,
    "chat": chat,
    "compare": compare,
    "eval": eval_verb,
    "merge": merge,
    "export": export,
    "report": report,
    "bench": bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge",
        description="Fine-tune language models from one YAML file.",
        epilog="example:\n  tuneforge train examples/quickstart.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, module in VERBS.items():
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=f"example:\n  {module.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.basicConfig(level=logging.WARNING)
    else:
        logging.basicConfig(level=logging.INFO)
    try:
        return VERBS[args.verb].run(args)
    except TuneforgeError as exc:
        if args.debug:
            raise
        print(f"tuneforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130


def exit_process(code: int) -> NoReturn:
    """End the `tuneforge` process with `code`.

    A worker of a multi-process run (WORLD_SIZE > 1) skips the interpreter's teardown after
    running the exit hooks (wandb, MLflow): there torch's gloo process group is destroyed while
    its worker threads may still be releasing a finished collective's tensors, which needs the
    lock the destroying thread holds (seen in CI: a rank hung in ~ProcessGroupGloo after a clean
    stop), or aborts ("terminate called without an active exception"). By then the run has
    written, closed and fsynced everything it keeps.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def entry_point() -> NoReturn:
    """The `tuneforge` console script."""
    exit_process(main())


if __name__ == "__main__":
    entry_point()
