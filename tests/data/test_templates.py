import json

import pytest

from tests.data.conftest import CHATML_JINJA, conversation, expected_encoding
from tuneforge.data.templates import (
    IGNORE_INDEX,
    Template,
    encode_conversation,
    encode_generation_prompt,
    encode_prompt_for_generation,
    render,
    resolve_template,
    template_from_metadata,
    template_to_metadata,
)
from tuneforge.errors import ConfigError, DataError

TWO_TURNS = conversation("Hi", "Hello", "日本の首都は?", "東京です", system="Be brief.")
PROMPT_STRING = "Q: {prompt}\nA: "

RENDERED = {
    "qa": "<s>Be brief.\n\n### Question:\nHi\n\n### Answer:\nHello</s>\n\n"
    "### Question:\n日本の首都は?\n\n### Answer:\n東京です</s>",
    "alpaca": "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n"
    "### Instruction:\n日本の首都は?\n\n### Response:\n東京です</s>",
    "plain": "<s>Be brief.\n\nHiHello</s>日本の首都は?東京です</s>",
    PROMPT_STRING: "<s>Be brief.\n\nQ: Hi\nA: Hello</s>Q: 日本の首都は?\nA: 東京です</s>",
    "chatml": "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n日本の首都は?<|im_end|>\n"
    "<|im_start|>assistant\n東京です<|im_end|>",
    "llama-3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n日本の首都は?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n東京です<|eot_id|>",
}

# Every kind of template, and the tokenizer fixture it needs.
ALL_TEMPLATES = [
    ("qa", "tokenizer"),
    ("alpaca", "tokenizer"),
    ("plain", "tokenizer"),
    (PROMPT_STRING, "tokenizer"),
    ("auto", "tokenizer"),
    ("qa", "no_bos_tokenizer"),
    ("chatml", "chat_tokenizer"),
    ("llama-3", "chat_tokenizer"),
    ("tokenizer", "chat_tokenizer"),
    ("auto", "chat_tokenizer"),
    (CHATML_JINJA, "tokenizer_with_markers"),
]


@pytest.fixture
def tokenizer_with_markers(chat_tokenizer):
    return chat_tokenizer


def _get(request, fixture: str):
    return request.getfixturevalue(fixture)


@pytest.mark.parametrize("name", list(RENDERED))
def test_builtin_templates_render_two_turns(name, request):
    tokenizer = _get(request, "chat_tokenizer" if name in ("chatml", "llama-3") else "tokenizer")
    template = resolve_template(name, tokenizer)
    assert render(tokenizer, template, TWO_TURNS, add_generation_prompt=False) == RENDERED[name]


def test_alpaca_preamble_is_the_default_system_message(tokenizer):
    template = resolve_template("alpaca", tokenizer)
    text = render(tokenizer, template, conversation("Add 2 and 3."), add_generation_prompt=True)
    assert text == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_qa_labels_exact_for_both_train_on_modes(tokenizer, train_on):
    template = resolve_template("qa", tokenizer)
    all_turns = train_on == "all_assistant"
    expected = expected_encoding(
        tokenizer,
        [
            ("<s>Be brief.\n\n### Question:\nHi\n\n### Answer:\n", False),
            ("Hello</s>", all_turns),
            ("\n\n### Question:\n日本の首都は?\n\n### Answer:\n", False),
            ("東京です</s>", True),
        ],
    )
    assert encode_conversation(tokenizer, template, TWO_TURNS, train_on=train_on) == expected


def test_chatml_trains_im_end_which_is_not_eos(chat_tokenizer):
    template = resolve_template("chatml", chat_tokenizer)
    input_ids, labels = encode_conversation(chat_tokenizer, template, TWO_TURNS)
    assert (input_ids, labels) == expected_encoding(
        chat_tokenizer,
        [
            ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\n", False),
            ("Hello<|im_end|>", True),
            ("\n<|im_start|>user\n日本の首都は?<|im_end|>\n<|im_start|>assistant\n", False),
            ("東京です<|im_end|>", True),
        ],
    )
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != chat_tokenizer.eos_token_id
    assert [label for label in labels if label == im_end] == [im_end, im_end]
    assert template.stop_token_ids(chat_tokenizer) == [im_end, chat_tokenizer.eos_token_id]


def test_llama3_labels_exact_and_one_begin_of_text(chat_tokenizer):
    template = resolve_template("llama-3", chat_tokenizer)
    input_ids, labels = encode_conversation(chat_tokenizer, template, TWO_TURNS, train_on="last_assistant")
    assert (input_ids, labels) == expected_encoding(
        chat_tokenizer,
        [
            (RENDERED["llama-3"][: RENDERED["llama-3"].rindex("東京です")], False),
            ("東京です<|eot_id|>", True),
        ],
    )
    begin = chat_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert input_ids[0] == begin and input_ids.count(begin) == 1
    assert chat_tokenizer.bos_token_id not in input_ids  # the template's BOS replaces "<s>"


def test_tokenizer_template_masks_and_matches_apply_chat_template(chat_tokenizer):
    template = resolve_template("auto", chat_tokenizer)
    assert template.name == "tokenizer" and template.end_of_turn == "<|im_end|>"
    input_ids, labels = encode_conversation(chat_tokenizer, template, TWO_TURNS)
    assert (input_ids, labels) == expected_encoding(
        chat_tokenizer,
        [
            ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\n", False),
            ("Hello<|im_end|>", True),
            ("\n<|im_start|>user\n日本の首都は?<|im_end|>\n<|im_start|>assistant\n", False),
            ("東京です<|im_end|>", True),
            ("\n", False),  # the template's newline after <|im_end|> is context, not trained
        ],
    )
    # PITFALLS 2: the template has {{ bos_token }} and the tokenizer adds BOS on encode too.
    for history in (TWO_TURNS[:2], TWO_TURNS[:4]):
        reference = chat_tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        reference_ids = list(reference["input_ids"])
        assert input_ids[: len(reference_ids)] == reference_ids
        assert reference_ids.count(chat_tokenizer.bos_token_id) == 1
    assert input_ids.count(chat_tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("name, fixture", ALL_TEMPLATES)
def test_generation_prompt_is_the_training_prefix_for_every_template(name, fixture, request):
    tokenizer = _get(request, fixture)
    template = resolve_template(name, tokenizer)
    for history in (TWO_TURNS[:2], TWO_TURNS[:4]):
        prompt_ids = encode_generation_prompt(tokenizer, template, history)
        reply = {"role": "assistant", "content": "答えは42です。"}
        input_ids, labels = encode_conversation(tokenizer, template, [*history, reply])
        assert input_ids[: len(prompt_ids)] == prompt_ids
        assert labels[len(prompt_ids) - 1] == IGNORE_INDEX
        assert labels[len(prompt_ids)] == input_ids[len(prompt_ids)]  # the reply starts trained
        # The trained tail is the reply and its terminator, and nothing else.
        trained = [i for i, label in zip(input_ids, labels) if label != IGNORE_INDEX]
        assert trained[-1] == template.end_of_turn_id(tokenizer)
    bos_count = input_ids.count(tokenizer.bos_token_id)
    expected_bos = 0 if fixture == "no_bos_tokenizer" or name == "llama-3" else 1
    assert bos_count == expected_bos


def test_prompt_for_generation_with_system_prompt(tokenizer):
    template = resolve_template("qa", tokenizer)
    ids = encode_prompt_for_generation(tokenizer, template, "Hi", system_prompt="Be brief.")
    assert tokenizer.decode(ids) == "<s>Be brief.\n\n### Question:\nHi\n\n### Answer:\n"
    assert ids == encode_generation_prompt(tokenizer, template, TWO_TURNS[:2])


def test_no_bos_tokenizer_gets_no_bos(no_bos_tokenizer):
    template = resolve_template("qa", no_bos_tokenizer)
    ids = encode_prompt_for_generation(no_bos_tokenizer, template, "Hi")
    assert no_bos_tokenizer.decode(ids) == "### Question:\nHi\n\n### Answer:\n"


def test_prompt_string_with_its_own_bos_gets_exactly_one(tokenizer):
    template = resolve_template("<s>Q: {prompt}\nA:", tokenizer)
    ids = encode_prompt_for_generation(tokenizer, template, "Hi", system_prompt="Sys.")
    assert tokenizer.decode(ids) == "<s>Sys.\n\nQ: Hi\nA:"
    assert ids.count(tokenizer.bos_token_id) == 1


def test_prompt_string_keeps_quotes_backslashes_braces_and_unicode(tokenizer):
    text = 'Say "{prompt}" \\ {x} \' 😀 ね\t\n-> '
    template = resolve_template(text, tokenizer)
    rendered = render(tokenizer, template, conversation("x"), add_generation_prompt=True)
    assert rendered == "<s>" + text.replace("{prompt}", "x")


@pytest.mark.parametrize("name, fixture", ALL_TEMPLATES)
def test_metadata_round_trip_rebuilds_the_template(name, fixture, request):
    tokenizer = _get(request, fixture)
    template = resolve_template(name, tokenizer)
    saved = json.loads(json.dumps(template_to_metadata(template)))
    rebuilt = template_from_metadata(saved)
    assert rebuilt == template
    assert encode_conversation(tokenizer, rebuilt, TWO_TURNS) == encode_conversation(tokenizer, template, TWO_TURNS)


def test_unreadable_metadata_is_a_data_error():
    with pytest.raises(DataError, match="unreadable template record"):
        template_from_metadata({"name": "qa", "chat_template": "x"})


def test_auto_falls_back_to_qa_without_a_chat_template(tokenizer):
    assert resolve_template("auto", tokenizer) == resolve_template("qa", tokenizer)


@pytest.mark.parametrize(
    "name, message",
    [
        ("tokenizer", "has no chat template"),
        ("chatml", "needs '<|im_start|>' as one token"),
        ("llama-3", "needs '<|begin_of_text|>' as one token"),
        ("vicuna", "unknown template 'vicuna'"),
        ("{prompt} and {prompt}", "exactly once, found 2"),
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "no end-of-turn or EOS token"),
        ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
         "{% endfor %}{{ eos_token }}", "does not render assistant messages"),
        ("{{ 'x' + eos_token }}", "does not render user messages"),
        ("{% for m in messages %}", "fails to render"),
    ],
)
def test_template_errors_name_the_problem(tokenizer, name, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("|", r"\|")):
        resolve_template(name, tokenizer)


# PITFALLS 3: a template can mask everything or nothing; both stop preprocessing.
def test_template_with_zero_trained_tokens_names_the_row(tokenizer):
    drops_replies = Template(
        name="broken",
        chat_template="{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ m['content'] }}{% endif %}{% endfor %}",
        end_of_turn="</s>",
    )
    with pytest.raises(DataError, match=r"data\.jsonl:7: .*renders nothing for the assistant"):
        encode_conversation(tokenizer, drops_replies, conversation("Hi", "Hello"), origin="data.jsonl:7")


def test_template_that_trains_every_token_names_the_row(tokenizer):
    replies_only = Template(
        name="broken",
        chat_template="{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
        end_of_turn="</s>",
    )
    with pytest.raises(DataError, match=r"data\.jsonl:3: .*trains every token"):
        encode_conversation(tokenizer, replies_only, conversation("Hi", "Hello"), origin="data.jsonl:3")


def test_conversation_without_assistant_turn_is_an_error(tokenizer):
    with pytest.raises(DataError, match=r"x\.jsonl:2: .*no assistant turn"):
        encode_conversation(tokenizer, resolve_template("qa", tokenizer), conversation("Hi"), origin="x.jsonl:2")


def test_history_rewriting_template_needs_last_assistant(chat_tokenizer):
    # Like Qwen3: reasoning is dropped from earlier assistant turns once a later turn follows.
    drops_history_reasoning = (
        "{% for m in messages %}{% set content = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}"
        "{% set content = content.split('</think>')[-1] %}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    template = resolve_template(drops_history_reasoning, chat_tokenizer)
    messages = conversation("Hi", "<think>greet</think>Hello", "Bye", "<think>part</think>Bye")
    with pytest.raises(DataError, match="last_assistant"):
        encode_conversation(chat_tokenizer, template, messages, origin="r:1")
    input_ids, labels = encode_conversation(chat_tokenizer, template, messages, train_on="last_assistant")
    trained = chat_tokenizer.decode([i for i, label in zip(input_ids, labels) if label != IGNORE_INDEX])
    assert trained == "<think>part</think>Bye<|im_end|>"
    prompt_ids = encode_generation_prompt(chat_tokenizer, template, messages[:-1])
    assert input_ids[: len(prompt_ids)] == prompt_ids


def test_pad_equal_to_eos_keeps_the_terminator_label(pad_eos_tokenizer):
    template = resolve_template("qa", pad_eos_tokenizer)
    input_ids, labels = encode_conversation(pad_eos_tokenizer, template, TWO_TURNS)
    eos = pad_eos_tokenizer.eos_token_id
    assert eos == pad_eos_tokenizer.pad_token_id
    assert input_ids[-1] == eos and labels[-1] == eos
    assert [label for label in labels if label == eos] == [eos, eos]  # both turns' terminators
