"""Read a row in its dataset format: conversations, preference pairs, choices, documents.

Pure functions over `Row`. Every bad input raises `DataError` naming the row (`file:line`),
the field, what was expected and what was found; a missing field lists the row's fields.

    messages = row_to_messages(row, spec)  # instruction, chat, multiple_choice
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge.config.schema import DatasetSpec
from tuneforge.data.sources import Row
from tuneforge.errors import DataError

Message = dict[str, str]

# ShareGPT speaker names (and Gemma's `model`) mapped to chat-template roles.
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class PreferencePair:
    """A prompt conversation and two alternative replies to it (each a list of messages)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


@dataclass(frozen=True)
class MultipleChoiceItem:
    """A question, its choices and the index of the right one."""

    question: str
    choices: list[str]
    label: int


def _found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _missing(row: Row, field: str, role: str, setting: str, spec: DatasetSpec) -> DataError:
    found = ", ".join(sorted(row.fields)) or "(none)"
    return DataError(
        f"missing field '{field}' ({role}); the row has: {found}",
        where=row.origin,
        hint=f"set {setting} in the dataset config ({spec.name}) to the right field name",
    )


def _as_text(value: Any, field: str, role: str, row: Row) -> str:
    """A field value as text: strings as they are, numbers written out, null as empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"field '{field}' ({role}) is a {type(value).__name__}, expected text; found {_found(value)}",
        where=row.origin,
    )


def _field_text(row: Row, field: str, role: str, setting: str, spec: DatasetSpec) -> str:
    if field not in row.fields:
        raise _missing(row, field, role, setting, spec)
    return _as_text(row.fields[field], field, role, row)


def _prompt_text(row: Row, spec: DatasetSpec) -> str:
    """`prompt_field_names` joined by blank lines, empty ones skipped.

    Configured fields must all exist (a typo must not silently drop context); with the
    default fields only the first must, since many instruction sets omit `input`.
    """
    names = spec.prompt_field_names
    optional = set(names[1:]) if spec.prompt_fields is None else set()
    parts = [
        _field_text(row, name, "prompt", "prompt_fields", spec)
        for name in names
        if name in row.fields or name not in optional
    ]
    text = "\n\n".join(part for part in parts if part.strip())
    if not text:
        raise DataError(
            f"the prompt is empty: field(s) {', '.join(names)} hold no text", where=row.origin
        )
    return text


def _with_system(messages: list[Message], spec: DatasetSpec) -> list[Message]:
    """Prepend `spec.system_prompt` unless the conversation has its own system message."""
    if spec.system_prompt is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": spec.system_prompt}, *messages]


def _turn(item: Any, number: int, field: str, row: Row) -> Message:
    """One turn, OpenAI style (`role`/`content`) or ShareGPT style (`from`/`value`)."""
    where = f"turn {number} of '{field}'"
    if not isinstance(item, dict):
        raise DataError(
            f"{where} is a {type(item).__name__}, expected an object with role/content "
            f"(OpenAI) or from/value (ShareGPT); found {_found(item)}",
            where=row.origin,
        )
    role_key = "role" if "role" in item else "from" if "from" in item else None
    content_key = "content" if "content" in item else "value" if "value" in item else None
    if role_key is None or content_key is None:
        raise DataError(
            f"{where} has keys {', '.join(sorted(item)) or '(none)'}, expected role/content "
            "(OpenAI) or from/value (ShareGPT)",
            where=row.origin,
        )
    speaker = item[role_key]
    role = ROLE_NAMES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise DataError(
            f"{where} has {role_key} {_found(speaker)}, expected one of {', '.join(ROLE_NAMES)}",
            where=row.origin,
        )
    content = item[content_key]
    if not isinstance(content, str):
        raise DataError(
            f"{where} has {content_key} of type {type(content).__name__}, expected text; "
            f"found {_found(content)}",
            where=row.origin,
        )
    return {"role": role, "content": content}


def _messages(value: Any, field: str, row: Row) -> list[Message]:
    """A list of turns from a row field."""
    if not isinstance(value, list):
        raise DataError(
            f"field '{field}' is a {type(value).__name__}, expected a list of turns; "
            f"found {_found(value)}",
            where=row.origin,
        )
    if not value:
        raise DataError(f"field '{field}' is an empty list of turns", where=row.origin)
    return [_turn(item, number, field, row) for number, item in enumerate(value)]


def _chat_messages(row: Row, spec: DatasetSpec) -> list[Message]:
    field = spec.messages_field
    if field not in row.fields:
        raise _missing(row, field, "conversation", "messages_field", spec)
    messages = _messages(row.fields[field], field, row)
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(
            f"field '{field}' has no assistant turn (roles: {roles}): nothing to train on",
            where=row.origin,
        )
    return _with_system(messages, spec)


def _instruction_messages(row: Row, spec: DatasetSpec) -> list[Message]:
    prompt = _prompt_text(row, spec)
    response = _field_text(row, spec.response_field, "response", "response_field", spec)
    if not response.strip():
        raise DataError(f"field '{spec.response_field}' (response) is empty", where=row.origin)
    user: Message = {"role": "user", "content": prompt}
    return _with_system([user, {"role": "assistant", "content": response}], spec)


def format_choices(item: MultipleChoiceItem) -> str:
    """The user text of a multiple-choice item: the question, then `0. ...` per choice."""
    listed = "\n".join(f"{index}. {choice}" for index, choice in enumerate(item.choices))
    return f"{item.question}\n{listed}"


def row_to_messages(row: Row, spec: DatasetSpec) -> list[Message]:
    """The conversation a supervised row trains on.

    Args:
        row: The row.
        spec: Its dataset config; `spec.format` is `instruction`, `chat` or `multiple_choice`.

    Returns:
        Messages `{"role": ..., "content": ...}`; `spec.system_prompt` first when the row has
        no system message.

    Raises:
        DataError: A field is missing, has the wrong type or is empty, or the format has no
            conversation (`text`, `preference`).
    """
    if spec.format == "instruction":
        return _instruction_messages(row, spec)
    if spec.format == "chat":
        return _chat_messages(row, spec)
    if spec.format == "multiple_choice":
        item = parse_multiple_choice(row, spec)
        user: Message = {"role": "user", "content": format_choices(item)}
        reply: Message = {"role": "assistant", "content": item.choices[item.label]}
        return _with_system([user, reply], spec)
    raise DataError(
        f"format '{spec.format}' rows are not conversations", where=row.origin,
        hint="use document_text for text rows and parse_preference for preference rows",
    )


def _choices(row: Row, spec: DatasetSpec) -> list[str]:
    """From the `choices_field` list, or from `choice0`, `choice1`, ... fields (JGLUE)."""
    field = spec.choices_field
    if field in row.fields:
        value = row.fields[field]
        if not isinstance(value, list):
            raise DataError(
                f"field '{field}' (choices) is a {type(value).__name__}, expected a list; "
                f"found {_found(value)}",
                where=row.origin,
            )
        choices = [_as_text(choice, f"{field}[{i}]", "choice", row) for i, choice in enumerate(value)]
    else:
        choices = []
        while f"choice{len(choices)}" in row.fields:
            name = f"choice{len(choices)}"
            choices.append(_as_text(row.fields[name], name, "choice", row))
        if not choices:
            found = ", ".join(sorted(row.fields)) or "(none)"
            raise DataError(
                f"missing field '{field}' (choices), and no choice0, choice1, ... fields; "
                f"the row has: {found}",
                where=row.origin,
                hint=f"set choices_field in the dataset config ({spec.name})",
            )
    if len(choices) < 2:
        raise DataError(f"expected at least 2 choices, found {len(choices)}", where=row.origin)
    return choices


def _label(row: Row, spec: DatasetSpec, count: int) -> int:
    field = spec.label_field
    if field not in row.fields:
        raise _missing(row, field, "label", "label_field", spec)
    value = row.fields[field]
    label: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        label = value
    elif isinstance(value, float) and value.is_integer():
        label = int(value)  # Parquet/pandas columns turn ints into floats
    elif isinstance(value, str) and value.strip().isdecimal():  # isdigit() admits '²', which int() rejects
        label = int(value)  # CSV values are text
    if label is None:
        raise DataError(
            f"field '{field}' (label) is {_found(value)}, expected the index of the right "
            f"choice (an integer 0..{count - 1})",
            where=row.origin,
        )
    if not 0 <= label < count:
        raise DataError(
            f"field '{field}' (label) is {label}, out of range for {count} choices "
            f"(expected 0..{count - 1})",
            where=row.origin,
        )
    return label


def parse_multiple_choice(row: Row, spec: DatasetSpec) -> MultipleChoiceItem:
    """The question (`prompt_field_names` joined), the choices and the label of a row.

    Raises:
        DataError: Missing or mistyped fields, fewer than 2 choices, label out of range.
    """
    question = _prompt_text(row, spec)
    choices = _choices(row, spec)
    return MultipleChoiceItem(question, choices, _label(row, spec, len(choices)))


def _reply(row: Row, field: str, role: str, spec: DatasetSpec) -> list[Message]:
    """A preference reply: text (one assistant message) or a list of messages."""
    if field not in row.fields:
        raise _missing(row, field, role, f"{role}_field", spec)
    value = row.fields[field]
    if isinstance(value, list):
        return _messages(value, field, row)
    return [{"role": "assistant", "content": _as_text(value, field, role, row)}]


def _shared_prefix(chosen: list[Message], rejected: list[Message]) -> int:
    count = 0
    while count < min(len(chosen), len(rejected)) and chosen[count] == rejected[count]:
        count += 1
    return count


def _preference_prompt(
    row: Row, spec: DatasetSpec, chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    names = spec.prompt_field_names
    first = row.fields.get(names[0])
    if isinstance(first, list):  # conversational: the prompt is a list of turns
        return _messages(first, names[0], row), chosen, rejected
    if any(name in row.fields for name in names):
        return [{"role": "user", "content": _prompt_text(row, spec)}], chosen, rejected
    if len(chosen) > 1 and len(rejected) > 1:
        # Implicit prompt: chosen and rejected repeat the conversation before their replies.
        shared = _shared_prefix(chosen, rejected)
        if any(len(reply) > shared and reply[shared]["role"] != "assistant" for reply in (chosen, rejected)):
            raise DataError(
                f"fields '{spec.chosen_field}' and '{spec.rejected_field}' differ before the "
                f"reply (at turn {shared}); their conversations must share the prompt",
                where=row.origin,
            )
        return chosen[:shared], chosen[shared:], rejected[shared:]
    raise _missing(row, names[0], "prompt", "prompt_fields", spec)


def _check_reply(messages: list[Message], field: str, row: Row) -> None:
    if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(
            f"field '{field}' has no reply: expected text or turns ending with a non-empty "
            "assistant message",
            where=row.origin,
        )


def parse_preference(row: Row, spec: DatasetSpec) -> PreferencePair:
    """A preference row as messages.

    Accepted shapes: `prompt` text with `chosen`/`rejected` text; a `prompt` list of turns
    with `chosen`/`rejected` lists of assistant turns; or no prompt field, with `chosen` and
    `rejected` whole conversations whose shared opening is the prompt.

    Raises:
        DataError: Missing or mistyped fields, an empty prompt or reply, identical replies.
    """
    chosen = _reply(row, spec.chosen_field, "chosen", spec)
    rejected = _reply(row, spec.rejected_field, "rejected", spec)
    prompt, chosen, rejected = _preference_prompt(row, spec, chosen, rejected)
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise DataError("the prompt has no user message with text", where=row.origin)
    _check_reply(chosen, spec.chosen_field, row)
    _check_reply(rejected, spec.rejected_field, row)
    if chosen == rejected:
        raise DataError(
            f"fields '{spec.chosen_field}' and '{spec.rejected_field}' are identical: the pair "
            "teaches nothing",
            where=row.origin,
        )
    return PreferencePair(_with_system(prompt, spec), chosen, rejected)


@dataclass(frozen=True)
class UnpairedReply:
    """A prompt conversation, one reply, and whether the reply is desirable (KTO data)."""

    prompt: list[Message]
    reply: list[Message]
    desirable: bool


def _prompt_messages(row: Row, spec: DatasetSpec) -> list[Message]:
    """The prompt of an unpaired or prompt row: the first prompt field's turns, or the prompt fields' text."""
    names = spec.prompt_field_names
    first = row.fields.get(names[0])
    if isinstance(first, list):
        return _messages(first, names[0], row)
    return [{"role": "user", "content": _prompt_text(row, spec)}]


def parse_prompt(row: Row, spec: DatasetSpec) -> list[Message]:
    """A prompt row (GRPO) as the conversation to generate a reply to.

    The prompt is `prompt_fields` as text, or the first of them holding a list of turns; a
    conversation's final assistant turn is left out (it is the answer the model is to give,
    still readable from its column).

    Raises:
        DataError: Missing or mistyped fields, or a prompt not ending with a user message with text.
    """
    prompt = _prompt_messages(row, spec)
    if prompt[-1]["role"] == "assistant":
        prompt = prompt[:-1]
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        found = f"a {prompt[-1]['role']} turn" if prompt else "nothing"
        raise DataError(
            f"the prompt ends with {found}, expected a user message with text to reply to", where=row.origin
        )
    return _with_system(prompt, spec)


# JSON holds labels as booleans, CSV and Parquet as text or numbers; anything else is a mistake, not a guess.
LABEL_VALUES = {"true": True, "false": False, "1": True, "0": False}


def parse_unpaired(row: Row, spec: DatasetSpec) -> UnpairedReply:
    """An unpaired row: the prompt (`prompt_fields`, text or turns), the reply (`response_field`)
    and its label (`label_field`: true for desirable, false for undesirable).

    Raises:
        DataError: Missing or mistyped fields, an empty prompt or reply, a label that is not a boolean.
    """
    prompt = _prompt_messages(row, spec)
    reply = _reply(row, spec.response_field, "response", spec)
    _check_reply(reply, spec.response_field, row)
    if spec.label_field not in row.fields:
        raise _missing(row, spec.label_field, "label", "label_field", spec)
    value = row.fields[spec.label_field]
    key = str(value).strip().lower() if isinstance(value, (bool, int, str)) else None
    if key not in LABEL_VALUES:
        raise DataError(
            f"field '{spec.label_field}' (label) is {_found(value)}, expected true (desirable) or false (undesirable)",
            where=row.origin,
        )
    return UnpairedReply(_with_system(prompt, spec), reply, LABEL_VALUES[key])


def document_text(row: Row, spec: DatasetSpec) -> str:
    """A text row's fields joined by newlines (`title` + `content` for news corpora)."""
    parts = [_field_text(row, field, "text", "text_fields", spec) for field in spec.text_fields]
    return "\n".join(part for part in parts if part)


__all__ = [
    "ROLE_NAMES",
    "MultipleChoiceItem",
    "PreferencePair",
    "UnpairedReply",
    "document_text",
    "format_choices",
    "parse_multiple_choice",
    "parse_preference",
    "parse_prompt",
    "parse_unpaired",
    "row_to_messages",
]
