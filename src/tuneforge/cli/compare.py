"""`tuneforge compare BASE TUNED [more...] --prompts FILE`: answers side by side, per prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuneforge.cli.generate import add_generation_arguments, generation_options

HELP = "answers of several models (runs, directories, hub ids) to the same prompts, side by side"
EXAMPLE = (
    "tuneforge compare runs/quickstart-short runs/quickstart --prompts examples/quickstart/heldout.jsonl "
    "--prompt-field question --reference-field answer --format markdown --output compare.md"
)
FORMATS = {".md": "markdown", ".json": "json"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", metavar="MODEL_OR_RUN", nargs="+", help="two or more runs, model directories or hub ids")
    parser.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                        help="text file (one prompt a line) or JSON/JSONL/CSV/Parquet rows")
    parser.add_argument("--prompt-field", default="prompt", help="data files: the prompt field (default prompt)")
    parser.add_argument("--reference-field", default=None,
                        help="data files: the reference answer field (default: 'reference' where present)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N prompts")
    parser.add_argument("--format", choices=["table", "markdown", "json"], default=None,
                        help="default: from the --output suffix (.md, .json), else table")
    parser.add_argument("--output", type=Path, default=None, metavar="FILE", help="write here instead of stdout")
    parser.add_argument("--raw", action="store_true", help="do not apply any prompt template")
    parser.add_argument("--system", help="system prompt (default: each run's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tuneforge.errors import ConfigError
    from tuneforge.infer.compare import compare_models, read_prompts

    if len(args.models) < 2:
        raise ConfigError("compare needs at least two models (e.g. BASE TUNED)", where="tuneforge compare")
    items = read_prompts(args.prompts, prompt_field=args.prompt_field, reference_field=args.reference_field)[: args.limit]
    comparison = compare_models(
        args.models, items, raw=args.raw, system_prompt=args.system, batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code, **generation_options(args),
    )
    fmt = args.format or (FORMATS.get(args.output.suffix, "table") if args.output else "table")
    text = comparison.render(fmt)
    if args.output is None:
        print(text, end="")
    else:
        args.output.write_text(text, encoding="utf-8")
        print(f"{len(items)} prompts x {len(args.models)} models written to {args.output} ({fmt})")
    return 0
