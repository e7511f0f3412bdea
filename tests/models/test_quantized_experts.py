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
