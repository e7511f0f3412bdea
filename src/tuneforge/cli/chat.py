"""`tuneforge chat MODEL_OR_RUN`: talk to a trained model, turn after turn, with history.

On a terminal: a `you>` prompt with line editing. From a pipe: one user turn per line, the
replies on stdout (`printf 'Hi\\nAnd you?\\n' | tuneforge chat runs/chat --no-stream`).
`/reset` forgets the conversation, `/exit` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys

from tuneforge.cli.generate import add_generation_arguments, generation_options

HELP = "chat with a run or model: multi-turn history in the run's template; /reset, /exit"
EXAMPLE = 'tuneforge chat runs/quickstart --system "Answer in digits." --max-new-tokens 16'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_RUN", help="run directory, model directory or hub id")
    parser.add_argument("--system", help="system prompt (default: the one the run was trained with)")
    parser.add_argument("--no-stream", action="store_true", help="print each reply when it is complete")
    parser.add_argument("--image", action="append", metavar="PATH",
                        help="an image shown with the first turn (vision-language runs; repeatable)")
    parser.add_argument("--show-prompt", action="store_true",
                        help="print the exact text each reply is generated from (history rendered with the template)")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tuneforge.infer.chat import ChatSession, run_chat
    from tuneforge.infer.generate import load_for_inference

    options = generation_options(args)
    loaded = load_for_inference(args.model, trust_remote_code=args.trust_remote_code)
    session = ChatSession(loaded, system_prompt=args.system, images=args.image, **options)
    run_chat(session, interactive=sys.stdin.isatty(), stream=not args.no_stream, show_prompt=args.show_prompt)
    return 0
