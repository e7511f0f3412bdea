"""GRPO end to end on the tiny Llama: prompts rendered with the run's template, `_target_` rewards, TRL's GRPOTrainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import write_jsonl
from tests.train.test_preference import TrainerSpy, summary
from tuneforge.config.schema import GrpoMethod
from tuneforge.data.templates import encode_generation_prompt, resolve_template
from tuneforge.errors import ConfigError
from tuneforge.infer import load_for_inference
from tuneforge.train import train
from tuneforge.train.guards import NonFiniteGuardMixin
from tuneforge.train.preference import TuneforgeGRPOTrainer, check_rewards, reward_functions

ROOT = Path(__file__).resolve().parents[2]
# Token ids below this are "low": the reward is the share of them in a completion. A random
# model samples about half of them, so every group's rewards spread and GRPO has a signal.
LOW_IDS = 300
# (prompt, answer) pairs the reward saw: the dataset's other columns reach it.
SEEN: list[tuple[str, str]] = []


def low_token_share(prompts, completion_ids, answer, scale=1.0, **kwargs):
    SEEN.extend((prompt[-1]["content"], reference) for prompt, reference in zip(prompts, answer))
    return [scale * sum(token < LOW_IDS for token in ids) / max(len(ids), 1) for ids in completion_ids]


def needs_a_solution(completions, solution):
    return [0.0] * len(completions)


class ConstantReward:
    """A reward class: instantiated with its keys, its instances called."""

    made = 0

    def __init__(self, value):
        ConstantReward.made += 1
        self.value = value

    def __call__(self, completions, **kwargs):
        return [self.value] * len(completions)


ROWS = [{"prompt": f"after {n}", "answer": str(n + 1)} for n in range(10, 26)]


def grpo_config(tmp_path, model_dir, method: dict, steps: int, **train_args) -> dict:
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    settings = {
        "max_steps": steps, "learning_rate": 1e-2, "per_device_train_batch_size": 8, "logging_steps": 1,
        "save_strategy": "no", "use_cpu": True, "seed": 0,
    }
    settings.update(train_args)
    return {
        "model": {"path": str(model_dir)},
        "data": {"datasets": [{"path": str(data), "format": "prompt", "template": "qa"}], "max_length": 32},
        "method": {
            "name": "grpo", "num_generations": 4, "max_completion_length": 8,
            "rewards": [{"_target_": "tests.train.test_grpo.low_token_share", "scale": 2.0}], **method,
        },
        "train": settings,
        "output": {"dir": str(tmp_path / "run")},
    }


def sampled_low_share(model, tokenizer, prompt_ids: list[list[int]], samples: int = 32) -> float:
    """Mean share of low tokens in completions sampled as GRPO samples them (no top-k), with a fixed seed."""
    torch.manual_seed(0)
    shares = []
    with torch.no_grad():
        for ids in prompt_ids:
            output = model.generate(
                torch.tensor([ids] * samples), do_sample=True, top_k=0, max_new_tokens=8, min_new_tokens=8,
                pad_token_id=tokenizer.eos_token_id,
            )[:, len(ids):]
            shares.append((output < LOW_IDS).float().mean().item())
    return sum(shares) / len(shares)


def test_grpo_raises_the_reward_and_logs_it(tmp_path, tiny_model_dir):
    # 2 prompts x 8 completions per step, at a constant rate: enough signal in 12 steps.
    settings = grpo_config(
        tmp_path, tiny_model_dir, {"adapter": {"name": "full"}, "num_generations": 8}, 12,
        per_device_train_batch_size=16, learning_rate=3e-2, lr_scheduler_type="constant",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    template = resolve_template("qa", tokenizer)
    prompts = [encode_generation_prompt(tokenizer, template, [{"role": "user", "content": row["prompt"]}]) for row in ROWS[:4]]
    before = sampled_low_share(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tokenizer, prompts)
    SEEN.clear()
    spy = TrainerSpy()
    result = train(settings, callbacks=[spy])
    after = sampled_low_share(AutoModelForCausalLM.from_pretrained(str(result.model_dir)), tokenizer, prompts)
    # Every step's line in metrics.jsonl carries TRL's GRPO metrics, per reward function too.
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 12
    assert all({"reward", "reward_std", "rewards/low_token_share/mean", "completions/mean_length"} <= set(m) for m in steps)
    early, late = (sum(m["reward"] for m in window) / 4 for window in (steps[:4], steps[-4:]))
    report = summary(result)["preference"]
    print(f"GRPO low-token share sampled {before:.3f} -> {after:.3f}; logged reward (scale 2) first 4 steps "
          f"{early:.3f} -> last 4 {late:.3f}; summary {report['reward']}")
    assert after > before + 0.2
    assert late > early + 0.2
    assert report["reward"] == {"first": round(steps[0]["reward"], 6), "last": round(steps[-1]["reward"], 6)}
    # The reward saw each prompt with its own row's answer column.
    assert SEEN and all(int(answer) == int(prompt.split()[1]) + 1 for prompt, answer in SEEN)
    trainer = spy.trainer
    assert isinstance(trainer, TuneforgeGRPOTrainer) and isinstance(trainer, NonFiniteGuardMixin)
    assert trainer.ref_model is None  # beta 0: no KL term, no reference


def test_grpo_prompts_with_the_run_template_and_keeps_a_frozen_copy_of_the_start_as_reference(tmp_path, tiny_model_dir):
    # Random weights (seed 1) exist nowhere on disk: a reference loaded from model.path would differ.
    settings = grpo_config(tmp_path, tiny_model_dir, {"beta": 0.1}, 2, seed=1)
    settings["model"]["init"] = "random"
    spy = StartingWeights()
    result = train(settings, callbacks=[spy])
    trainer = spy.trainer
    reference = trainer.ref_model
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    assert {p.data_ptr() for p in trainer.model.parameters()}.isdisjoint(p.data_ptr() for p in reference.parameters())
    saved = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    assert not torch.equal(spy.start["lm_head.weight"], saved["lm_head.weight"])
    assert all(torch.equal(spy.start[name], value) for name, value in reference.state_dict().items())
    # TRL encodes the conversational prompts as tuneforge's generation does, and stops at the end of turn.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    dataset = trainer.train_dataset
    assert trainer._tokenize_prompts(dataset["prompt"][:3])[0] == dataset["prompt_ids"][:3]
    assert set(trainer.eos_token_ids) == set(resolve_template("qa", tokenizer).stop_token_ids(tokenizer))
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in m for m in metrics if "loss" in m)


class StartingWeights(TrainerSpy):
    """Also keeps the policy's weights as training starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.start = {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_lora_grpo_evaluates_held_out_prompts_and_exports_the_adapter(tmp_path, tiny_model_dir):
    settings = grpo_config(tmp_path, tiny_model_dir, {"beta": 0.1, "adapter": {"name": "lora", "r": 4}}, 2)
    settings["data"]["eval_split"] = 0.25
    spy = TrainerSpy()
    result = train(settings, callbacks=[spy])
    assert spy.trainer.ref_model is None  # the reference is the base with a copy of the fresh adapter
    report = summary(result)["preference"]
    assert {"reward", "eval_reward", "kl"} <= set(report)
    loaded = load_for_inference(str(result.run_dir))
    assert loaded.template.name == "qa"


@pytest.mark.parametrize(("method", "where", "message"), [
    ({"rewards": [{"_target_": "no_such_module.reward"}]}, "method.rewards.0._target_", "cannot import .no_such_module.reward."),
    (
        {"rewards": [{"_target_": "tests.train.test_grpo.low_token_share"}, {"_target_": "tests.train.test_grpo.needs_a_solution"}]},
        "method.rewards.1", "cannot be called as a reward: missing a required argument: 'solution'",
    ),
    ({"rewards": [{"_target_": "tests.train.test_grpo.needs_a_solution", "strict": True}]}, "method.rewards.0", "does not take the keys"),
    ({"num_generations": 3}, "method.num_generations", "8 completions .* not a multiple of num_generations 3"),
])
def test_reward_and_group_mistakes_are_config_errors_before_the_model_loads(tmp_path, tiny_model_dir, method, where, message):
    settings = grpo_config(tmp_path, tiny_model_dir, method, 2)
    with pytest.raises(ConfigError, match=message) as error:
        train(settings)
    assert error.value.where == where
    assert not (tmp_path / "run" / "model").exists()


def test_the_documented_example_runs_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples.rewards is imported from the current directory
    result = train("examples/grpo_lora.yaml", overrides=["train.max_steps=2", f"output.dir={tmp_path / 'run'}"])
    assert result.global_step == 2
    assert {"reward", "rewards/matches_answer/mean", "rewards/digits_only/mean"} <= set(summary(result)["preference"])


def test_a_reward_class_is_checked_without_being_made_then_made_once_with_its_keys():
    columns = ["prompt_ids", "prompt", "answer"]
    method = GrpoMethod(rewards=[{"_target_": "tests.train.test_grpo.ConstantReward", "value": 0.5}])
    ConstantReward.made = 0
    check_rewards(method, columns)
    assert ConstantReward.made == 0
    [reward] = reward_functions(method, columns)
    assert ConstantReward.made == 1 and reward(prompts=[], completions=[[{}]] * 3) == [0.5] * 3
    with pytest.raises(ConfigError, match="does not take the keys given next to _target_: missing a required argument: 'value'"):
        check_rewards(GrpoMethod(rewards=[{"_target_": "tests.train.test_grpo.ConstantReward"}]), columns)
