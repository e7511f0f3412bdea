"""`tuneforge report RUN`: report.md, loss.png and summary.json for a run, finished or not."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write report.md, loss.png and summary.json for a run directory (also an interrupted run)"
EXAMPLE = "tuneforge report runs/quickstart"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory (holds metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    from tuneforge.train.summary import write_report

    report = write_report(args.run)
    print(f"report: {report} (plots: {args.run / 'loss.png'}, summary: {args.run / 'summary.json'})")
    return 0
