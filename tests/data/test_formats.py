import pytest

from tuneforge.config.schema import DatasetSpec
from tuneforge.data.formats import (
    MultipleChoiceItem,
    PreferencePair,
    document_text,
    parse_multiple_choice,
    parse_preference,
    row_to_messages,
)
from tuneforge.data.sources import Row
from tuneforge.errors import DataError

JCQA_ROW = {
    "q_id": 8939,
    "question": "電子機器で使用される最も主要な電子回路基板の事をなんと言う？",
    "choice0": "掲示板",
    "choice1": "パソコン",
    "choice2": "マザーボード",
    "choice3": "ハードディスク",
    "choice4": "まな板",
    "label": 2,
}


def spec(**fields) -> DatasetSpec:
    return DatasetSpec(path="data.jsonl", **fields)


def row(fields: dict, line: int = 1) -> Row:
    return Row(fields, f"data.jsonl:{line}")


def test_instruction_joins_prompt_fields_skipping_empty_ones():
    messages = row_to_messages(
        row({"instruction": "Translate.", "input": "", "output": "Bonjour"}), spec()
    )
    assert messages == [
        {"role": "user", "content": "Translate."},
        {"role": "assistant", "content": "Bonjour"},
    ]
    messages = row_to_messages(
        row({"instruction": "Translate.", "input": "Hello", "output": "Bonjour"}),
        spec(system_prompt="You translate."),
    )
    assert messages == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate.\n\nHello"},
        {"role": "assistant", "content": "Bonjour"},
    ]


def test_default_prompt_fields_tolerate_a_missing_input_but_configured_ones_do_not():
    record = {"instruction": "Translate.", "output": "Bonjour"}
    assert row_to_messages(row(record), spec())[0] == {"role": "user", "content": "Translate."}
    with pytest.raises(DataError, match="missing field 'input' \\(prompt\\); the row has: instruction, output"):
        row_to_messages(row(record), spec(prompt_fields=["instruction", "input"]))


def test_instruction_numbers_are_text():
    messages = row_to_messages(
        row({"question": "after 41", "answer": 42}), spec(prompt_fields=["question"], response_field="answer")
    )
    assert messages[-1] == {"role": "assistant", "content": "42"}


def test_chat_openai_style_multi_turn_and_system_prompt():
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    assert row_to_messages(row({"messages": turns}), spec(format="chat")) == turns
    with_system = row_to_messages(row({"messages": turns}), spec(format="chat", system_prompt="Be kind."))
    assert with_system == [{"role": "system", "content": "Be kind."}, *turns]
    own_system = [{"role": "system", "content": "Own."}, *turns]
    assert row_to_messages(row({"messages": own_system}), spec(format="chat", system_prompt="Be kind.")) == own_system


def test_chat_sharegpt_style_is_mapped():
    record = {
        "conversations": [
            {"from": "system", "value": "Sys."},
            {"from": "human", "value": "日本の首都は?"},
            {"from": "gpt", "value": "東京です。"},
        ]
    }
    messages = row_to_messages(row(record), spec(format="chat", messages_field="conversations"))
    assert messages == [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "日本の首都は?"},
        {"role": "assistant", "content": "東京です。"},
    ]


def test_multiple_choice_from_jglue_choice_fields():
    item = parse_multiple_choice(row(JCQA_ROW), spec(format="multiple_choice"))
    assert item == MultipleChoiceItem(
        question=JCQA_ROW["question"],
        choices=["掲示板", "パソコン", "マザーボード", "ハードディスク", "まな板"],
        label=2,
    )
    messages = row_to_messages(row(JCQA_ROW), spec(format="multiple_choice"))
    assert messages == [
        {
            "role": "user",
            "content": f"{JCQA_ROW['question']}\n0. 掲示板\n1. パソコン\n2. マザーボード\n3. ハードディスク\n4. まな板",
        },
        {"role": "assistant", "content": "マザーボード"},
    ]


def test_multiple_choice_from_a_list_field_and_text_label():
    record = {"q": "2 + 2?", "options": ["3", "4"], "answer": "1"}
    item = parse_multiple_choice(
        row(record), spec(format="multiple_choice", prompt_fields=["q"], choices_field="options", label_field="answer")
    )
    assert item == MultipleChoiceItem("2 + 2?", ["3", "4"], 1)


def test_preference_with_text_fields():
    record = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    pair = parse_preference(row(record), spec(format="preference", system_prompt="Be kind."))
    assert pair == PreferencePair(
        prompt=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        chosen=[{"role": "assistant", "content": "Hello!"}],
        rejected=[{"role": "assistant", "content": "Go away."}],
    )


def test_preference_conversational_with_explicit_and_implicit_prompt():
    user = {"role": "user", "content": "Hi"}
    good = {"role": "assistant", "content": "Hello!"}
    bad = {"role": "assistant", "content": "Go away."}
    explicit = parse_preference(row({"prompt": [user], "chosen": [good], "rejected": [bad]}), spec(format="preference"))
    implicit = parse_preference(row({"chosen": [user, good], "rejected": [user, bad]}), spec(format="preference"))
    assert explicit == implicit == PreferencePair([user], [good], [bad])


def test_document_text_joins_fields():
    record = {"title": "标题", "content": "内容", "url": "x"}
    assert document_text(row(record), spec(format="text", text_fields=["title", "content"])) == "标题\n内容"


# Bad input: a DataError naming the row, the field, what was expected and what was found.
@pytest.mark.parametrize(
    "fmt, record, settings, expected",
    [
        ("instruction", {"question": "q", "answer": "a"}, {},
         "data.jsonl:1: missing field 'instruction' (prompt); the row has: answer, question"),
        ("instruction", {"instruction": "q"}, {},
         "missing field 'output' (response); the row has: instruction"),
        ("instruction", {"instruction": ["q"], "output": "a"}, {},
         "field 'instruction' (prompt) is a list, expected text; found ['q']"),
        ("instruction", {"instruction": "", "input": " ", "output": "a"}, {},
         "the prompt is empty: field(s) instruction, input hold no text"),
        ("instruction", {"instruction": "q", "output": ""}, {}, "field 'output' (response) is empty"),
        ("chat", {"conversations": []}, {},
         "missing field 'messages' (conversation); the row has: conversations"),
        ("chat", {"messages": "Hi"}, {}, "field 'messages' is a str, expected a list of turns"),
        ("chat", {"messages": [{"role": "user", "content": "Hi"}]}, {},
         "field 'messages' has no assistant turn (roles: user)"),
        ("chat", {"messages": [{"speaker": "user", "text": "Hi"}]}, {},
         "turn 0 of 'messages' has keys speaker, text, expected role/content (OpenAI) or from/value"),
        ("chat", {"messages": [{"role": "tool", "content": "{}"}]}, {},
         "turn 0 of 'messages' has role 'tool', expected one of system, user, human"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, {},
         "turn 0 of 'messages' has content of type list, expected text"),
        ("chat", {"messages": ["Hi"]}, {}, "turn 0 of 'messages' is a str, expected an object"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "label": 2}, {},
         "field 'label' (label) is 2, out of range for 2 choices (expected 0..1)"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "label": -1}, {},
         "out of range for 2 choices"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "label": True}, {},
         "field 'label' (label) is True, expected the index of the right choice"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "label": "B"}, {},
         "field 'label' (label) is 'B', expected the index"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"]}, {},
         "missing field 'label' (label); the row has: choices, question"),
        ("multiple_choice", {"question": "q", "label": 0}, {},
         "missing field 'choices' (choices), and no choice0, choice1, ... fields; the row has: label, question"),
        ("multiple_choice", {"question": "q", "choices": "a|b", "label": 0}, {},
         "field 'choices' (choices) is a str, expected a list"),
        ("multiple_choice", {"question": "q", "choice0": "a", "label": 0}, {}, "expected at least 2 choices, found 1"),
        ("multiple_choice", {"question": "q", "choices": ["a", {"b": 1}], "label": 0}, {},
         "field 'choices[1]' (choice) is a dict, expected text"),
        ("text", {"text": "t"}, {}, "format 'text' rows are not conversations"),
    ],
)
def test_bad_rows_raise_data_errors_naming_row_and_field(fmt, record, settings, expected):
    with pytest.raises(DataError) as info:
        row_to_messages(row(record), spec(format=fmt, **settings))
    assert str(info.value).startswith("data.jsonl:1: ")
    assert expected in str(info.value)


def test_missing_field_hint_names_the_setting():
    with pytest.raises(DataError) as info:
        row_to_messages(row({"q": "x", "a": "y"}), spec(prompt_fields=["q"]))
    assert info.value.hint is not None and "response_field" in info.value.hint


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "fields 'chosen' and 'rejected' are identical"),
        ({"prompt": "Hi", "chosen": "Hello"}, "missing field 'rejected' (rejected); the row has: chosen, prompt"),
        ({"prompt": "Hi", "chosen": "", "rejected": "No"}, "field 'chosen' has no reply"),
        ({"prompt": "", "chosen": "A", "rejected": "B"}, "the prompt is empty"),
        ({"chosen": "A", "rejected": "B"}, "missing field 'prompt' (prompt); the row has: chosen, rejected"),
        ({"prompt": "Hi", "chosen": 3.5j, "rejected": "B"}, "field 'chosen' (chosen) is a complex, expected text"),
        (
            {
                "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}],
            },
            "differ before the reply (at turn 0)",
        ),
    ],
)
def test_bad_preference_rows(record, expected):
    with pytest.raises(DataError) as info:
        parse_preference(row(record, 4), spec(format="preference"))
    assert str(info.value).startswith("data.jsonl:4: ") and expected in str(info.value)
