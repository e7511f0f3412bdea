"""Preference pairs tokenised with the run's template: prompt as generation encodes it, replies as SFT does."""

import pytest

from tests.conftest import write_jsonl
from tuneforge.config.loading import load_config
from tuneforge.config.schema import DataConfig
from tuneforge.data.preference import build_preference_datasets
from tuneforge.data.templates import (
    encode_conversation,
    encode_generation_prompt,
    resolve_template,
)
from tuneforge.errors import ConfigError, DataError


def data_config(path, **spec) -> DataConfig:
    return DataConfig(datasets=[{"path": str(path), "format": "preference", "template": "qa", **spec}], max_length=64)


def test_pairs_use_the_generation_prompt_and_the_supervised_reply(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "after 3", "chosen": "4", "rejected": "five"}])
    pair = build_preference_datasets(data_config(path), tokenizer, seed=0, unpaired=False).train[0]
    template = resolve_template("qa", tokenizer)
    prompt = [{"role": "user", "content": "after 3"}]
    assert pair["prompt_ids"] == encode_generation_prompt(tokenizer, template, prompt)
    ids, labels = encode_conversation(tokenizer, template, [*prompt, {"role": "assistant", "content": "4"}])
    # The chosen reply is exactly SFT's trained tokens, ending with the end-of-turn token.
    assert pair["chosen_ids"] == [label for label in labels if label != -100]
    assert pair["prompt_ids"] + pair["chosen_ids"] == ids[: len(pair["prompt_ids"]) + len(pair["chosen_ids"])]
    assert pair["chosen_ids"][-1] == template.end_of_turn_id(tokenizer)


def test_length_policy_truncates_or_drops_pairs_and_refuses_split(tmp_path, tokenizer):
    long_reply = "word " * 80
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "after 3", "chosen": "4", "rejected": long_reply},
        {"prompt": "after 5", "chosen": "6", "rejected": "7"},
    ])
    truncated = build_preference_datasets(data_config(path), tokenizer, seed=0, unpaired=False)
    assert len(truncated.train) == 2 and truncated.stats[0].truncated == 1
    first = truncated.train[0]
    assert len(first["prompt_ids"]) + len(first["rejected_ids"]) == 64
    dropped = build_preference_datasets(data_config(path, on_too_long="drop"), tokenizer, seed=0, unpaired=False)
    assert len(dropped.train) == 1 and dropped.stats[0].dropped == 1
    with pytest.raises(ConfigError, match="split would cut a preference pair"):
        build_preference_datasets(data_config(path, on_too_long="split"), tokenizer, seed=0, unpaired=False)


def test_pairs_become_one_desirable_and_one_undesirable_reply_for_kto(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"after {n}", "chosen": str(n + 1), "rejected": "no"} for n in range(5)])
    replies = build_preference_datasets(data_config(path), tokenizer, seed=0, unpaired=True).train
    assert sorted(replies["label"]) == [False] * 5 + [True] * 5
    assert set(replies.column_names) == {"prompt_ids", "completion_ids", "label"}


def test_unpaired_labels_must_be_booleans(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "after 3", "completion": "4", "label": "maybe"}])
    config = DataConfig(datasets=[{"path": str(path), "format": "unpaired", "response_field": "completion"}])
    with pytest.raises(DataError, match=r"kto.jsonl:1.*\(label\) is 'maybe', expected true \(desirable\) or false"):
        build_preference_datasets(config, tokenizer, seed=0, unpaired=True)


@pytest.mark.parametrize(("method", "data_format", "message"), [
    ({"name": "full"}, "preference", "preference data trains with method dpo, orpo, kto or simpo"),
    ({"name": "dpo"}, "instruction", "preference methods read format preference"),
    ({"name": "orpo"}, "unpaired", "only method kto reads it"),
])
def test_methods_and_data_formats_must_fit(method, data_format, message):
    settings = {"model": {"path": "m"}, "data": {"datasets": [{"path": "d.jsonl", "format": data_format}]}, "method": method}
    with pytest.raises(ConfigError, match=message):
        load_config(settings)


def test_a_quantized_base_needs_a_lora_adapter_under_a_preference_method():
    settings = {
        "model": {"path": "m", "quantization": "4bit"},
        "data": {"datasets": [{"path": "d.jsonl", "format": "preference"}]},
        "method": {"name": "dpo", "adapter": {"name": "full"}},
    }
    with pytest.raises(ConfigError, match="only adapters train on quantized weights"):
        load_config(settings)
    settings["method"]["adapter"] = {"name": "lora"}
    assert load_config(settings).method.adapter.name == "lora"
