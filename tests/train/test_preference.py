"""Preference tuning end to end on the tiny Llama: DPO, ORPO, KTO and SimPO through `tuneforge.train`."""

import gc
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from tests.conftest import write_jsonl
from tests.train.test_guards import PoisonGradient
from tuneforge.config.loading import load_config
from tuneforge.data.preference import build_preference_datasets
from tuneforge.infer import load_for_inference
from tuneforge.train import train
from tuneforge.train.checkpoints import AtomicCheckpointMixin, is_complete_checkpoint
from tuneforge.train.guards import NonFiniteGuardMixin
from tuneforge.train.preference import (
    TuneforgeCPOTrainer,
    TuneforgeDPOTrainer,
    TuneforgeKTOTrainer,
    TuneforgeORPOTrainer,
)

# Two-digit replies on both sides, so neither wins by being shorter.
PAIRS = [{"prompt": f"after {n}", "chosen": str(n + 1), "rejected": str(n + 11)} for n in range(10, 34)]


def preference_config(tmp_path, model_dir, method: dict, steps: int, **train_args) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    settings = {
        "max_steps": steps, "learning_rate": 5e-3, "per_device_train_batch_size": 8, "logging_steps": 5,
        "save_strategy": "no", "use_cpu": True,
    }
    settings.update(train_args)
    return {
        "model": {"path": str(model_dir)},
        "data": {"datasets": [{"path": str(data), "format": "preference", "template": "qa"}], "max_length": 32},
        "method": method,
        "train": settings,
        "output": {"dir": str(tmp_path / "run")},
    }


class TrainerSpy(TrainerCallback):
    """Finds the running trainer (callbacks are not handed it) when training starts."""

    trainer = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        gc.collect()
        live = [o for o in gc.get_objects() if isinstance(o, AtomicCheckpointMixin) and o.model is model]
        self.trainer = live[0]


def chosen_margins(model, settings) -> torch.Tensor:
    """log p(chosen | prompt) - log p(rejected | prompt) per training pair, as tuneforge tokenises them."""
    config = load_config(settings)
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    pairs = build_preference_datasets(config.data, tokenizer, seed=0, method=config.method).train
    margins = []
    with torch.no_grad():
        for pair in pairs:
            logps = []
            for side in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([pair["prompt_ids"] + pair[side]])
                token_logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
                logps.append(token_logps[len(pair["prompt_ids"]) - 1 :].sum())
            margins.append(logps[0] - logps[1])
    return torch.stack(margins)


def summary(result) -> dict:
    return json.loads((result.run_dir / "summary.json").read_text())


def test_lora_dpo_widens_the_chosen_margin_without_a_reference_copy(tmp_path, tiny_model_dir):
    settings = preference_config(tmp_path, tiny_model_dir, {"name": "dpo", "beta": 0.1, "adapter": {"name": "lora", "r": 8}}, 30)
    before = chosen_margins(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), settings)
    spy = TrainerSpy()
    result = train(settings, callbacks=[spy])
    after = chosen_margins(load_for_inference(str(result.run_dir)).model, settings)
    print(f"DPO LoRA margin {before.mean():.3f} -> {after.mean():.3f}, "
          f"accuracy {(before > 0).float().mean():.2f} -> {(after > 0).float().mean():.2f}")
    assert after.mean() > before.mean() + 0.3
    assert (after > 0).float().mean() >= 0.9 > (before > 0).float().mean()
    # The reference is the base model with the adapters off: no second model in memory.
    trainer = spy.trainer
    assert isinstance(trainer, TuneforgeDPOTrainer) and trainer.ref_model is None
    base_weights = {p.data_ptr() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert len(base_weights) == sum(1 for _ in AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).parameters())
    # The run report holds the reward metrics, rising over training.
    report = summary(result)["preference"]
    assert report["rewards/margins"]["last"] > report["rewards/margins"]["first"]
    assert report["rewards/accuracies"]["last"] > report["rewards/accuracies"]["first"]
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(f"rewards/{name}" in metrics[0] for name in ("chosen", "rejected", "margins", "accuracies"))
    # Generation formats prompts with the template the pairs were trained with.
    assert load_for_inference(str(result.run_dir)).template.name == "qa"


def test_orpo_widens_the_chosen_margin(tmp_path, tiny_model_dir):
    settings = preference_config(tmp_path, tiny_model_dir, {"name": "orpo", "beta": 0.5}, 30, learning_rate=3e-3)
    before = chosen_margins(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), settings)
    result = train(settings)
    after = chosen_margins(AutoModelForCausalLM.from_pretrained(str(result.model_dir)), settings)
    print(f"ORPO margin {before.mean():.3f} -> {after.mean():.3f}, "
          f"accuracy {(before > 0).float().mean():.2f} -> {(after > 0).float().mean():.2f}")
    assert after.mean() > before.mean() + 0.3
    assert (after > 0).float().mean() >= 0.9 > (before > 0).float().mean()
    assert "rewards/accuracies" in summary(result)["preference"]


def test_full_dpo_keeps_a_frozen_reference_copy_and_tuneforges_guard_and_checkpoints(tmp_path, tiny_model_dir):
    settings = preference_config(
        tmp_path, tiny_model_dir, {"name": "dpo"}, 6, save_strategy="steps", save_steps=3, logging_steps=1,
    )
    spy = TrainerSpy()
    result = train(settings, callbacks=[spy, PoisonGradient(at_step=2)])
    trainer = spy.trainer
    assert isinstance(trainer, NonFiniteGuardMixin)
    reference = trainer.ref_model
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    policy_weights = {p.data_ptr() for p in trainer.model.parameters()}
    assert policy_weights.isdisjoint(p.data_ptr() for p in reference.parameters())
    # The poisoned step was skipped, not applied; checkpoints were written atomically.
    assert trainer.nonfinite_guard.skipped_steps == [2]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert [is_complete_checkpoint(result.run_dir / f"checkpoint-{step}") for step in (3, 6)] == [True, True]
    assert not list(result.run_dir.glob(".partial*"))


def test_kto_reads_unpaired_labels_and_simpo_trains_pairs(tmp_path, tiny_model_dir):
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in PAIRS[:12]]
    unpaired += [{"prompt": r["prompt"], "completion": r["rejected"], "label": "false"} for r in PAIRS[12:]]
    settings = preference_config(tmp_path / "kto", tiny_model_dir, {"name": "kto", "adapter": {"name": "lora", "r": 8}}, 4, logging_steps=2)
    settings["data"]["datasets"][0].update(
        path=str(write_jsonl(tmp_path / "unpaired.jsonl", unpaired)), format="unpaired", response_field="completion",
    )
    spy = TrainerSpy()
    kto = train(settings, callbacks=[spy])
    assert isinstance(spy.trainer, TuneforgeKTOTrainer) and spy.trainer.ref_model is None
    assert sorted(spy.trainer.train_dataset["label"]) == [False] * 12 + [True] * 12
    assert {"rewards/chosen", "rewards/rejected"} <= set(summary(kto)["preference"])

    simpo = train(preference_config(tmp_path / "simpo", tiny_model_dir, {"name": "simpo", "gamma": 0.5}, 4, logging_steps=2), callbacks=[spy])
    assert isinstance(spy.trainer, TuneforgeCPOTrainer) and spy.trainer.loss_type == "simpo"
    assert "rewards/margins" in summary(simpo)["preference"]


@pytest.mark.parametrize("trainer_class", [TuneforgeDPOTrainer, TuneforgeKTOTrainer, TuneforgeORPOTrainer, TuneforgeCPOTrainer])
def test_every_preference_trainer_composes_tuneforges_mixins_first(trainer_class):
    bases = [cls.__name__ for cls in trainer_class.__mro__]
    assert bases.index("NonFiniteGuardMixin") < bases.index("AtomicCheckpointMixin") < bases.index("Trainer")
