"""Quantization-aware training: fake quantization is active in training, conversion quantizes."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

pytest.importorskip("torchao", reason="quantization-aware training needs torchao")

from tests.conftest import build_tiny_llama, successor_rows, write_jsonl
from tuneforge.config.schema import FullMethod, QatSettings
from tuneforge.methods import prepare_model
from tuneforge.methods.qat import convert_qat
from tuneforge.train import train


@pytest.fixture
def model_dir(tmp_path, tokenizer_dir):
    # Widths divisible by the group size (32): every projection can be grouped.
    return build_tiny_llama(tmp_path / "m", tokenizer_dir, hidden_size=64, intermediate_size=128)


def test_fake_quantization_changes_the_forward_and_keeps_gradients(model_dir):
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    model, _ = prepare_model(FullMethod(qat=QatSettings()), AutoModelForCausalLM.from_pretrained(str(model_dir)))
    fake = [name for name, m in model.named_modules() if type(m).__name__ == "FakeQuantizedLinear"]
    assert len(fake) == 2 * 7  # q, k, v, o, gate, up, down in 2 layers; lm_head stays exact
    assert type(model.lm_head).__name__ == "Linear"
    ids = torch.tensor([[1, 7, 9, 11, 13]])
    out = model(input_ids=ids, labels=ids)
    with torch.no_grad():
        exact = reference(input_ids=ids).logits
    gap = (out.logits - exact).abs().max().item()
    assert 0 < gap < 0.5 * exact.abs().max().item()  # rounding is simulated, not ignored
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_qat_run_converts_to_quantized_layers(tmp_path, model_dir):
    seen = {}

    class Inspect(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen["fake"] = type(model.model.layers[1].mlp.down_proj).__name__

    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(16))
    result = train(
        {
            "model": {"path": str(model_dir)},
            "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}], "max_length": 32},
            "method": {"name": "full", "qat": {"weights": "int4", "activations": "int8", "group_size": 32}},
            "train": {"max_steps": 3, "learning_rate": 1e-3, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True},
            "output": {"dir": str(tmp_path / "run")},
        },
        callbacks=[Inspect()],
    )
    assert seen["fake"] == "FakeQuantizedLinear"  # fake quantization was active during training
    # The quantized export reloads with plain transformers, its linear layers quantized.
    quantized = AutoModelForCausalLM.from_pretrained(str(result.run_dir / "quantized"))
    assert type(quantized.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(quantized.lm_head.weight).__name__ == "Parameter"
    # ...and equals converting the trained fake-quantized model in memory.
    trained = AutoModelForCausalLM.from_pretrained(str(result.model_dir))
    converted = convert_qat(prepare_model(FullMethod(qat=QatSettings()), trained)[0], QatSettings())
    ids = torch.tensor([[1, 7, 9, 11]])
    with torch.no_grad():
        assert torch.allclose(quantized(input_ids=ids).logits, converted(input_ids=ids).logits, atol=1e-5)
