"""Freezing presets, PEFT options, new tokens, MoE auxiliary loss, quantization checks."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from tests.conftest import successor_rows, write_jsonl
from tuneforge.config import load_config
from tuneforge.config.schema import FreezeMethod, LoraMethod, ModelConfig
from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods import prepare_model
from tuneforge.models import load_model
from tuneforge.train import train


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def llama(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))


def test_freeze_presets_select_exact_sets(llama):
    model, _ = prepare_model(FreezeMethod(last_layers=1), llama)
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    model, _ = prepare_model(FreezeMethod(embeddings=True), llama)
    assert trainable(model) == {"model.embed_tokens.weight"}
    model, _ = prepare_model(FreezeMethod(output_head=True), llama)
    assert trainable(model) == {"lm_head.weight"}
    # Everything except the named modules: freeze patterns alone.
    model, _ = prepare_model(FreezeMethod(frozen=["embed_tokens", r"layers\.0\."]), llama)
    assert trainable(model) == {
        n for n, _ in model.named_parameters() if "embed_tokens" not in n and "layers.0." not in n
    }
    model, _ = prepare_model(FreezeMethod(last_layers=1, output_head=True, frozen=["mlp"]), llama)
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.self_attn") or n.endswith("layernorm.weight") and "layers.1." in n} | {"lm_head.weight"}


def test_last_layers_larger_than_the_model_is_explained(llama):
    from tuneforge.errors import MethodError

    with pytest.raises(MethodError, match="last_layers=5 but the model has 2 layers"):
        prepare_model(FreezeMethod(last_layers=5), llama)


def test_dora_rslora_and_patterns_reach_peft(llama):
    method = LoraMethod(r=8, lora_alpha=16, use_dora=True, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 4})
    model, _ = prepare_model(method, llama)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert "default" in q.lora_magnitude_vector  # DoRA magnitude
    assert q.r["default"] == 8 and down.r["default"] == 2
    assert q.scaling["default"] == pytest.approx(16 / 8**0.5)  # rsLoRA
    assert down.scaling["default"] == pytest.approx(4 / 2**0.5)


def run(tmp_path, model_dir, **sections):
    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(16))
    config = {
        "model": {"path": str(model_dir)},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}], "max_length": 32},
        "train": {"max_steps": 3, "learning_rate": 1e-2, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True, "logging_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return train(config)


def test_new_special_tokens_train_and_are_saved_with_the_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer

    rows = [{"question": f"call {n}", "answer": f"<tool> {n}"} for n in range(16)]
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    result = train({
        "model": {"path": str(tiny_model_dir), "new_special_tokens": ["<tool>"]},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}], "max_length": 32},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 5, "learning_rate": 1e-2, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True},
        "output": {"dir": str(tmp_path / "run")},
    })
    tokenizer = AutoTokenizer.from_pretrained(str(result.model_dir))
    new_id = tokenizer.convert_tokens_to_ids("<tool>")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert new_id == base.get_input_embeddings().weight.shape[0]  # appended after the old vocabulary
    adapter = load_file(str(result.model_dir / "adapter_model.safetensors"))
    deltas = {name: t for name, t in adapter.items() if "trainable_tokens_delta" in name}
    # The tiny Llama's head is not tied: both the input row and the output row of <tool> trained.
    assert {name.split(".")[-3] for name in deltas} == {"embed_tokens", "lm_head"}
    assert all(t.shape == (1, 32) and t.abs().sum() > 0 for t in deltas.values())
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reloaded = PeftModel.from_pretrained(base, str(result.model_dir)).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor([[1, new_id, 5]])).logits
    assert torch.isfinite(logits).all()


def tiny_mixtral_dir(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(str(tmp_path / "mixtral"))
    tokenizer.save_pretrained(str(tmp_path / "mixtral"))
    return tmp_path / "mixtral"


def test_moe_aux_loss_is_in_the_loss_and_logged(tmp_path, tokenizer_dir):
    directory = tiny_mixtral_dir(tmp_path, tokenizer_dir)
    with_aux = load_model(ModelConfig(path=str(directory), moe_aux_loss_coef=0.5))
    without = load_model(ModelConfig(path=str(directory), moe_aux_loss=False))
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    out_with = with_aux(input_ids=ids, labels=ids)
    out_without = without(input_ids=ids, labels=ids)
    assert out_with.aux_loss > 0
    assert out_with.loss.item() == pytest.approx(out_without.loss.item() + 0.5 * out_with.aux_loss.item(), rel=1e-5)
    result = run(tmp_path, directory, method={"name": "lora", "r": 4})
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    aux = [m["aux_loss"] for m in logged if "loss" in m]
    assert len(aux) == 3 and all(a > 0 for a in aux)


def test_quantization_needs_cuda_and_an_adapter(tmp_path, tiny_model_dir):
    base = {"model": {"path": str(tiny_model_dir), "quantization": "4bit"}, "data": {"datasets": [{"path": "x.jsonl"}]}}
    with pytest.raises(ConfigError, match="only adapters train on quantized weights; use method.name: lora"):
        load_config(base)
    config = load_config({**base, "method": {"name": "lora"}, "output": {"dir": str(tmp_path / "run")}})
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="4bit loading runs on CUDA GPUs"):
            train(config)  # fails before the data or the model is read (x.jsonl does not exist)
        assert not (tmp_path / "run").exists()


def test_optimizer_and_scheduler_are_what_the_config_says(tmp_path, tiny_model_dir):
    captured = {}

    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            captured["optimizer"] = type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__

    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(16))
    settings = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}], "max_length": 32},
        "train": {"max_steps": 10, "learning_rate": 1e-3, "optim": "adafactor", "lr_scheduler_type": "cosine",
                  "warmup_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True, "logging_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = train(settings, callbacks=[Capture()])
    assert captured["optimizer"] == "Adafactor"
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["learning_rate"] for m in logged if "learning_rate" in m]
    import math

    # The rate logged at step s is the one step s used: scheduler position s - 1. Linear warmup
    # over 2 positions, then half a cosine over the remaining 8.
    expected = [
        1e-3 * (t / 2) if t < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 8)) for t in range(10)
    ]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_unknown_optimizer_or_scheduler_is_a_config_error_at_load_time(tiny_model_dir):
    base = {"model": {"path": str(tiny_model_dir)}, "data": {"datasets": [{"path": "x.jsonl"}]}}
    with pytest.raises(ConfigError, match=r"train\.optim.*'adamw_torch_fusd'.*did you mean 'adamw_torch_fused'"):
        load_config({**base, "train": {"optim": "adamw_torch_fusd"}})
    with pytest.raises(ConfigError, match=r"train\.lr_scheduler_type.*'cosin'.*did you mean 'cosine'"):
        load_config({**base, "train": {"lr_scheduler_type": "cosin"}})


def test_quantized_base_keeps_its_frozen_weights_in_bf16_and_passes_grads_to_checkpointed_layers(tiny_model_dir):
    from tuneforge.methods.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    model.is_quantized = True  # the branch bitsandbytes-loaded models take; the kernels need a GPU
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    peft_model = apply_lora(LoraMethod(name="lora", r=4), model, gradient_checkpointing=True)
    for name, parameter in peft_model.named_parameters():
        if "lora_" in name:
            assert parameter.requires_grad
        else:
            assert not parameter.requires_grad
            assert parameter.dtype == dtypes[name.replace("base_model.model.", "").replace(".base_layer", "")]
    embeddings = peft_model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeddings.requires_grad  # checkpointed blocks see inputs that carry grad
