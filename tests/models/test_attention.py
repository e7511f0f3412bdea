"""Attention for packed batches: backend choice and refusal (CPU), the varlen kernel (GPU).

    python -m pytest -m gpu tests/models/test_attention.py -q     # on a CUDA machine
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from tuneforge.data.packing import PackedCollator, build_packed_dataset
from tuneforge.data.tokenize import IGNORE_INDEX, Example
from tuneforge.errors import ConfigError
from tuneforge.models.attention import (
    VARLEN_ATTENTION,
    check_packed_isolation,
    enable_packed_attention,
    register_varlen_attention,
    varlen_attention_forward,
    varlen_available,
)

needs_varlen = pytest.mark.skipif(
    not varlen_available(), reason="needs CUDA and torch.nn.attention.varlen (torch >= 2.10)"
)


def _tiny(family: str = "llama", dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides):
    settings = dict(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**settings))
    else:
        model = LlamaForCausalLM(LlamaConfig(**settings))
    return model.to(device=device, dtype=dtype)


def _leaky_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    # A backend that ignores masks and boundaries: plain causal over the flattened sequence.
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# --- CPU -------------------------------------------------------------------------------------


def test_cpu_keeps_the_mask_backend_and_it_passes_the_probe():
    model = _tiny()
    assert enable_packed_attention(model) == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert enable_packed_attention(model) == "eager"


def test_varlen_set_off_cuda_falls_back_to_sdpa():
    model = _tiny()
    model.set_attn_implementation(register_varlen_attention())
    assert enable_packed_attention(model) == "sdpa"


def test_refuses_a_backend_that_is_not_verified():
    AttentionInterface.register("tuneforge_test_leaky", _leaky_attention)
    model = _tiny()
    model.set_attn_implementation("tuneforge_test_leaky")
    with pytest.raises(ConfigError, match="`tuneforge_test_leaky` is not one tuneforge has verified") as info:
        enable_packed_attention(model)
    assert info.value.where == "model.attn_implementation"


def test_probe_catches_a_backend_that_leaks():
    AttentionInterface.register("tuneforge_test_leaky", _leaky_attention)
    model = _tiny()
    model.set_attn_implementation("tuneforge_test_leaky")
    with pytest.raises(ConfigError, match="lets packed examples see each other"):
        check_packed_isolation(model)
    model.set_attn_implementation("sdpa")
    assert check_packed_isolation(model) < 1e-4


def test_varlen_backend_handles_padded_batches_like_sdpa():
    # Generation after packed training pads prompts: the varlen backend hands those to sdpa.
    model = _tiny(family="mistral", sliding_window=4).eval()
    input_ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
    attention_mask = (torch.arange(8) >= torch.tensor([[2], [0]])).long()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation(register_varlen_attention())
        got = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got[attention_mask.bool()], expected[attention_mask.bool()])


# --- GPU -------------------------------------------------------------------------------------


def _reference(q, k, v, cu, scaling, window):
    """Per-sequence float32 sdpa: the obviously correct answer the kernel must match."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    for start, end in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[start:end].float().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        i = torch.arange(end - start, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[:, None] - i[None, :] < window
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scaling).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.gpu
@needs_varlen
@pytest.mark.parametrize("window", [None, 8])
def test_varlen_kernel_matches_per_sequence_sdpa(window):
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim, scaling = [5, 17, 64, 1, 33], 8, 2, 64, 0.1
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    total = cu[-1]
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu_t = torch.tensor(cu, device="cuda", dtype=torch.int32)
    out, _ = varlen_attention_forward(
        torch.nn.Module(),
        *(x.transpose(0, 1)[None] for x in (q, k, v)),  # transformers' [1, heads, tokens, dim]
        None,
        scaling=scaling,
        sliding_window=window,
        cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t, max_length_q=max(lengths), max_length_k=max(lengths),
    )
    assert out.shape == (1, total, heads, dim) and out.dtype == torch.bfloat16
    grad = torch.randn_like(out)
    got = [out[0].float(), *torch.autograd.grad(out, (q, k, v), grad)]

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = _reference(q32, k32, v32, cu, scaling, window)
    expected = [ref, *torch.autograd.grad(ref, (q32, k32, v32), grad[0].float())]
    # bf16 inputs and output: about 3 significant digits (measured on an H100: at most 4.3e-3).
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, expected):
        assert (a.float() - b).abs().max() <= 2e-2 * b.abs().max() + 1e-3, name


def _examples(vocab_size: int) -> list[Example]:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length, prompt in [(37, 10), (90, 30), (12, 4), (64, 20), (25, 5)]:
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        examples.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


@pytest.mark.gpu
@needs_varlen
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_bf16_logits_and_grads_with_varlen_match_examples_alone(family):
    overrides = {"sliding_window": 16} if family == "mistral" else {}
    model = _tiny(family, dtype=torch.bfloat16, device="cuda", **overrides)
    assert enable_packed_attention(model) == VARLEN_ATTENTION  # includes the packed probe
    model.train()
    dataset, _ = build_packed_dataset(_examples(model.config.vocab_size), max_length=128)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in PackedCollator()(list(dataset)).items()}
    cu = batch["cu_seq_lens_q"].tolist()
    packed = model(**batch)
    packed.loss.backward()
    packed_grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # Reference: each example alone through sdpa, an independent kernel.
    model.set_attn_implementation("sdpa")
    labels = batch["labels"][0]
    alone_logits, total, count = [], 0.0, 0
    for start, end in zip(cu[:-1], cu[1:]):
        logits = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
        alone_logits.append(logits)
        target = labels[start + 1 : end]
        keep = target != IGNORE_INDEX
        total = total + F.cross_entropy(logits[:-1][keep].float(), target[keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()

    # bf16 end to end, logits of order 1 (measured on an H100: logits 2e-3, gradients 8e-3 relative).
    gap = (packed.logits[0].float() - torch.cat(alone_logits).float()).abs().max().item()
    assert gap <= 3e-2, gap
    torch.testing.assert_close(packed.loss.float(), (total / count).float(), atol=2e-3, rtol=2e-3)
    for name, p in model.named_parameters():
        expected = p.grad.float()
        assert (packed_grads[name] - expected).abs().max() <= 5e-2 * expected.abs().max() + 1e-4, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_varlen_is_chosen_for_a_model_still_on_the_cpu_when_training_runs_on_cuda(tmp_path):
    """The recipe loads models on the CPU; the Trainer moves them later."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models.attention import (
        VARLEN_ATTENTION,
        enable_packed_attention,
        varlen_available,
    )

    if not varlen_available():
        pytest.skip("torch has no varlen_attn")
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    assert enable_packed_attention(model, device="cuda") == VARLEN_ATTENTION
