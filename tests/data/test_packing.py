"""Packing: exact rows and batches on tiny inputs, and packed == unpacked on real tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tuneforge.data.images import ImageExample
from tuneforge.data.packing import (
    PackedCollator,
    build_packed_dataset,
    pack_examples,
    packing_efficiency,
    padded_efficiency,
    split_packed_row,
)
from tuneforge.data.tokenize import IGNORE_INDEX, Example
from tuneforge.models.attention import register_varlen_attention

# --- pack_examples ---------------------------------------------------------------------------


def test_best_fit_decreasing_exact_groups():
    # Longest first: 8 opens row 0 (room 2), 6 opens row 1 (room 4), 3 joins row 1 (room 1),
    # the second 3 opens row 2, and 1 takes the tightest fit, row 1 (first fit would pick row 0).
    assert pack_examples([1, 8, 6, 3, 3], max_length=10) == [[1], [2, 3, 0], [4]]
    assert pack_examples([5, 3, 8, 2, 4], max_length=10) == [[2, 3], [0, 4], [1]]
    assert pack_examples([4, 4, 4], max_length=4) == [[0], [1], [2]]
    assert pack_examples([], max_length=4) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 16), max_size=40), st.integers(16, 40))
def test_every_example_once_and_no_row_over_max_length(lengths, max_length):
    groups = pack_examples(lengths, max_length)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in group) <= max_length for group in groups)
    assert pack_examples(lengths, max_length) == groups  # deterministic
    # Best fit opens a row only for an example no open row can take, so at most one row ends
    # half full or less.
    assert sum(2 * sum(lengths[i] for i in group) <= max_length for group in groups) <= 1


@pytest.mark.parametrize("lengths", [[3, 11], [0, 2]])
def test_rejects_examples_that_do_not_fit(lengths):
    with pytest.raises(ValueError, match=r"example \d has \d+ tokens"):
        pack_examples(lengths, max_length=10)


def test_efficiencies_exact():
    lengths = [5, 3, 8, 2, 4]
    groups = pack_examples(lengths, max_length=10)
    assert packing_efficiency(lengths, groups, max_length=10) == pytest.approx(22 / 30)
    # Batches [5, 3] -> 2 * 5, [8, 2] -> 2 * 8, [4] -> 4.
    assert padded_efficiency(lengths, batch_size=2) == pytest.approx(22 / 30)
    assert padded_efficiency(lengths, batch_size=5) == pytest.approx(22 / 40)


# --- rows and batches ------------------------------------------------------------------------


def _example(ids: list[int], prompt: int) -> Example:
    return Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:])


def test_build_packed_dataset_rows_and_stats():
    examples = [_example([1, 2, 3], 1), _example([4, 5, 6, 7, 8], 2), _example([9, 10], 1)]
    dataset, stats = build_packed_dataset(examples, max_length=6, baseline_batch_size=3)
    # Longest first: [4..8] opens row 0 (room 1); [1, 2, 3] opens row 1 (room 3); [9, 10] joins row 1.
    assert dataset.column_names == ["input_ids", "labels", "position_ids"]
    assert dataset[0] == {
        "input_ids": [4, 5, 6, 7, 8],
        "labels": [-100, -100, 6, 7, 8],
        "position_ids": [0, 1, 2, 3, 4],
    }
    assert dataset[1] == {
        "input_ids": [1, 2, 3, 9, 10],
        "labels": [-100, 2, 3, -100, 10],
        "position_ids": [0, 1, 2, 0, 1],
    }
    assert (stats.examples, stats.rows, stats.tokens) == (3, 2, 10)
    assert stats.efficiency == pytest.approx(10 / 12)
    assert stats.padded_efficiency == pytest.approx(10 / 15)
    assert "3 examples -> 2 rows" in stats.describe()


def test_image_paths_travel_with_their_examples_in_token_order():
    examples = [
        ImageExample([1, 2, 3], [-100, 2, 3], ("a.png",)),
        _example([4, 5, 6, 7, 8], 2),  # text in a mixture with image data: no images
        ImageExample([9, 10], [-100, 10], ("b.png", "c.png")),
    ]
    dataset, stats = build_packed_dataset(examples, max_length=6)
    # As in the test above: [4..8] alone, then [1, 2, 3] followed by [9, 10].
    assert dataset.column_names == ["input_ids", "labels", "images", "position_ids"]
    assert dataset["input_ids"] == [[4, 5, 6, 7, 8], [1, 2, 3, 9, 10]]
    assert dataset["images"] == [[], ["a.png", "b.png", "c.png"]]
    assert (stats.examples, stats.rows, stats.tokens) == (3, 2, 10)


def test_collator_flattens_rows_into_one_padding_free_sequence():
    rows = [
        {"input_ids": [1, 2, 3, 9, 10], "labels": [-100, 2, 3, -100, 10], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [4, 5, 6], "labels": [4, 5, 6], "position_ids": [0, 1, 2]},
    ]
    batch = PackedCollator()(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 10, 4, 5, 6]]
    # Each example's first label is -100: the last token of one example predicts nothing.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 10, -100, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 8]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert batch["use_cache"] is False
    assert "attention_mask" not in batch


def test_unpacked_rows_are_single_examples():
    assert split_packed_row({"input_ids": [1, 2], "labels": [1, 2]}) == [{"input_ids": [1, 2], "labels": [1, 2]}]
    with pytest.raises(ValueError, match="must start at 0"):
        split_packed_row({"input_ids": [1, 2], "labels": [1, 2], "position_ids": [1, 2]})


# --- packed == unpacked (PITFALLS 5 and 12) --------------------------------------------------

SMALL = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)


def _tiny_model(family: str, tiny_model_dir) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":  # through the real save/load path
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    if family == "qwen2":  # attention biases
        return Qwen2ForCausalLM(Qwen2Config(**SMALL))
    # A window shorter than the examples: the packed mask must also keep it.
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4))


def _examples(vocab_size: int) -> list[Example]:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length, prompt in [(5, 2), (9, 4), (3, 1), (7, 3)]:
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        examples.append(_example(ids, prompt))
    return examples


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per trained token cross-entropy, with the causal shift the model's own loss uses."""
    logits, labels = logits[:-1], labels[1:]
    keep = labels != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager", "tuneforge_varlen"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_packed_logits_losses_and_gradients_equal_unpacked(family, attention, tiny_model_dir):
    model = _tiny_model(family, tiny_model_dir)
    if attention == "tuneforge_varlen":
        register_varlen_attention()  # on CPU: its float32 path (dense block-diagonal mask)
    model.set_attn_implementation(attention)
    model.train()
    examples = _examples(model.config.vocab_size)
    dataset, stats = build_packed_dataset(examples, max_length=12)
    assert stats.rows == 2  # two rows flattened into one sequence: 4 examples
    batch = PackedCollator()(list(dataset))
    cu = batch["cu_seq_lens_q"].tolist()

    out = model(**batch)
    packed_losses = _token_losses(out.logits[0], batch["labels"][0])
    packed_losses.sum().backward()
    packed_grads = _grads(model)
    model.zero_grad()

    alone_logits, alone_losses = [], []
    for start, end in zip(cu[:-1], cu[1:]):
        logits = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
        alone_logits.append(logits)
        alone_losses.append(_token_losses(logits, batch["labels"][0, start:end]))
    alone_losses = torch.cat(alone_losses)
    alone_losses.sum().backward()
    alone_grads = _grads(model)

    torch.testing.assert_close(out.logits[0], torch.cat(alone_logits), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed_losses, alone_losses, atol=2e-5, rtol=1e-5)
    # The model's own loss: the -100 at each example start keeps boundaries out of it.
    torch.testing.assert_close(out.loss, alone_losses.mean(), atol=2e-6, rtol=1e-6)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_sdpa_attends_across_examples_when_a_cache_is_built(tiny_model_dir):
    # Pins the upstream behaviour `use_cache=False` in PackedCollator guards against: if this
    # fails, transformers builds the packed mask with a cache too and the guard is optional.
    model = _tiny_model("llama", tiny_model_dir).eval()
    dataset, _ = build_packed_dataset(_examples(model.config.vocab_size)[:2], max_length=16)
    batch = PackedCollator()(list(dataset))
    cu = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        guarded = model(**batch).logits[0, cu[1] :]
        leaky = model(**{**batch, "use_cache": True}).logits[0, cu[1] :]
        alone = model(input_ids=batch["input_ids"][:, cu[1] :]).logits[0]
    torch.testing.assert_close(guarded, alone, atol=2e-5, rtol=1e-5)
    assert (leaky - alone).abs().max() > 1e-3
