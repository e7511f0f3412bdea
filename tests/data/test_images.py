"""Image data: paths under the image root, bad images named, placeholders, preview counts."""

from __future__ import annotations

import pytest
from transformers import CLIPImageProcessor, DataCollatorForSeq2Seq

from tests.vision_assets import shape_rows
from tuneforge.config.schema import DatasetSpec
from tuneforge.data.images import (
    ImageCollator,
    ImageInputs,
    collapse_image_tokens,
    encode_image_row,
    image_row_messages,
)
from tuneforge.data.sources import BadRows, Row
from tuneforge.data.templates import IGNORE_INDEX, resolve_template
from tuneforge.errors import DataError


@pytest.fixture
def inputs(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = tokenizer.eos_token  # as load_tokenizer does
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tokenizer, ImageInputs("<image>", tokenizer.convert_tokens_to_ids("<image>"), 4, processor)


def _row(fields):
    return Row(fields, "data.json[0]")


def _spec(root, **settings):
    return DatasetSpec(path="data.json", format="llava", image_root=str(root), **settings)


def test_llava_row_is_masked_and_expanded(tmp_path, inputs):
    tokenizer, image_inputs = inputs
    image = shape_rows(tmp_path, 1, seed=0)[0]["image"]
    row = _row({"image": image, "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]})
    encoded = encode_image_row(row, _spec(tmp_path), tokenizer, resolve_template("qa", tokenizer), 64, image_inputs)
    example = encoded.examples[0]
    positions = [i for i, t in enumerate(example.input_ids) if t == image_inputs.image_token_id]
    assert len(positions) == 4 and positions == list(range(positions[0], positions[0] + 4))
    assert all(example.labels[i] == IGNORE_INDEX for i in positions)
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert trained.startswith("red")
    assert example.images == (str((tmp_path / image).resolve()),)
    ids, labels, counts = collapse_image_tokens(example.input_ids, example.labels, image_inputs)
    assert ids.count(image_inputs.image_token_id) == 1 and len(labels) == len(ids)
    assert counts == "4 image tokens (1 image)"
    padded = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    batch = ImageCollator(padded, image_inputs.processor)([{"input_ids": example.input_ids, "labels": example.labels, "images": list(example.images)}])
    assert tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)


def test_bad_images_are_errors_naming_row_and_path(tmp_path, inputs):
    tokenizer, image_inputs = inputs
    (tmp_path / "broken.png").write_bytes(b"not an image")
    template = resolve_template("qa", tokenizer)
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    for image, message in (("missing.png", "not found"), ("broken.png", "cannot be read"), ("../outside.png", "outside")):
        with pytest.raises(DataError, match=message) as caught:
            encode_image_row(_row({"image": image, "conversations": conversation}), _spec(tmp_path), tokenizer, template, 64, image_inputs)
        assert "data.json[0]" in str(caught.value)
    skipped = BadRows(skip=True)
    with pytest.raises(DataError) as caught:
        encode_image_row(_row({"image": "missing.png", "conversations": conversation}), _spec(tmp_path), tokenizer, template, 64, image_inputs)
    skipped.handle(caught.value)
    assert skipped.count == 1 and "missing.png" in skipped.reasons[0]


def test_placeholders_must_match_images_and_are_added_when_absent(tmp_path):
    spec = _spec(tmp_path)
    two = [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(DataError, match="2 '<image>' placeholder"):
        image_row_messages(_row({"conversations": two}), spec, "<image>", 3)
    none = [{"from": "human", "value": "Compare the frames."}, {"from": "gpt", "value": "x"}]
    messages = image_row_messages(_row({"conversations": none}), spec, "<image>", 3)
    assert messages[0]["content"] == "<image>\n<image>\n<image>\nCompare the frames."
    caption = DatasetSpec(path="c.jsonl", format="caption", caption_prompt="Describe.")
    assert image_row_messages(_row({"caption": "a red square"}), caption, "<image>", 1) == [
        {"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "a red square"}
    ]
