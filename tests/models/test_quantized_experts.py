"""Fused MoE experts stored as NF4 (models/quantized_experts.py): what bitsandbytes' own 4-bit
loading leaves in 16 bits. bitsandbytes quantizes and dequantizes on the CPU too."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model  # noqa: E402

from tuneforge.models.families import build_tiny_model, get_family  # noqa: E402
from tuneforge.models.quantized_experts import Nf4Weight, is_nf4_parametrized, quantize_fused_experts  # noqa: E402

TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _mixtral() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny_model(get_family("Mixtral")).to(torch.bfloat16)


def test_the_experts_are_stored_in_four_bits_and_read_back_close_to_their_values():
    model = _mixtral()
    reference = copy.deepcopy(model)
    experts = model.model.layers[0].mlp.experts
    original = experts.gate_up_proj.detach().clone()
    assert quantize_fused_experts(model) == 2 * 2  # gate_up and down in both layers
    assert is_nf4_parametrized(experts, "gate_up_proj") and is_nf4_parametrized(experts, "down_proj")
    stored = experts.parametrizations.gate_up_proj.original0
    assert stored.dtype == torch.uint8 and stored.numel() == original.numel() // 2  # two values a byte
    read = experts.gate_up_proj
    assert read.shape == original.shape and read.dtype == torch.bfloat16
    error = (read.float() - original.float()).abs().mean() / original.float().abs().mean()
    assert 0 < error < 0.25  # NF4 rounding (16 levels a block of 64); an unrelated tensor is about 1.1
    with torch.no_grad():
        quantized_logits, logits = model(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits
    assert torch.nn.functional.cosine_similarity(quantized_logits.flatten().float(), logits.flatten().float(), dim=0) > 0.98
    assert not any(p.requires_grad for n, p in model.named_parameters() if "original" in n)


def test_each_experts_call_dequantizes_each_weight_once(monkeypatch):
    model = _mixtral()
    quantize_fused_experts(model)
    calls = []
    original = Nf4Weight.forward
    monkeypatch.setattr(Nf4Weight, "forward", lambda self, packed: calls.append(1) or original(self, packed))
    with torch.no_grad():
        model(input_ids=TOKENS)
    # The eager expert loop indexes the weight once per expert it routes to: without the cache
    # that would dequantize every weight up to 4 times a layer here.
    assert len(calls) == 2 * 2


def test_lora_over_quantized_experts_trains_attention_and_router_and_leaves_the_experts():
    model = _mixtral()
    quantize_fused_experts(model)
    packed_before = model.model.layers[0].mlp.experts.parametrizations.gate_up_proj.original0.clone()
    model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in trained) and any("mlp.gate.lora_A" in n for n in trained)
    assert not any("experts" in n for n in trained)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert len(experts.parametrizations.gate_up_proj) == 1  # peft left no parametrization of its own behind
    assert torch.equal(experts.parametrizations.gate_up_proj.original0, packed_before)


def _saved_mixtral(directory) -> str:
    """A Mixtral whose 16-bit experts (25 MB) are most of it, saved as a checkpoint."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=640, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(str(directory))
    return str(directory)


def _load_4bit(path: str, monkeypatch, via_cpu: bool, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The model tuneforge loads, and how far its loading raised the device memory's peak above
    what was allocated before (CUDA)."""
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models import loading

    if device.type == "cpu":  # bitsandbytes quantizes on the CPU too: run the GPU path's steps here
        monkeypatch.setattr(loading, "check_quantization_support", lambda config: None)
        monkeypatch.setattr(loading, "_local_device", lambda: device)
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    config = ModelConfig(path=path, quantization="4bit", quantize_via_cpu=via_cpu, dtype="bfloat16")
    model = loading.load_model(config).train()  # as in training (bitsandbytes repacks CPU weights for eval)
    return model, torch.cuda.max_memory_allocated() - before if device.type == "cuda" else 0


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
)
def test_quantizing_via_cpu_memory_stores_the_same_model_without_the_16_bit_experts_on_the_device(tmp_path, monkeypatch, device):
    """`model.quantize_via_cpu`: the checkpoint loads into CPU memory, the experts are stored as
    NF4 on the device one tensor at a time, then the model moves there. On a GPU loading peaks
    at the quantized model plus one expert tensor, not the 16-bit model (Mixtral-8x7B's experts
    are 88 GiB in bf16: more than an 80 GB H100)."""
    import bitsandbytes

    device = torch.device(device)
    path = _saved_mixtral(tmp_path / "mixtral")
    model, via_cpu_peak = _load_4bit(path, monkeypatch, via_cpu=True, device=device)
    experts = model.model.layers[0].mlp.experts
    assert is_nf4_parametrized(experts, "gate_up_proj") and is_nf4_parametrized(experts, "down_proj")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bitsandbytes.nn.Linear4bit)
    assert {p.device.type for p in model.parameters()} == {device.type}
    # The GPU's index (the "cuda" asked for here is the current one), as accelerate names devices.
    assert model.hf_device_map == {"": torch.cuda.current_device() if device.type == "cuda" else "cpu"}
    tokens = torch.randint(0, 640, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        via_cpu_logits = model(input_ids=tokens).logits
    direct, direct_peak = _load_4bit(path, monkeypatch, via_cpu=False, device=device)
    with torch.no_grad():
        direct_logits = direct(input_ids=tokens).logits
    # The same NF4 values (bitsandbytes' CPU and CUDA quantizers round alike up to ties).
    assert torch.nn.functional.cosine_similarity(via_cpu_logits.flatten().float(), direct_logits.flatten().float(), dim=0) > 0.999
    if device.type == "cuda":
        # Loading on the GPU holds all 16-bit experts (25 MB) before storing them as NF4; through
        # CPU memory one expert tensor at a time (8 MB at most).
        experts_16bit = 2 * 2 * 8 * (2 * 1024 * 256 + 256 * 1024)
        assert direct_peak - via_cpu_peak > experts_16bit / 2, (via_cpu_peak, direct_peak)


def test_quantize_via_cpu_is_a_4bit_setting():
    from pydantic import ValidationError

    from tuneforge.config.schema import ModelConfig

    with pytest.raises(ValidationError, match="quantize_via_cpu is for quantization: 4bit"):
        ModelConfig(path="x", quantization="8bit", quantize_via_cpu=True)
