"""Evaluation: loss as training computes it, multiple-choice accuracy, QA exact match and F1."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from tests.conftest import successor_rows, write_jsonl
from tuneforge.cli.main import main
from tuneforge.config import load_config
from tuneforge.data.templates import resolve_template
from tuneforge.errors import ConfigError
from tuneforge.infer.evaluate import (
    char_f1,
    eval_task,
    normalize_answer,
    normalized_score,
    run_task,
)
from tuneforge.infer.generate import LoadedModel
from tuneforge.train import train

TRAIN = {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "save_strategy": "no", "use_cpu": True}


class PreferringModel(torch.nn.Module):
    """Scores every position alike: the next token is one of `preferred` with high probability."""

    def __init__(self, vocab_size: int, preferred: list[int]) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[preferred] = 10.0

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


@pytest.fixture
def tokenizer(tokenizer_dir):
    """The tiny tokenizer as `load_for_inference` prepares it: padding with EOS."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    loaded.pad_token = loaded.eos_token
    return loaded


def digit_id(tokenizer, digit: str) -> int:
    (token_id,) = tokenizer(digit, add_special_tokens=False)["input_ids"]
    return token_id


def test_multiple_choice_accuracy_is_exact_for_known_preferences(tmp_path, tokenizer):
    # The model prefers '7' (and the end of turn): it picks the choice '7' wherever it is.
    model = PreferringModel(len(tokenizer), [digit_id(tokenizer, "7"), tokenizer.eos_token_id])
    loaded = LoadedModel(model, tokenizer, resolve_template("qa", tokenizer), "fake")
    rows = [
        {"question": "a", "choices": ["7", "3", "5"], "label": 0},
        {"question": "b", "choices": ["3", "7", "5"], "label": 1},
        {"question": "c", "choices": ["3", "5", "7", "1"], "label": 3},  # the model says 2: wrong
        {"question": "d", "choices": ["7", "3"], "label": 1},  # the model says 0: wrong
    ]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    result = run_task(loaded, eval_task("multiple_choice", {"path": str(data), "format": "multiple_choice"}, where="test"))
    assert [e["prediction"] for e in result.examples] == [0, 1, 2, 0]
    assert result.metrics["accuracy"] == 0.5
    assert result.metrics["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4 + 1 / 2) / 4)
    assert result.metrics["questions"] == 4


def test_normalisation_decides_between_short_and_long_choices(tmp_path, tokenizer):
    # '3' and '5' are likely, '1' is not: the one-token '1' beats '3535' summed (fewer tokens
    # lose less), but per token the four likely tokens win.
    model = PreferringModel(len(tokenizer), [digit_id(tokenizer, "3"), digit_id(tokenizer, "5"), tokenizer.eos_token_id])
    with torch.no_grad():
        model.bias[digit_id(tokenizer, "1")] = 9.0
    loaded = LoadedModel(model, tokenizer, resolve_template("qa", tokenizer), "fake")
    data = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["1", "3535"], "label": 1}])
    spec = {"path": str(data), "format": "multiple_choice"}
    predictions = {
        normalize: run_task(loaded, eval_task("multiple_choice", spec, where="test", normalize=normalize)).examples[0]["prediction"]
        for normalize in ("none", "tokens", "chars")
    }
    assert predictions == {"none": 0, "tokens": 1, "chars": 1}
    assert normalized_score(-4.0, 4, "abcdefgh", "tokens") == -1.0
    assert normalized_score(-4.0, 4, "abcdefgh", "chars") == -0.5
    assert normalized_score(-4.0, 4, "abcdefgh", "none") == -4.0


def test_answer_normalisation_and_character_f1():
    assert normalize_answer("  Paris!\n") == "paris"
    assert normalize_answer("ＡＢＣ　１２３。") == "abc 123"  # full width folds, 。 is punctuation
    assert char_f1("東京です", "東京") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert char_f1("4 2", "42") == 1.0  # spaces do not count for characters
    assert char_f1("", "") == 1.0 and char_f1("x", "") == 0.0 and char_f1("ab", "cd") == 0.0


def test_task_types_check_their_data_format(tmp_path):
    with pytest.raises(ConfigError, match="qa task reads instruction or chat data, not format 'multiple_choice'"):
        eval_task("qa", {"path": "x.jsonl", "format": "multiple_choice"}, where="test")
    with pytest.raises(ConfigError, match="multiple_choice task reads multiple_choice data, not format 'text'"):
        eval_task("multiple_choice", {"path": "x.jsonl", "format": "text"}, where="test")
    assert eval_task("multiple_choice", {"path": "x.jsonl"}, where="test").data.format == "multiple_choice"
    with pytest.raises(ConfigError, match="evaluation data"):
        load_config({
            "model": {"path": "m"},
            "data": {"datasets": [{"path": "x.jsonl"}]},
            "eval": {"tasks": [{"type": "loss", "data": {"path": "x.jsonl"}}]},
        })


def pick_rows(count: int, seed: int) -> list[dict]:
    """A learnable multiple-choice task: the right choice is the digit the question names."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        choices = rng.sample("0123456789", 4)
        label = rng.randrange(4)
        rows.append({"question": f"pick {choices[label]}", "choices": choices, "label": label})
    return rows


class StateProbe(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        self.best_metric = state.best_metric


def test_multiple_choice_task_during_training_learns_far_above_chance(tmp_path, tiny_model_dir):
    train_data = write_jsonl(tmp_path / "train.jsonl", pick_rows(400, seed=1))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", pick_rows(40, seed=2))
    probe = StateProbe()
    config = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"datasets": [{"path": str(train_data), "format": "multiple_choice", "template": "qa"}],
                 "eval_split": 0.05, "max_length": 48},
        "eval": {"tasks": [{"name": "pick", "type": "multiple_choice", "data": {"path": str(heldout), "format": "multiple_choice"}}]},
        "train": {**TRAIN, "max_steps": 120, "learning_rate": 1e-2, "eval_strategy": "steps", "eval_steps": 60,
                  "metric_for_best_model": "eval_pick_accuracy"},
        "output": {"dir": str(tmp_path / "run")},
    }
    train(config, callbacks=[probe])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [(entry["step"], entry["eval_pick_accuracy"]) for entry in logged if "eval_pick_accuracy" in entry]
    chance = next(entry["eval_pick_chance"] for entry in logged if "eval_pick_chance" in entry)
    assert [step for step, _ in accuracy] == [0, 60, 120, 120]  # before, at eval_steps, after
    assert chance == 0.25
    assert accuracy[0][1] <= 0.5  # before training: near chance
    assert accuracy[-1][1] >= 0.9, accuracy  # chance is 0.25
    assert probe.best_metric == max(value for _, value in accuracy[1:3])  # best-model selection read it


def test_loss_task_equals_the_trainers_eval_loss(tmp_path, tiny_model_dir):
    """Same tokenisation and masks as training: on one batch the two losses agree."""
    heldout = write_jsonl(tmp_path / "heldout.jsonl", successor_rows(8, start=500))
    spec = {"path": str(heldout), "prompt_fields": ["question"], "response_field": "answer"}
    result = train({
        "model": {"path": str(tiny_model_dir)},
        "data": {"datasets": [{**spec, "path": str(write_jsonl(tmp_path / "train.jsonl", successor_rows(64)))}],
                 "eval_datasets": [spec], "max_length": 32},
        "train": {**TRAIN, "max_steps": 10, "per_device_eval_batch_size": 8},
        "output": {"dir": str(tmp_path / "run")},
    })
    code = main(["eval", str(result.run_dir), "--data", str(heldout), "--prompt-fields", "question",
                 "--response-field", "answer", "--output", str(tmp_path / "eval.json")])
    assert code == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    (task,) = report["tasks"]
    assert task["type"] == "loss" and task["metrics"]["examples"] == 8
    assert task["metrics"]["loss"] == pytest.approx(result.eval_loss_after, rel=1e-4)
    assert task["metrics"]["perplexity"] == pytest.approx(2.718281828 ** result.eval_loss_after, rel=1e-3)


def test_qa_exact_match_on_an_overfit_model(tmp_path, tiny_model_dir, capsys):
    rows = [{"question": "what stops?", "answer": "this answer does"}]
    data = write_jsonl(tmp_path / "one.jsonl", rows * 8)
    train({
        "model": {"path": str(tiny_model_dir)},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}]},
        "train": {**TRAIN, "max_steps": 80, "learning_rate": 1e-2, "per_device_train_batch_size": 8},
        "output": {"dir": str(tmp_path / "run")},
    })
    wrong = write_jsonl(tmp_path / "qa.jsonl", [rows[0], {"question": "what stops?", "answer": "This answer, does!"},
                                                {"question": "what stops?", "answer": "nothing"}])
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "run"), "--data", str(wrong), "--task", "qa",
                 "--prompt-fields", "question", "--response-field", "answer", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"exact_match\s+0\.6667", out), out  # case and punctuation do not count
    f1 = (1 + 1 + char_f1("this answer does", "nothing")) / 3
    assert re.search(rf"f1\s+{f1:.4f}", out), out


def test_eval_on_jcommonsenseqa_reports_accuracy_and_chance(shared_dir, tiny_model_dir, tmp_path, capsys):
    valid = shared_dir / "data" / "jcommonsenseqa" / "valid-v1.3.json"
    code = main(["eval", str(tiny_model_dir), "--data", str(valid), "--format", "multiple_choice",
                 "--max-rows", "25", "--normalize", "chars", "--output", str(tmp_path / "jcqa.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"accuracy\s+0\.\d{4}", out) and re.search(r"chance\s+0\.2000", out), out
    assert "x chance level" in out
    (task,) = json.loads((tmp_path / "jcqa.json").read_text())["tasks"]
    assert task["metrics"]["questions"] == 25 and len(task["examples"]) == 25
    assert all(len(example["choices"]) == 5 for example in task["examples"])
