import torch
from transformers import DataCollatorForSeq2Seq

from tuneforge.config.schema import DatasetSpec
from tuneforge.data import (
    IGNORE_INDEX,
    Row,
    build_instruction_example,
    encode_prompt,
    instruction_texts,
    pack_documents,
)


def test_labels_mask_prompt_and_keep_response_and_eos(tokenizer):
    spec = DatasetSpec(path="x", prompt_fields=["question"], response_field="answer")
    prompt, response = instruction_texts(Row({"question": "日本の首都は?", "answer": "東京です"}, "x:1"), spec)
    assert prompt == "### Question:\n日本の首都は?\n\n### Answer:\n"
    example = build_instruction_example(tokenizer, prompt, response, max_length=128)
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
    assert example.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(response_ids) == "東京です"


def test_training_prompt_equals_generation_prompt(tokenizer):
    prompt = "### Question:\nWhat is Lamini?\n\n### Answer:\n"
    example = build_instruction_example(tokenizer, prompt, "A library.", max_length=128)
    generation_ids = encode_prompt(tokenizer, prompt)
    assert example.input_ids[: len(generation_ids)] == generation_ids
    assert example.labels[len(generation_ids) - 1] == IGNORE_INDEX
    assert example.labels[len(generation_ids)] != IGNORE_INDEX


def test_padding_is_masked_by_position_even_when_pad_is_eos(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token  # the pitfall: pad == eos
    short = build_instruction_example(tokenizer, "Q: a\nA: ", "b", max_length=64)
    long = build_instruction_example(tokenizer, "Q: a longer question\nA: ", "a longer answer", max_length=64)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    batch = collator(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)]
    )
    width = batch["input_ids"].shape[1]
    pad = width - len(short.input_ids)
    assert pad > 0
    assert batch["labels"][0, len(short.input_ids):].tolist() == [IGNORE_INDEX] * pad
    assert batch["attention_mask"][0].tolist() == [1] * len(short.input_ids) + [0] * pad
    # The real EOS of the short example keeps its label although pad == eos.
    assert batch["labels"][0, len(short.input_ids) - 1].item() == tokenizer.eos_token_id
    assert torch.equal(batch["labels"][1], torch.tensor(long.labels))


def test_long_response_is_truncated_and_long_prompt_dropped(tokenizer):
    prompt = "### Question:\nshort\n\n### Answer:\n"
    n_prompt = len(encode_prompt(tokenizer, prompt))
    cut = build_instruction_example(tokenizer, prompt, "word " * 50, max_length=n_prompt + 5)
    assert cut.truncated and len(cut.input_ids) == n_prompt + 5
    assert sum(label != IGNORE_INDEX for label in cut.labels) == 5
    assert build_instruction_example(tokenizer, prompt, "x", max_length=n_prompt) is None


def test_pack_documents_cuts_fixed_blocks_with_eos_between(tokenizer):
    docs = ["深圳报告首例肺炎确诊病例", "The quick brown fox jumps over the lazy dog."]
    blocks = pack_documents(tokenizer, docs, block_size=8)
    stream = []
    for doc in docs:
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for b in blocks for t in b.input_ids] == stream
    assert all(len(b.input_ids) == 8 for b in blocks[:-1])
    assert all(b.labels == b.input_ids for b in blocks)
