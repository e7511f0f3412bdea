"""`tuneforge generate MODEL_OR_RUN --prompt TEXT`: continue prompts with a trained model.

One prompt streams to the terminal as it is generated; a file of prompts (or stdin) is
generated in batches of `--batch-size`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HELP = "generate from a run directory, a saved model, or a hub id"
EXAMPLE = 'tuneforge generate runs/quickstart --prompt "Write forty two in digits."'


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Sampling options shared by `generate`, `chat` and `compare`."""
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--trust-remote-code", action="store_true")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options as `generate_texts` keywords; seeds the RNGs from `--seed`."""
    import transformers

    transformers.set_seed(args.seed)
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_RUN", help="run directory, model directory or hub id")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--raw", action="store_true", help="do not apply the run's prompt template")
    parser.add_argument("--system", help="system prompt (default: the one the run was trained with)")
    parser.add_argument("--image", type=Path, action="append", help="an image for a vision-language model "
                        "(repeat for several); every prompt sees them, at its <image> placeholders or first")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--no-stream", action="store_true", help="print a single prompt's answer at the end "
                        "instead of as it is generated")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from tuneforge.infer.generate import generate, load_for_inference

    if args.prompt:
        prompts = args.prompt
    elif args.prompts_file:
        prompts = [line for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts:
        print("tuneforge: error: no prompt given (--prompt, --prompts-file or stdin)", file=sys.stderr)
        return 2
    options = generation_options(args)
    loaded = load_for_inference(args.model, trust_remote_code=args.trust_remote_code)
    images = [[str(path) for path in args.image]] * len(prompts) if args.image else None
    if len(prompts) == 1 and not args.no_stream:
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate(loaded, prompts, raw=args.raw, system_prompt=args.system, images=images, streamer=streamer, **options)
        return 0
    outputs = generate(loaded, prompts, raw=args.raw, system_prompt=args.system, images=images, batch_size=args.batch_size, **options)
    for prompt, output in zip(prompts, outputs):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(output.strip())
    return 0
