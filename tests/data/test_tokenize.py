import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from tests.data.conftest import expected_encoding
from tests.data.test_formats import JCQA_ROW
from tuneforge.config.schema import DatasetSpec
from tuneforge.data.sources import Row
from tuneforge.data.templates import encode_generation_prompt, resolve_template
from tuneforge.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    Example,
    encode_row,
    fit_length,
    pack_documents,
)

M = IGNORE_INDEX


def spec(**fields) -> DatasetSpec:
    return DatasetSpec(path="data.jsonl", **fields)


def test_instruction_row_exact_labels_with_eos(tokenizer):
    qa = spec(prompt_fields=["question"], response_field="answer")
    encoded = encode_row(Row({"question": "日本の首都は?", "answer": "東京です"}, "d:1"), qa, tokenizer,
                         resolve_template("qa", tokenizer), max_length=128)
    assert encoded.outcome == "ok" and len(encoded.examples) == 1
    example = encoded.examples[0]
    assert (example.input_ids, example.labels) == expected_encoding(
        tokenizer, [("<s>### Question:\n日本の首都は?\n\n### Answer:\n", False), ("東京です</s>", True)]
    )
    assert example.input_ids.count(tokenizer.bos_token_id) == 1
    assert example.labels[-1] == tokenizer.eos_token_id


def test_alpaca_instruction_row(tokenizer):
    encoded = encode_row(
        Row({"instruction": "Add.", "input": "2 3", "output": "5"}, "d:1"), spec(), tokenizer,
        resolve_template("alpaca", tokenizer), max_length=256,
    )
    example = encoded.examples[0]
    assert (example.input_ids, example.labels) == expected_encoding(
        tokenizer,
        [
            ("<s>Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.\n\n### Instruction:\nAdd.\n\n2 3\n\n### Response:\n", False),
            ("5</s>", True),
        ],
    )


def test_prompt_string_template_row(tokenizer):
    template = resolve_template("Q: {prompt}\nA:", tokenizer)
    encoded = encode_row(Row({"instruction": "Hi", "output": " Hello"}, "d:1"), spec(), tokenizer, template, 64)
    example = encoded.examples[0]
    assert (example.input_ids, example.labels) == expected_encoding(
        tokenizer, [("<s>Q: Hi\nA:", False), (" Hello</s>", True)]
    )


def test_japanese_multiple_choice_row_with_the_tokenizer_template(chat_tokenizer):
    template = resolve_template("auto", chat_tokenizer)
    encoded = encode_row(Row(JCQA_ROW, "jcqa.json:1"), spec(format="multiple_choice"), chat_tokenizer, template, 256)
    example = encoded.examples[0]
    user = f"{JCQA_ROW['question']}\n0. 掲示板\n1. パソコン\n2. マザーボード\n3. ハードディスク\n4. まな板"
    assert (example.input_ids, example.labels) == expected_encoding(
        chat_tokenizer,
        [
            (f"<s><|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False),
            ("マザーボード<|im_end|>", True),
            ("\n", False),
        ],
    )


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_sharegpt_chat_row_both_train_on_modes(chat_tokenizer, train_on):
    record = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "See you"},
        ]
    }
    chat = spec(format="chat", messages_field="conversations", train_on=train_on, system_prompt="Be kind.")
    encoded = encode_row(Row(record, "c:1"), chat, chat_tokenizer, resolve_template("chatml", chat_tokenizer), 256)
    example = encoded.examples[0]
    assert (example.input_ids, example.labels) == expected_encoding(
        chat_tokenizer,
        [
            ("<s><|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\n", False),
            ("Hello<|im_end|>", train_on == "all_assistant"),
            ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
            ("See you<|im_end|>", True),
        ],
    )


# Length policy (PITFALLS 4): exact outcomes on tiny sequences.
IDS = [1, 2, 3, 4, 5, 6, 7]
LABELS = [M, M, M, 4, 5, 6, 7]


def test_short_sequence_is_kept_whole():
    assert fit_length(IDS, LABELS, 7, "drop") == Encoded([Example(IDS, LABELS)], "ok")


def test_truncate_cuts_the_end():
    assert fit_length(IDS, LABELS, 5, "truncate") == Encoded([Example(IDS[:5], LABELS[:5])], "truncated")


def test_drop_drops():
    assert fit_length(IDS, LABELS, 6, "drop") == Encoded([], "dropped")


def test_split_keeps_windows_with_trained_tokens():
    assert fit_length(IDS, LABELS, 3, "split") == Encoded(
        [Example([4, 5, 6], [4, 5, 6])], "split"
    )  # [1, 2, 3] has no trained token; [7] has one only at position 0, which never counts
    assert fit_length(IDS, LABELS, 2, "split") == Encoded(
        [Example([3, 4], [M, 4]), Example([5, 6], [5, 6])], "split"
    )


def test_split_with_no_countable_trained_token_is_dropped():
    # [1, 2] is untrained; 3 is trained but first in its window, so it predicts nothing.
    assert fit_length([1, 2, 3], [M, M, 3], 2, "split") == Encoded([], "dropped")


@pytest.mark.parametrize("on_too_long", ["truncate", "drop"])
def test_row_whose_prompt_fills_max_length_is_dropped(tokenizer, on_too_long):
    template = resolve_template("qa", tokenizer)
    row = Row({"question": "a very long question " * 20, "answer": "x"}, "d:9")
    qa = spec(prompt_fields=["question"], response_field="answer", on_too_long=on_too_long)
    prompt = [{"role": "user", "content": row.fields["question"]}]
    prompt_len = len(encode_generation_prompt(tokenizer, template, prompt))
    assert encode_row(row, qa, tokenizer, template, max_length=prompt_len) == Encoded([], "dropped")


def test_split_row_with_long_prompt_keeps_only_windows_that_train(tokenizer):
    template = resolve_template("qa", tokenizer)
    row = Row({"question": "a very long question " * 20, "answer": "x"}, "d:9")
    qa = spec(prompt_fields=["question"], response_field="answer", on_too_long="split")
    prompt = [{"role": "user", "content": row.fields["question"]}]
    prompt_len = len(encode_generation_prompt(tokenizer, template, prompt))
    encoded = encode_row(row, qa, tokenizer, template, max_length=prompt_len)
    x = tokenizer("x", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert encoded == Encoded([Example(x + [eos], x + [eos])], "split")


def test_truncated_row_keeps_the_prompt_and_a_trained_prefix(tokenizer):
    template = resolve_template("qa", tokenizer)
    qa = spec(prompt_fields=["question"], response_field="answer")
    row = Row({"question": "short", "answer": "word " * 50}, "d:1")
    prompt_len = len(encode_generation_prompt(tokenizer, template, [{"role": "user", "content": "short"}]))
    encoded = encode_row(row, qa, tokenizer, template, max_length=prompt_len + 5)
    assert encoded.outcome == "truncated"
    (example,) = encoded.examples
    assert len(example.input_ids) == prompt_len + 5
    assert example.labels == [M] * prompt_len + example.input_ids[prompt_len:]


def test_split_row_windows_cover_the_sequence_in_order(tokenizer):
    template = resolve_template("qa", tokenizer)
    qa = spec(prompt_fields=["question"], response_field="answer", on_too_long="split")
    row = Row({"question": "q", "answer": "The quick brown fox jumps over the lazy dog. " * 4}, "d:1")
    whole = encode_row(row, spec(prompt_fields=["question"], response_field="answer"), tokenizer, template, 1024)
    encoded = encode_row(row, qa, tokenizer, template, max_length=16)
    assert encoded.outcome == "split" and len(encoded.examples) > 1
    assert all(len(e.input_ids) <= 16 for e in encoded.examples)
    assert [t for e in encoded.examples for t in e.input_ids] == whole.examples[0].input_ids
    assert [t for e in encoded.examples for t in e.labels] == whole.examples[0].labels


def test_pad_equal_to_eos_keeps_the_eos_label_through_the_collator(pad_eos_tokenizer):
    tokenizer = pad_eos_tokenizer
    template = resolve_template("qa", tokenizer)
    qa = spec(prompt_fields=["question"], response_field="answer")
    short = encode_row(Row({"question": "a", "answer": "b"}, "d:1"), qa, tokenizer, template, 64).examples[0]
    long = encode_row(Row({"question": "a longer question", "answer": "a longer answer"}, "d:2"), qa,
                      tokenizer, template, 64).examples[0]
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)])
    pad = batch["input_ids"].shape[1] - len(short.input_ids)
    assert pad > 0
    assert batch["labels"][0, len(short.input_ids):].tolist() == [IGNORE_INDEX] * pad
    # The real EOS of the short example keeps its label although pad == eos.
    assert batch["labels"][0, len(short.input_ids) - 1].item() == tokenizer.eos_token_id
    assert torch.equal(batch["labels"][1], torch.tensor(long.labels))


def test_pack_documents_cuts_fixed_blocks_with_eos_between(tokenizer):
    docs = ["深圳报告首例肺炎确诊病例", "The quick brown fox jumps over the lazy dog."]
    blocks = pack_documents(tokenizer, docs, block_size=8)
    stream = []
    for doc in docs:
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for b in blocks for t in b.input_ids] == stream
    assert all(len(b.input_ids) == 8 for b in blocks[:-1])
    assert all(b.labels == b.input_ids for b in blocks)
