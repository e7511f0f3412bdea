"""`tuneforge generate`: streaming, batches, and the same tokens from adapter and merged runs."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

from tests.conftest import successor_rows, write_jsonl
from tuneforge.cli.main import main
from tuneforge.infer import encode_for_model, generate, load_for_inference
from tuneforge.infer.merge import merge_run
from tuneforge.models.generation import generate_texts
from tuneforge.train import train

PROMPTS = ["after 3", "after 12", "after 7", "after 100", "after 41"]


def run_config(root, model_dir, method: dict) -> dict:
    # Answers open with fixed words, which a few steps teach: generations are not empty.
    rows = [{"question": row["question"], "answer": f"the number {row['answer']}"} for row in successor_rows(80)]
    data = write_jsonl(root / "train.jsonl", rows)
    return {
        "model": {"path": str(model_dir)},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}], "max_length": 32},
        "method": method,
        "train": {"max_steps": 60, "learning_rate": 3e-3, "per_device_train_batch_size": 16, "save_strategy": "no", "use_cpu": True},
        "output": {"dir": str(root / "run")},
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir):
    return train(run_config(tmp_path_factory.mktemp("full"), tiny_model_dir, {"name": "full"})).run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    return train(run_config(tmp_path_factory.mktemp("lora"), tiny_model_dir, {"name": "lora", "r": 4})).run_dir


def test_a_single_prompt_streams_the_same_text_it_prints_without_streaming(full_run, capsys, monkeypatch):
    chunks: list[str] = []
    finalized = transformers.TextStreamer.on_finalized_text

    def record(self, text, stream_end=False):
        chunks.append(text)
        finalized(self, text, stream_end)

    monkeypatch.setattr(transformers.TextStreamer, "on_finalized_text", record)
    argv = ["generate", str(full_run), "--prompt", "after 3", "--max-new-tokens", "8"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert chunks  # the text went through the streamer
    assert main([*argv, "--no-stream"]) == 0
    printed = capsys.readouterr().out
    assert streamed.strip() == "".join(chunks).strip() == printed.strip()


def test_a_prompt_file_is_generated_in_batches_with_the_same_answers(full_run, tmp_path, capsys):
    loaded = load_for_inference(str(full_run))
    calls = []
    original = loaded.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    loaded.model.generate = counting_generate
    one_by_one = [generate(loaded, [prompt], max_new_tokens=6)[0] for prompt in PROMPTS]
    assert all(answer.strip() for answer in one_by_one)  # real answers, not empty strings
    calls.clear()
    assert generate(loaded, PROMPTS, max_new_tokens=6, batch_size=2) == one_by_one
    assert calls == [2, 2, 1]

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    assert main(["generate", str(full_run), "--prompts-file", str(prompts_file), "--batch-size", "2", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    for prompt, answer in zip(PROMPTS, one_by_one):
        assert f"### {prompt}\n{answer.strip()}\n" in out


def test_generation_with_an_adapter_run_equals_its_merged_model(lora_run, tmp_path):
    report = merge_run(lora_run, tmp_path / "merged", dtype="float32")
    assert report.adapter_effect > 1e-2  # the adapter changes the model: the equality means something
    adapter = load_for_inference(str(lora_run))
    merged = load_for_inference(str(tmp_path / "merged"))
    assert type(adapter.model).__name__ == "PeftModelForCausalLM"
    assert type(merged.model).__name__ == "LlamaForCausalLM"
    for prompt in PROMPTS:
        ids = encode_for_model(adapter, prompt)
        assert ids == encode_for_model(merged, prompt)  # the merged model kept the template
        tokens = [
            loaded.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=8, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)[0].tolist()
            for loaded in (adapter, merged)
        ]
        assert tokens[0] == tokens[1]
    answers = generate(adapter, PROMPTS, max_new_tokens=8)
    assert all(answer.strip() for answer in answers) and answers == generate(merged, PROMPTS, max_new_tokens=8)


def test_a_model_directory_without_run_metadata_uses_its_tokenizers_template(full_run, tmp_path):
    """A run's quantized/ or a copied export has no tuneforge.json, only the tokenizer's chat template."""
    copy = shutil.copytree(full_run / "model", tmp_path / "copy")
    (copy / "tuneforge.json").unlink()
    run, bare = load_for_inference(str(full_run)), load_for_inference(str(copy))
    assert run.template.name == "qa" and bare.template.name == "tokenizer"
    assert encode_for_model(bare, "after 3") == encode_for_model(run, "after 3")
    assert bare.template.stop_token_ids(bare.tokenizer) == run.template.stop_token_ids(run.tokenizer)
    assert generate(bare, PROMPTS, max_new_tokens=6) == generate(run, PROMPTS, max_new_tokens=6)


def test_a_streamer_takes_one_prompt(full_run):
    loaded = load_for_inference(str(full_run))
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate_texts(loaded.model, loaded.tokenizer, [[1, 2], [1, 3]], streamer=object())
