"""Chat templates: how a conversation becomes token ids, and which of them are trained.

Every template, built-in or not, is a Jinja chat template rendered by the tokenizer's own
`apply_chat_template`, so training, `generate` and any exported tokenizer format prompts
identically (PITFALLS 2)::

    template = resolve_template("chatml", tokenizer)
    input_ids, labels = encode_conversation(tokenizer, template, messages)
    prompt_ids = encode_generation_prompt(tokenizer, template, messages[:-1])
    assert input_ids[: len(prompt_ids)] == prompt_ids

Masks come from rendering the conversation incrementally (the history with the generation
prompt, then with the assistant turn) and tokenising each rendering whole, so the prompt ids
inside a training example are exactly the ids generation will see. The trained part of an
assistant turn runs from its first token through its end-of-turn token (EOS, `<|im_end|>`,
`<|eot_id|>`, ...); what a template prints after that token (a newline) is not trained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import TemplateError

from tuneforge.errors import ConfigError, DataError

IGNORE_INDEX = -100
TrainOn = Literal["all_assistant", "last_assistant"]
Message = dict[str, str]

METADATA_VERSION = 1
_PROBE_QUESTION = "tuneforge-probe-question"
_PROBE_ANSWER = "tuneforge-probe-answer"


@dataclass(frozen=True)
class Template:
    """A resolved template: a Jinja chat template plus the token that ends an assistant turn.

    Attributes:
        name: What the config named (`qa`, `chatml`, ...), `tokenizer` for the tokenizer's
            own template, `prompt` for a `{prompt}` string, `jinja` for a custom template.
        chat_template: Jinja source, rendered with `tokenizer.apply_chat_template`.
        end_of_turn: Text of the token that ends an assistant turn (`</s>`, `<|im_end|>`).
            It is trained, and generation stops on it.
    """

    name: str
    chat_template: str
    end_of_turn: str

    def end_of_turn_id(self, tokenizer: Any) -> int:
        """Id of `end_of_turn` in `tokenizer`."""
        return _single_token_id(tokenizer, self.end_of_turn, self.name)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids generation stops on: the end-of-turn token, and EOS when that differs."""
        stops = [self.end_of_turn_id(tokenizer)]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
            stops.append(tokenizer.eos_token_id)
        return stops


@dataclass(frozen=True)
class _Layout:
    """The text around each role of a built-in template; compiled to Jinja by `_compile`."""

    system: tuple[str, str] = ("", "\n\n")
    user: tuple[str, str] = ("", "")
    assistant_header: str = ""
    end_of_turn: str | None = None  # None: the tokenizer's EOS
    separator: str = ""  # before any message that follows an assistant turn
    prefix: str | None = None  # None: the tokenizer's BOS if it adds one on encode
    default_system: str | None = None
    markers: tuple[str, ...] = ()  # texts that must be single tokens in the vocabulary


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

LAYOUTS: dict[str, _Layout] = {
    "qa": _Layout(
        user=("### Question:\n", "\n\n"), assistant_header="### Answer:\n", separator="\n\n"
    ),
    "alpaca": _Layout(
        user=("### Instruction:\n", "\n\n"),
        assistant_header="### Response:\n",
        separator="\n\n",
        default_system=ALPACA_PREAMBLE,
    ),
    "chatml": _Layout(
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant_header="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        separator="\n",
        markers=("<|im_start|>", "<|im_end|>"),
    ),
    "llama-3": _Layout(
        system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        prefix="<|begin_of_text|>",
        markers=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "plain": _Layout(),
}


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether plain encoding puts the BOS first (Llama, Gemma do; Qwen, GPT-2 do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = list(tokenizer("a")["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return with_special[:1] == [bos] and without[:1] != [bos]


def _compile(layout: _Layout, tokenizer: Any) -> str:
    """Jinja source for a built-in layout; BOS and EOS are the tokenizer's, by name."""
    if layout.prefix is None:
        prefix = "{{- bos_token -}}" if _adds_bos(tokenizer) else ""
    else:
        prefix = "{{- " + _literal(layout.prefix) + " -}}"
    end = "eos_token" if layout.end_of_turn is None else _literal(layout.end_of_turn)
    default_system = ""
    if layout.default_system is not None:
        default_system = (
            "{%- if messages[0]['role'] != 'system' -%}"
            f"{{{{- {_literal(layout.system[0] + layout.default_system + layout.system[1])} -}}}}"
            "{%- endif -%}"
        )

    def wrap(before: str, after: str) -> str:
        return f"{{{{- {_literal(before)} + message['content'] + {_literal(after)} -}}}}"

    # One line: transformers renders with trim_blocks/lstrip_blocks, so layout whitespace
    # in the source would leak into the text.
    return (
        prefix
        + default_system
        + "{%- for message in messages -%}"
        + "{%- if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'assistant' -%}"
        + f"{{{{- {_literal(layout.separator)} -}}}}"
        + "{%- endif -%}"
        + "{%- if message['role'] == 'system' -%}"
        + wrap(*layout.system)
        + "{%- elif message['role'] == 'user' -%}"
        + wrap(*layout.user)
        + "{%- elif message['role'] == 'assistant' -%}"
        + f"{{{{- {_literal(layout.assistant_header)} + message['content'] + {end} -}}}}"
        + "{%- else -%}"
        + "{{- raise_exception('unsupported role: ' + message['role']) -}}"
        + "{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + f"{{{{- {_literal(layout.assistant_header)} -}}}}"
        + "{%- endif -%}"
    )


def _prompt_layout(text: str, tokenizer: Any) -> _Layout:
    """A `{prompt}` string: the user content replaces `{prompt}`, the reply follows."""
    if text.count("{prompt}") != 1:
        raise ConfigError(
            f"a prompt template must contain '{{prompt}}' exactly once, found {text.count('{prompt}')}",
            where="template",
        )
    before, after = text.split("{prompt}")
    bos = tokenizer.bos_token
    if bos and before.startswith(bos):
        # The string brings its own BOS: keep it first, once, and never add another.
        return _Layout(user=(before[len(bos) :], after), prefix=bos)
    return _Layout(user=(before, after))


def _single_token_id(tokenizer: Any, text: str, template_name: str) -> int:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise ConfigError(
            f"template '{template_name}' needs '{text}' as one token, but this tokenizer splits "
            f"it into {len(ids)} tokens",
            where="template",
            hint="use template: auto (the tokenizer's own chat template) or qa, or a model "
            "whose tokenizer defines this token",
        )
    return ids[0]


def _is_control_token(tokenizer: Any, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)


def _render(
    tokenizer: Any, chat_template: str, messages: Sequence[Message], add_generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        list(messages),
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # Exactly what apply_chat_template(tokenize=True) does: the template text already holds
    # any BOS, so the tokenizer must not add another (PITFALLS 2).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _detect_end_of_turn(tokenizer: Any, chat_template: str, name: str) -> str:
    """Render a probe conversation and find the control token closing the assistant turn.

    Raises:
        ConfigError: The template drops user or assistant content, fails to render, or puts
            no control token after an assistant message (the model would never learn to stop).
    """
    user = [{"role": "user", "content": _PROBE_QUESTION}]
    reply = [{"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        prompt = _render(tokenizer, chat_template, user, add_generation_prompt=True)
        full = _render(tokenizer, chat_template, user + reply, add_generation_prompt=False)
    except Exception as error:  # a user's template can raise anything while rendering: {{ 0/0 }}
        what = str(error) if isinstance(error, TemplateError) else f"{type(error).__name__}: {error}"
        raise ConfigError(f"chat template '{name}' fails to render: {what}", where="template") from None
    problem = None
    if _PROBE_QUESTION not in prompt:
        problem = "does not render user messages"
    elif _PROBE_ANSWER not in full:
        problem = "does not render assistant messages"
    elif not full.startswith(prompt):
        problem = "renders the history differently once an assistant reply follows"
    if problem:
        raise ConfigError(f"chat template '{name}' {problem}", where="template")
    suffix = full[full.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    for token_id in _tokenize(tokenizer, suffix):
        if _is_control_token(tokenizer, token_id):
            return tokenizer.convert_ids_to_tokens(token_id)
    raise ConfigError(
        f"chat template '{name}' ends assistant messages with {suffix!r}, which has no "
        "end-of-turn or EOS token: the model would never learn to stop",
        where="template",
        hint="end assistant messages with {{ eos_token }} or the model's end-of-turn token",
    )


def resolve_template(name_or_text: str, tokenizer: Any) -> Template:
    """The template a config names, checked against `tokenizer`.

    Args:
        name_or_text: `auto`, `tokenizer`, `qa`, `alpaca`, `chatml`, `llama-3`, `plain`, a
            string containing `{prompt}`, or Jinja chat template source.
        tokenizer: The tokenizer training and generation use.

    Returns:
        The template, with its end-of-turn token identified.

    Raises:
        ConfigError: Unknown name; `tokenizer` with a tokenizer that has no chat template; a
            template whose tokens the tokenizer lacks, or that cannot mark an end of turn.
    """
    text = name_or_text
    if text in ("auto", "tokenizer"):
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates: use the default one
            own = own.get("default")
        if own:
            return Template("tokenizer", own, _detect_end_of_turn(tokenizer, own, "tokenizer"))
        if text == "tokenizer":
            raise ConfigError(
                "template 'tokenizer': this tokenizer has no chat template",
                where="template",
                hint="use template: qa, alpaca, chatml or a Jinja chat template",
            )
        text = "qa"
    if text in LAYOUTS:
        layout, name = LAYOUTS[text], text
    elif "{%" in text or "{{" in text:
        return Template("jinja", text, _detect_end_of_turn(tokenizer, text, "jinja"))
    elif "{prompt}" in text:
        layout, name = _prompt_layout(text, tokenizer), "prompt"
    else:
        raise ConfigError(
            f"unknown template {text!r}",
            where="template",
            hint=f"use one of auto, tokenizer, {', '.join(LAYOUTS)}, a string containing "
            "{prompt}, or a Jinja chat template",
        )
    for marker in layout.markers:
        _single_token_id(tokenizer, marker, name)
    if layout.end_of_turn is None and tokenizer.eos_token is None:
        raise ConfigError(
            f"template '{name}' ends replies with EOS, but the tokenizer has no EOS token",
            where="template",
        )
    end = layout.end_of_turn if layout.end_of_turn is not None else tokenizer.eos_token
    return Template(name, _compile(layout, tokenizer), end)


def render(
    tokenizer: Any, template: Template, messages: Sequence[Message], *, add_generation_prompt: bool
) -> str:
    """The conversation as text (what `data preview` shows, what the ids encode)."""
    return _render(tokenizer, template.chat_template, messages, add_generation_prompt)


def encode_generation_prompt(tokenizer: Any, template: Template, messages: Sequence[Message]) -> list[int]:
    """Ids of a history (ending with a user turn) followed by the assistant header.

    Equal to the start of `encode_conversation`'s ids for the same history plus a reply, and
    to `tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`
    when the template is the tokenizer's.
    """
    return _tokenize(tokenizer, render(tokenizer, template, messages, add_generation_prompt=True))


def encode_prompt_for_generation(
    tokenizer: Any, template: Template, prompt_text: str, system_prompt: str | None = None
) -> list[int]:
    """Generation ids for one user turn (and an optional system message), as in training."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt_text})
    return encode_generation_prompt(tokenizer, template, messages)


def _extends(longer: list[int], prefix: list[int]) -> bool:
    return longer[: len(prefix)] == prefix


def _reply_ids(
    tokenizer: Any,
    template: Template,
    messages: Sequence[Message],
    prompt: tuple[str, list[int]],
    where: str | None,
) -> list[int]:
    """Ids of the last (assistant) message's rendering, after the generation prompt.

    `prompt` is the text and ids of `messages[:-1]` with the generation prompt.
    """
    prompt_text, prompt_ids = prompt
    full_text = render(tokenizer, template, messages, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            f"template '{template.name}' renders the history differently once the assistant "
            f"reply (message {len(messages) - 1}) follows",
            where=where,
            hint="the template changes earlier turns (e.g. drops reasoning from history); "
            "use train_on: last_assistant",
        )
    full_ids = _tokenize(tokenizer, full_text)
    if _extends(full_ids, prompt_ids):
        return full_ids[len(prompt_ids) :]
    # The reply's first token merges with the prompt's last when tokenised together. Generation
    # starts from `prompt_ids`, so the reply is tokenised on its own, as the model will emit it.
    return _tokenize(tokenizer, full_text[len(prompt_text) :])


def encode_conversation(
    tokenizer: Any,
    template: Template,
    messages: Sequence[Message],
    *,
    train_on: TrainOn = "all_assistant",
    origin: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; labels are -100 where no loss is wanted.

    Trained: each selected assistant turn from its first token through its end-of-turn token.
    Not trained: system and user turns, role headers, BOS, and anything a template prints
    after the end-of-turn token. Messages after the last assistant turn are left out.

    Example (qa, tokens shown as text; `[...]` marks trained tokens)::

        <s>### Question:\\nHi\\n\\n### Answer:\\n[Hello</s>]

    Args:
        tokenizer: The tokenizer.
        template: From `resolve_template`.
        messages: `{"role": "system"|"user"|"assistant", "content": str}` dicts.
        train_on: `all_assistant` or `last_assistant` (earlier replies are context only).
        origin: Where the row came from (`file:line`), for error messages.

    Returns:
        `(input_ids, labels)` of equal length.

    Raises:
        DataError: No assistant turn; a conversation that starts with one; a template that
            yields no trained token for a turn, or trains every token (PITFALLS 3); a template
            whose rendering of the history changes as the conversation grows.
    """
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not turns:
        raise DataError("the conversation has no assistant turn: nothing to train on", where=origin)
    if turns[0] == 0:
        raise DataError(
            "the conversation starts with an assistant turn: there is no prompt for it",
            where=origin,
            hint="put a user (or system) message first",
        )
    selected = turns if train_on == "all_assistant" else turns[-1:]
    end_id = template.end_of_turn_id(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for index in selected:
        prompt_text = render(tokenizer, template, messages[:index], add_generation_prompt=True)
        prompt_ids = _tokenize(tokenizer, prompt_text)
        if not _extends(prompt_ids, input_ids):
            raise DataError(
                f"template '{template.name}' tokenises the history before message {index} "
                "differently from the turns already encoded",
                where=origin,
                hint="use train_on: last_assistant",
            )
        labels += [IGNORE_INDEX] * (len(prompt_ids) - len(input_ids))
        input_ids = prompt_ids
        reply = _reply_ids(tokenizer, template, messages[: index + 1], (prompt_text, prompt_ids), origin)
        if not reply:
            raise DataError(
                f"template '{template.name}' renders nothing for the assistant message "
                f"{index}: the row would have no trained token",
                where=origin,
            )
        if end_id not in reply:
            raise DataError(
                f"template '{template.name}' does not end the assistant message {index} with "
                f"'{template.end_of_turn}': the model would not learn to stop",
                where=origin,
            )
        # Train through the last end-of-turn token; what follows it (a newline) is context.
        end = len(reply) - reply[::-1].index(end_id)
        input_ids = input_ids + reply
        labels += reply[:end] + [IGNORE_INDEX] * (len(reply) - end)
    if IGNORE_INDEX not in labels:
        raise DataError(
            f"template '{template.name}' trains every token of the row: the prompt renders to "
            "no tokens, so nothing is masked",
            where=origin,
            hint="check that the template prints the user messages",
        )
    return input_ids, labels


def template_to_metadata(template: Template) -> dict[str, Any]:
    """A JSON-serialisable record of `template`, saved with a run for `generate`."""
    return {
        "version": METADATA_VERSION,
        "name": template.name,
        "chat_template": template.chat_template,
        "end_of_turn": template.end_of_turn,
    }


def template_from_metadata(metadata: dict[str, Any]) -> Template:
    """Rebuild the template `template_to_metadata` saved.

    Raises:
        DataError: The record is not one `template_to_metadata` wrote.
    """
    fields = ("name", "chat_template", "end_of_turn")
    if (
        not isinstance(metadata, dict)
        or metadata.get("version") != METADATA_VERSION
        or not all(isinstance(metadata.get(key), str) for key in fields)
    ):
        raise DataError(
            f"unreadable template record: expected version {METADATA_VERSION} with text "
            f"fields {', '.join(fields)}, found {metadata!r:.200}",
            where="run metadata 'template'",
            hint="the run was saved by another tuneforge version; pass the template explicitly",
        )
    return Template(**{key: metadata[key] for key in fields})


__all__ = [
    "ALPACA_PREAMBLE",
    "LAYOUTS",
    "Message",
    "Template",
    "TrainOn",
    "encode_conversation",
    "encode_generation_prompt",
    "encode_prompt_for_generation",
    "render",
    "resolve_template",
    "template_from_metadata",
    "template_to_metadata",
]
