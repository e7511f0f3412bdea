"""`tuneforge eval MODEL_OR_RUN --data FILE`: loss, multiple-choice accuracy, QA exact match / F1.

The dataset options are those of a `data.datasets` entry; the tasks are the config's
`eval.tasks` entries, so this runs exactly what evaluation during training runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "evaluate a run or model on a dataset: loss/perplexity, multiple-choice accuracy, QA exact match and F1"
EXAMPLE = (
    "tuneforge eval runs/quickstart --data examples/quickstart/heldout.jsonl --prompt-fields question "
    "--response-field answer --task loss --task qa --output eval.json"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_RUN", help="run directory, model directory or hub id")
    parser.add_argument("--data", required=True, help="data file, directory, glob or hf:NAME (as data.datasets[].path)")
    parser.add_argument("--task", action="append", choices=["loss", "multiple_choice", "qa"],
                        help="repeatable; default: multiple_choice for --format multiple_choice, else loss")
    parser.add_argument("--format", choices=["instruction", "chat", "multiple_choice", "text"], default=None,
                        help="data format (default: multiple_choice for a multiple_choice task, else instruction)")
    parser.add_argument("--prompt-fields", nargs="+", default=None, help="fields joined into the prompt / question")
    parser.add_argument("--response-field", default=None, help="instruction data: the response field")
    parser.add_argument("--template", default=None, help="prompt template (default: the run's)")
    parser.add_argument("--max-rows", type=int, default=None, help="use only the first N rows")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other dataset option, e.g. --set choices_field=options --set label_field=answer")
    parser.add_argument("--normalize", choices=["none", "tokens", "chars"], default="tokens",
                        help="multiple choice: divide a choice's log-likelihood by its tokens or characters (default tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="qa: generation length limit")
    parser.add_argument("--max-length", type=int, default=1024, help="loss: longest sequence in tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=None, metavar="FILE", help="also write the results (and each answer) as JSON")
    parser.add_argument("--trust-remote-code", action="store_true")


def tasks_from_arguments(args: argparse.Namespace) -> list[Any]:
    """`EvalTask`s from the command line, validated as config entries are."""
    from tuneforge.config.loading import apply_override, parse_override
    from tuneforge.infer.evaluate import eval_task

    types = args.task or (["multiple_choice"] if args.format == "multiple_choice" else ["loss"])
    data: dict[str, Any] = {"path": args.data}
    given = {"format": args.format, "prompt_fields": args.prompt_fields, "response_field": args.response_field,
             "template": args.template, "max_rows": args.max_rows}
    data.update({key: value for key, value in given.items() if value is not None})
    for text in args.set:
        apply_override(data, *parse_override(text), text)
    settings = {"normalize": args.normalize, "max_new_tokens": args.max_new_tokens,
                "max_length": args.max_length, "batch_size": args.batch_size}
    return [eval_task(kind, data, where="tuneforge eval", **settings) for kind in types]


def run(args: argparse.Namespace) -> int:
    from tuneforge.infer.evaluate import format_results, run_task
    from tuneforge.infer.generate import load_for_inference

    tasks = tasks_from_arguments(args)
    loaded = load_for_inference(args.model, trust_remote_code=args.trust_remote_code)
    results = [run_task(loaded, task) for task in tasks]
    print(f"{args.model} on {args.data}:")
    print(format_results(results), end="")
    if args.output is not None:
        report = {"model": args.model, "tasks": [result.to_dict() for result in results]}
        args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"results written to {args.output}")
    return 0
