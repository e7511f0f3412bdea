"""Real data nobody on this project wrote: Lamini docs Q/A and JCommonsenseQA (JGLUE)."""

import json

from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data import IGNORE_INDEX, build_datasets
from tuneforge.train import train


def trained_and_prompt_text(tokenizer, input_ids, labels):
    prompt = [t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX]
    trained = [t for t, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    return tokenizer.decode(prompt), tokenizer.decode(trained)


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_lamini_docs_masks_and_brief_training(shared_dir, tmp_path, tokenizer, tiny_model_dir):
    path = shared_dir / "data" / "lamini_docs" / "lamini_docs.jsonl"
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    spec = DatasetSpec(path=str(path), prompt_fields=["question"], response_field="answer", template="plain", max_rows=64)
    data = build_datasets(DataConfig(datasets=[spec], max_length=512), tokenizer, seed=0, use_cache=False)
    prompt, trained = trained_and_prompt_text(tokenizer, data.train["input_ids"][0], data.train["labels"][0])
    assert prompt == "<s>" + first["question"]  # the markers are in the data already: plain template
    assert trained.endswith("</s>") and first["answer"].startswith(trained[:40])
    result = train(
        {
            "model": {"path": str(tiny_model_dir)},
            "data": {"datasets": [spec.model_dump(exclude_unset=True)], "max_length": 512},
            "train": {"max_steps": 20, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                      "logging_steps": 5, "save_strategy": "no", "use_cpu": True},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    curve = losses(result.run_dir)
    assert curve[-1] < curve[0]


def test_jcommonsenseqa_as_instructions(shared_dir, tmp_path, tokenizer, tiny_model_dir):
    path = shared_dir / "data" / "jcommonsenseqa" / "train-v1.3.json"
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    spec = DatasetSpec(path=str(path), format="multiple_choice", template="qa", max_rows=64)
    data = build_datasets(DataConfig(datasets=[spec], max_length=256), tokenizer, seed=0, use_cache=False)
    prompt, trained = trained_and_prompt_text(tokenizer, data.train["input_ids"][0], data.train["labels"][0])
    right = first[f"choice{first['label']}"]
    assert trained == right + "</s>"  # 絵本: only the right choice and the terminator train
    assert first["question"] in prompt and all(first[f"choice{i}"] in prompt for i in range(5))
    result = train(
        {
            "model": {"path": str(tiny_model_dir)},
            "data": {"datasets": [spec.model_dump(exclude_unset=True)], "max_length": 256, "packing": True},
            "train": {"max_steps": 20, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
                      "logging_steps": 5, "save_strategy": "no", "use_cpu": True},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    curve = losses(result.run_dir)
    assert curve[-1] < curve[0]
