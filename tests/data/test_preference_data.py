"""Preference pairs tokenised with the run's template: prompt as generation encodes it, replies as SFT does;
GRPO prompts with their rows' other fields; both through the tokenisation cache and its file barrier."""

import pytest
from transformers import AutoTokenizer

from tests.conftest import build_tokenizer, write_jsonl
from tuneforge.config.loading import load_config
from tuneforge.config.schema import DataConfig, DpoMethod, GrpoMethod, KtoMethod
from tuneforge.data import preference
from tuneforge.data.preference import build_preference_datasets
from tuneforge.data.templates import (
    encode_conversation,
    encode_generation_prompt,
    resolve_template,
)
from tuneforge.errors import ConfigError, DataError

DPO, KTO = DpoMethod(), KtoMethod()


def data_config(path, **spec) -> DataConfig:
    return DataConfig(datasets=[{"path": str(path), "format": "preference", "template": "qa", **spec}], max_length=64)


def test_pairs_use_the_generation_prompt_and_the_supervised_reply(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "after 3", "chosen": "4", "rejected": "five"}])
    pair = build_preference_datasets(data_config(path), tokenizer, seed=0, method=DPO).train[0]
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
    truncated = build_preference_datasets(data_config(path), tokenizer, seed=0, method=DPO)
    assert len(truncated.train) == 2 and truncated.stats[0].truncated == 1
    first = truncated.train[0]
    assert len(first["prompt_ids"]) + len(first["rejected_ids"]) == 64
    dropped = build_preference_datasets(data_config(path, on_too_long="drop"), tokenizer, seed=0, method=DPO)
    assert len(dropped.train) == 1 and dropped.stats[0].dropped == 1
    with pytest.raises(ConfigError, match="split would cut a preference pair"):
        build_preference_datasets(data_config(path, on_too_long="split"), tokenizer, seed=0, method=DPO)


def test_pairs_become_one_desirable_and_one_undesirable_reply_for_kto(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"after {n}", "chosen": str(n + 1), "rejected": "no"} for n in range(5)])
    replies = build_preference_datasets(data_config(path), tokenizer, seed=0, method=KTO).train
    assert sorted(replies["label"]) == [False] * 5 + [True] * 5
    assert set(replies.column_names) == {"prompt_ids", "completion_ids", "label"}


def test_unpaired_labels_must_be_booleans(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "after 3", "completion": "4", "label": "maybe"}])
    config = DataConfig(datasets=[{"path": str(path), "format": "unpaired", "response_field": "completion"}])
    with pytest.raises(DataError, match=r"kto.jsonl:1.*\(label\) is 'maybe', expected true \(desirable\) or false"):
        build_preference_datasets(config, tokenizer, seed=0, method=KTO)


@pytest.mark.parametrize(("method", "data_format", "message"), [
    ({"name": "full"}, "preference", "preference data trains with method dpo, orpo, kto, simpo or grpo"),
    ({"name": "dpo"}, "instruction", "preference methods read format preference"),
    ({"name": "orpo"}, "unpaired", "only method kto reads it"),
    ({"name": "grpo", "rewards": [{"_target_": "m.f"}]}, "preference", "grpo generates its own replies from format prompt"),
    ({"name": "dpo"}, "prompt", "grpo generates its own replies from format prompt"),
    ({"name": "full"}, "prompt", "preference data trains with method"),
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


GRPO = GrpoMethod(rewards=[{"_target_": "m.f"}], max_completion_length=8)


def test_grpo_prompts_are_generation_prompts_and_keep_their_rows_other_fields(tmp_path, tokenizer):
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "after 3", "answer": "4"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Count."}, {"role": "user", "content": "after 5"}, {"role": "assistant", "content": "6"},
    ], "answer": "6"}])
    config = DataConfig(datasets=[
        {"path": str(text), "format": "prompt", "template": "qa"},
        {"path": str(chat), "format": "prompt", "template": "qa", "prompt_fields": ["messages"]},
    ], max_length=32)
    rows = build_preference_datasets(config, tokenizer, seed=0, method=GRPO).train
    assert set(rows.column_names) == {"prompt_ids", "prompt", "answer", "messages"}
    template = resolve_template("qa", tokenizer)
    first, second = rows[0], rows[1]
    assert first["prompt"] == [{"role": "user", "content": "after 3"}]
    assert first["prompt_ids"] == encode_generation_prompt(tokenizer, template, first["prompt"])
    assert (first["answer"], first["messages"]) == ("4", None)
    # The conversation's final assistant turn is the answer to generate: not in the prompt, still in its column.
    assert second["prompt"] == [{"role": "system", "content": "Count."}, {"role": "user", "content": "after 5"}]
    assert second["messages"][-1] == {"role": "assistant", "content": "6"} and second["answer"] == "6"


def test_grpo_prompts_leave_room_for_the_completion_and_must_not_shadow_rewards_arguments(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "after 3"}, {"prompt": "word " * 40}])
    config = DataConfig(datasets=[{"path": str(path), "format": "prompt", "template": "qa"}], max_length=32)
    kept = build_preference_datasets(config, tokenizer, seed=0, method=GRPO)
    assert len(kept.train) == 1 and kept.stats[0].dropped == 1  # longer than 32 - 8 tokens
    assert max(kept.stats[0].lengths) <= 24
    with pytest.raises(ConfigError, match="max_completion_length 32 leaves no room") as error:
        build_preference_datasets(config, tokenizer, seed=0, method=GRPO.model_copy(update={"max_completion_length": 32}))
    assert error.value.where == "method.max_completion_length"
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"prompt": "after 3", "completions": 2}])
    with pytest.raises(DataError, match=r"clash.jsonl:1: field\(s\) completions would reach the reward functions"):
        build_preference_datasets(DataConfig(datasets=[{"path": str(clash), "format": "prompt"}]), tokenizer, seed=0, method=GRPO)
    replied = write_jsonl(tmp_path / "replied.jsonl", [{"prompt": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(DataError, match="the prompt ends with nothing, expected a user message"):
        build_preference_datasets(DataConfig(datasets=[{"path": str(replied), "format": "prompt"}]), tokenizer, seed=0, method=GRPO)


def test_preference_data_is_cached_per_tokenizer_and_method(tmp_path, tokenizer, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"after {n}", "chosen": str(n + 1), "rejected": "no"} for n in range(6)])
    config = data_config(path).model_copy(update={"cache_dir": str(tmp_path / "cache"), "eval_split": 0.2})
    first = build_preference_datasets(config, tokenizer, seed=0, method=DPO)
    assert not first.from_cache and (tmp_path / "cache" / first.fingerprint / "stats.json").exists()

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(preference, "encode_generation_prompt", no_tokenising)
    second = build_preference_datasets(config, tokenizer, seed=0, method=DPO)
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert "reusing tokenised data from cache" in capsys.readouterr().out
    assert second.train["chosen_ids"] == first.train["chosen_ids"] and second.eval["prompt_ids"] == first.eval["prompt_ids"]
    assert second.stats[0].describe() == first.stats[0].describe()
    monkeypatch.undo()
    # Another tokenizer, or a method reading the pairs as unpaired replies, is another entry.
    other_tokenizer = AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path / "other", vocab_size=500)))
    retokenised = build_preference_datasets(config, other_tokenizer, seed=0, method=DPO)
    unpaired = build_preference_datasets(config, tokenizer, seed=0, method=KTO)
    assert not retokenised.from_cache and not unpaired.from_cache
    assert len({first.fingerprint, retokenised.fingerprint, unpaired.fingerprint}) == 3


def test_a_waiting_rank_loads_the_preference_entry_or_raises_the_builders_error(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "after 3", "chosen": "4", "rejected": "no"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "after 3", "chosen": "4"}])
    good_config, bad_config = (data_config(path).model_copy(update={"cache_dir": str(tmp_path / "cache")}) for path in (good, bad))
    # Local rank 0 builds; another rank waits on the file barrier, then loads the entry.
    built = build_preference_datasets(good_config, tokenizer, seed=0, method=DPO, peers_wait=True)
    waited = build_preference_datasets(good_config, tokenizer, seed=0, method=DPO, wait_seconds=30)
    assert waited.from_cache and waited.train["rejected_ids"] == built.train["rejected_ids"]
    # A failing build leaves its error for the waiting ranks instead of a timeout.
    with pytest.raises(DataError, match="missing field 'rejected'"):
        build_preference_datasets(bad_config, tokenizer, seed=0, method=DPO, peers_wait=True)
    with pytest.raises(DataError, match="preprocessing the data failed: .*missing field 'rejected'"):
        build_preference_datasets(bad_config, tokenizer, seed=0, method=DPO, wait_seconds=30)
