"""tuneforge's own optimizers (config/optimizers.py): `train.optim: lamb` through pytorch_optimizer."""

import json
import math
import sys

import pytest
import torch
from pytorch_optimizer import Lamb
from transformers import TrainerCallback

from tests.conftest import successor_rows, write_jsonl
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train import train


def settings(tmp_path, tiny_model_dir, data_path, **train_values):
    return {
        "model": {"path": str(tiny_model_dir)},
        "data": {
            "datasets": [{"path": str(data_path), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}],
            "max_length": 32,
        },
        "train": {"per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True, "logging_steps": 1, **train_values},
        "output": {"dir": str(tmp_path / "run")},
    }


class CaptureOptimizer(TrainerCallback):
    """What the Trainer steps with: the class and each parameter group's settings with the parameter names."""

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        self.optimizer_class = type(inner)
        self.groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "names": {names[id(p)] for p in group["params"]}}
            for group in inner.param_groups
        ]


def test_lamb_trains_with_the_configured_settings_and_schedule(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(32))
    capture = CaptureOptimizer()
    config = settings(
        tmp_path, tiny_model_dir, data, optim="lamb", max_steps=20, learning_rate=2e-2, adam_beta1=0.8,
        adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.1,
    )
    result = train(config, callbacks=[capture])

    assert capture.optimizer_class is Lamb
    decay, no_decay = capture.groups
    # transformers' grouping: weight decay on the matrices, none on the norms (the tiny Llama has no biases).
    assert no_decay["names"] == {name for name in decay["names"] | no_decay["names"] if "norm" in name}
    assert decay["names"] and no_decay["names"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    for group in (decay, no_decay):
        assert group["initial_lr"] == 2e-2  # the scheduler's base rate is the configured one
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7

    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logged if "loss" in m]
    rates = [m["learning_rate"] for m in logged if "learning_rate" in m]
    assert len(losses) == 20
    # From about ln(vocabulary) = 6.4 it falls by about 0.5 in 20 steps; batch-to-batch noise is under 0.1.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    # lr_scheduler_type (linear by default) drives Lamb: step s used scheduler position s - 1.
    assert rates == pytest.approx([2e-2 * (1 - t / 20) for t in range(20)], rel=1e-6)
    # The resolved config keeps the user's name; only TrainingArguments saw the stand-in.
    assert "optim: lamb" in (result.run_dir / "config.yaml").read_text()


def test_lamb_without_pytorch_optimizer_fails_at_load_with_the_install_hint(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # `import pytorch_optimizer` raises ImportError
    config = settings(tmp_path, tiny_model_dir, tmp_path / "absent.jsonl", optim="lamb")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.where == "train.optim"
    assert caught.value.hint == 'pip install "tuneforge[optimizers]"'
    assert "pytorch_optimizer" in caught.value.message
    with pytest.raises(ConfigError, match=r"train\.optim"):
        train(config)  # before the data (absent.jsonl does not exist) or the model is read
    assert not (tmp_path / "run").exists()


def test_a_misspelt_lamb_is_a_config_error_with_a_suggestion(tiny_model_dir):
    config = {"model": {"path": str(tiny_model_dir)}, "data": {"datasets": [{"path": "x.jsonl"}]}, "train": {"optim": "lam"}}
    with pytest.raises(ConfigError, match=r"train\.optim.*'lam' is not one of: .*\blamb\b.*did you mean 'lamb'"):
        load_config(config)


@pytest.mark.parametrize(
    ("extra", "where", "message"),
    [
        ({"method": {"name": "dpo"}, "data": {"datasets": [{"path": "x.jsonl", "format": "preference"}]}},
         "train.optim", "not available with method 'dpo'"),
        ({"train": {"optim": "lamb", "optim_args": "rectify=True"}}, "train.optim_args", "not by 'lamb'"),
        ({"distributed": {"strategy": "deepspeed", "offload_optimizer": True}}, "train.optim", "ZeRO-Offload"),
    ],
)
def test_lamb_is_refused_where_it_would_not_be_the_optimizer_that_steps(tiny_model_dir, extra, where, message):
    config = {"model": {"path": str(tiny_model_dir)}, "data": {"datasets": [{"path": "x.jsonl"}]}, "train": {"optim": "lamb"}}
    config.update(extra)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(config)
    assert caught.value.where == where


def test_bf16_updates_below_half_the_spacing_are_lost_by_adamw_and_kept_by_stochastic_rounding():
    from torchao.optim import _AdamW

    from tuneforge.config.optimizers import OPTIMIZERS

    def mean_after_50_steps(optimizer_class, **options):
        # A constant gradient makes each AdamW step exactly lr: 1.0 - 1e-3 is closer to 1.0 than to
        # the next bf16 value below it (1.0 - 2**-8), so round-to-nearest never moves the weight.
        weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        optimizer = optimizer_class([weight], lr=1e-3, weight_decay=0.0, **options)
        for _ in range(50):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        assert weight.dtype == torch.bfloat16
        return weight.float().mean().item()

    assert mean_after_50_steps(torch.optim.AdamW) == 1.0
    # In fp32 the weights would reach 1 - 50e-3; the rounded ones get there on average.
    assert mean_after_50_steps(_AdamW, **OPTIMIZERS["adamw_bf16_sr"].options) == pytest.approx(0.95, abs=2e-3)


def test_adamw_bf16_sr_trains_bf16_weights_with_the_configured_settings(tmp_path, tiny_model_dir):
    from torchao.optim import _AdamW

    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(32))
    capture = CaptureOptimizer()
    config = settings(
        tmp_path, tiny_model_dir, data, optim="adamw_bf16_sr", max_steps=3, learning_rate=1e-2, adam_beta1=0.8,
        weight_decay=0.1,
    )
    config["model"]["dtype"] = "bfloat16"
    result = train(config, callbacks=[capture])

    assert capture.optimizer_class is _AdamW
    decay, no_decay = capture.groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == (0.8, 0.999) and decay["initial_lr"] == 1e-2
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # torchao keeps the rate as a tensor; the schedule still drives it and the log reads a number.
    assert [m["learning_rate"] for m in logged if "learning_rate" in m] == pytest.approx([1e-2 * (1 - t / 3) for t in range(3)])
    assert all(math.isfinite(m["loss"]) for m in logged if "loss" in m)
    from safetensors.torch import load_file

    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(result.run_dir / "model" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert after[name].dtype == torch.bfloat16  # trained in bf16, no fp32 copy written back
    assert not torch.equal(after[name], before[name].to(torch.bfloat16))
