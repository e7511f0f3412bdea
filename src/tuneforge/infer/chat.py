"""Multi-turn chat with a trained model; the history is encoded exactly as training encodes it.

    session = ChatSession(load_for_inference("runs/chat"), system_prompt="Be brief.")
    session.send("Hello")          # the reply
    session.send("And then?")      # sees the first turn, rendered with the run's template

Each turn renders the whole history with the run's template (`data/templates.py`, the code
that formats training conversations) and the generation prompt, so the model sees earlier
turns as it saw them in multi-turn training data. When the history and the reply would not fit
the model's context window, the oldest exchanges are dropped (the system prompt stays, and with
images the first exchange, which carries them).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from tuneforge.data.images import expand_prompt, pixel_values, prompt_with_images
from tuneforge.data.templates import (
    Message,
    encode_generation_prompt,
    render,
    resolve_template,
)
from tuneforge.errors import ModelError
from tuneforge.infer.generate import LoadedModel
from tuneforge.models.generation import generate_texts

COMMANDS = {"/reset": "forget the conversation (the system prompt stays)", "/exit": "quit"}


class ChatSession:
    """A conversation with `loaded`: the history, and how it becomes the next prompt.

    Args:
        loaded: From `load_for_inference`.
        system_prompt: System message first in the history; default: the run's own.
        images: Image files shown with the first user turn (vision-language models).
        options: Generation options for `generate_texts` (`max_new_tokens`, `temperature`, ...).
    """

    def __init__(
        self, loaded: LoadedModel, *, system_prompt: str | None = None, images: list[str] | None = None,
        **options: Any,
    ) -> None:
        if images and loaded.images is None:
            raise ModelError("images were given but this is a text-only model", where=loaded.source)
        self.loaded = loaded
        self.images = list(images or [])
        # A model saved without any template gets what training would have given it: `auto`.
        self.template = loaded.template or resolve_template("auto", loaded.tokenizer)
        self.system_prompt = system_prompt if system_prompt is not None else loaded.system_prompt
        self.options = options
        self.messages: list[Message] = []
        self.dropped_turns = 0  # oldest exchanges the last `ask` dropped to fit the context window
        self.reset()

    @property
    def context_length(self) -> int | None:
        """Tokens the model attends over (its config's `max_position_embeddings`), if it says."""
        config = getattr(self.loaded.model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None)

    def _prompt_ids(self, messages: list[Message]) -> list[int]:
        """`messages` encoded as training encodes them, image placeholders expanded."""
        ids = encode_generation_prompt(self.loaded.tokenizer, self.template, messages)
        return expand_prompt(ids, self.loaded.images) if self.images and self.loaded.images else ids

    def _fit_history(self) -> None:
        """Drop the oldest exchanges until the prompt plus `max_new_tokens` fit the context window.

        Raises:
            ModelError: the newest message alone does not fit.
        """
        prompt_ids = self._prompt_ids(self.messages)
        limit = self.context_length
        self.dropped_turns = 0
        if limit is None:
            return
        budget = limit - int(self.options.get("max_new_tokens", 64))
        if len(prompt_ids) <= budget:
            return
        head = 1 if self.messages[0]["role"] == "system" else 0
        users = [i for i, message in enumerate(self.messages) if message["role"] == "user" and i >= head]
        # The system prompt, the exchange carrying the images (if any) and the new message always stay.
        protected = users[1] if self.images and len(users) > 1 else head
        shortest = self._prompt_ids(self.messages[:protected] + self.messages[-1:])
        if len(shortest) > budget:
            self.messages.pop()  # the conversation stays as it was before this message
            raise ModelError(
                f"the message needs {len(shortest)} prompt tokens and the reply up to {limit - budget}; "
                f"the model's context holds {limit}",
                where="chat",
                hint="send a shorter message, or lower --max-new-tokens",
            )
        dropped = 0
        while len(prompt_ids) > budget:
            # The oldest unprotected user turn and its replies, up to the next user turn.
            following = next(i for i in range(protected + 1, len(self.messages)) if self.messages[i]["role"] == "user")
            del self.messages[protected:following]
            dropped += 1
            prompt_ids = self._prompt_ids(self.messages)
        self.dropped_turns = dropped

    def reset(self) -> None:
        """Forget every turn; keep the system prompt."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def ask(self, text: str) -> None:
        """Add a user turn (the next `respond` answers it); the first one carries the images.
        Older exchanges that no longer fit the context window with it are dropped."""
        if self.images and not any(message["role"] == "user" for message in self.messages):
            assert self.loaded.images is not None  # checked in __init__
            text = prompt_with_images(text, len(self.images), self.loaded.images.image_token)
        self.messages.append({"role": "user", "content": text})
        self._fit_history()

    def prompt_text(self) -> str:
        """The history as the model will read it, ending with the assistant header."""
        return render(self.loaded.tokenizer, self.template, self.messages, add_generation_prompt=True)

    def respond(self, streamer: Any = None) -> str:
        """Generate the assistant's reply to the history and add it to the history."""
        tokenizer = self.loaded.tokenizer
        prompt_ids = self._prompt_ids(self.messages)  # as in training and `generate`
        options = dict(self.options)
        if self.images:
            assert self.loaded.images is not None  # checked in __init__
            options["pixel_values"] = [pixel_values(self.loaded.images.processor, self.images)]
        (reply,) = generate_texts(
            self.loaded.model, tokenizer, [prompt_ids],
            stop_token_ids=self.template.stop_token_ids(tokenizer), streamer=streamer, **options,
        )
        reply = reply.strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def send(self, text: str, streamer: Any = None) -> str:
        """`ask` then `respond`."""
        self.ask(text)
        return self.respond(streamer)


def _turns(interactive: bool) -> Iterator[str]:
    """User lines: `input()` with line editing on a terminal, stdin lines from a pipe."""
    if not interactive:
        yield from sys.stdin
        return
    import readline  # noqa: F401  imported for its side effect: line editing and history in input()

    while True:
        try:
            yield input("you> ")
        except EOFError:  # Ctrl-D
            print()
            return


def run_chat(session: ChatSession, *, interactive: bool, stream: bool, show_prompt: bool = False) -> int:
    """The read-reply loop of `tuneforge chat`; returns the number of replies given.

    On a terminal it greets and prompts; from a pipe it prints only the replies (and, with
    `show_prompt`, the exact prompt text of each turn between `[prompt]` and `[/prompt]`).
    """
    from transformers import TextStreamer

    if interactive:
        commands = ", ".join(f"{name} ({what})" for name, what in COMMANDS.items())
        print(f"chatting with {session.loaded.source} (template {session.template.name}); {commands}")
    replies = 0
    for line in _turns(interactive):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)", flush=True)
            continue
        try:
            session.ask(text)
        except ModelError as error:  # a message too long for the context: say so, keep chatting
            print(f"tuneforge: {error}", file=sys.stderr, flush=True)
            continue
        if show_prompt:
            print(f"[prompt]\n{session.prompt_text()}\n[/prompt]", flush=True)
        if stream:
            session.respond(TextStreamer(session.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True))
        else:
            print(session.respond(), flush=True)
        if session.dropped_turns:
            print(f"(dropped the {session.dropped_turns} oldest exchange(s) to fit the model's context of "
                  f"{session.context_length} tokens)", file=sys.stderr, flush=True)
        replies += 1
    return replies


__all__ = ["COMMANDS", "ChatSession", "run_chat"]
