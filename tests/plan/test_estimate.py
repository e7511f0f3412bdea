"""The planner's arithmetic: exact parameter counts, optimizer and 4-bit bytes by hand, sharding,
activations against memory measured on a CPU, and peaks against ones measured on an H200."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.train.test_recipe import config as recipe_config
from tuneforge.bench.cases import SHAPES
from tuneforge.config.loading import load_config
from tuneforge.methods.prepare import count_parameters, prepare_model
from tuneforge.models.loading import load_model
from tuneforge.plan.estimate import (
    GIB,
    NF4_BYTES_PER_PARAMETER,
    Strategy,
    estimate_memory,
    optimizer_state_bytes,
    weight_bytes,
)
from tuneforge.plan.planner import build_meta_model


@pytest.mark.parametrize(
    "method",
    [{"name": "full"}, {"name": "lora", "r": 4}, {"name": "freeze", "last_layers": 1}],
)
def test_parameter_counts_from_the_meta_model_equal_the_instantiated_ones(tmp_path, tiny_model_dir, method):
    config = load_config({**recipe_config(tmp_path, tiny_model_dir), "method": method})
    meta = build_meta_model(config)
    assert all(p.device.type == "meta" for p in meta.parameters())
    _, real = prepare_model(config.method, load_model(config.model))
    assert count_parameters(meta) == real


def test_optimizer_bytes_follow_the_parameter_dtype_and_the_optimizer():
    assert optimizer_state_bytes("adamw_torch_fused", 1000, 4) == 8000  # two fp32 moments
    assert optimizer_state_bytes("adamw_torch", 1000, 2) == 4000  # bf16 weights: bf16 moments
    assert optimizer_state_bytes("adamw_bnb_8bit", 1000, 2) == 2000
    assert optimizer_state_bytes("lion_32bit", 1000, 4) == 4000
    assert optimizer_state_bytes("sgd", 1000, 4) == 0


def _tiny(dtype):
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=False,
        )).to(dtype)


def test_full_fine_tuning_state_by_hand():
    model = _tiny(torch.bfloat16)
    # per layer: q, o 16x16; k, v 16x8; gate, up, down 16x32; two norms of 16
    per_layer = 2 * 256 + 2 * 128 + 3 * 512 + 2 * 16
    parameters = 2 * 100 * 16 + 2 * per_layer + 16
    estimate = estimate_memory(model, tokens=64, liger=False)
    assert count_parameters(model).total == parameters
    assert estimate.weights == estimate.gradients == 2 * parameters
    assert estimate.optimizer == 4 * parameters
    fp32 = estimate_memory(_tiny(torch.float32), tokens=64, liger=False, compute_16bit=False)
    assert fp32.optimizer == 8 * parameters


def test_qlora_weights_are_nf4_for_the_layers_and_bf16_for_embeddings_head_and_norms():
    model = get_peft_model(_tiny(torch.bfloat16), LoraConfig(r=2, target_modules="all-linear"))
    linear = 2 * (2 * 256 + 2 * 128 + 3 * 512)
    rest = 2 * 100 * 16 + 2 * 2 * 16 + 16  # embeddings, head, norms
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # peft upcasts adapters
    assert weight_bytes(model, "4bit") == int(512 * NF4_BYTES_PER_PARAMETER) * 2 * 3 + int(
        256 * NF4_BYTES_PER_PARAMETER
    ) * 2 * 2 + int(128 * NF4_BYTES_PER_PARAMETER) * 2 * 2 + 2 * rest + 4 * adapters
    assert sum(p.numel() for p in model.parameters()) == linear + rest + adapters
    estimate = estimate_memory(model, tokens=64, liger=True, quantization="4bit")
    assert estimate.gradients == 4 * adapters and estimate.optimizer == 8 * adapters
    # A recomputed layer keeps its linears' weights in bf16 for its backward: one of the two
    # alike layers' values (half of `linear`), 2 bytes each.
    assert estimate.recomputed_weights == linear // 2 * 2
    without = dataclasses.replace(estimate, recomputed_weights=0)
    assert estimate.total(1) - without.total(1) == estimate.recomputed_weights
    assert estimate.total(0) == without.total(0)  # nothing recomputed
    assert estimate_memory(model, tokens=64, liger=True, quantization="8bit").recomputed_weights == 0


def test_sharding_divides_what_each_strategy_shards():
    estimate = estimate_memory(_tiny(torch.bfloat16), tokens=64, liger=True)
    zero3 = estimate.sharded(Strategy.parse("zero3"), gpus=4)
    assert (zero3.weights, zero3.gradients, zero3.optimizer) == (
        estimate.weights // 4, estimate.gradients // 4, estimate.optimizer // 4
    )
    zero1 = estimate.sharded(Strategy.parse("zero1"), gpus=4)
    assert (zero1.weights, zero1.optimizer) == (estimate.weights, estimate.optimizer // 4)
    assert zero1.comm_buffers == estimate.gradients  # unsharded gradients go through reduction buckets
    assert estimate.sharded(Strategy.parse("ddp"), gpus=4).comm_buffers == 0  # gradients are the buckets
    assert estimate.sharded(Strategy.parse("zero2-offload"), gpus=2).optimizer == 0
    assert Strategy.from_train(type("T", (), {"fsdp": "full_shard auto_wrap", "deepspeed": None})()).shard_weights
    assert estimate.sharded(Strategy(), gpus=1) == estimate
    base = {"model": {"path": "m"}, "data": {"datasets": [{"path": "a.jsonl"}]}}
    zero = load_config({**base, "distributed": {"strategy": "deepspeed", "zero_stage": 2, "offload_optimizer": True}})
    assert Strategy.from_config(zero).name == "zero2-offload"
    assert Strategy.from_config(load_config(base)).name == "ddp"


def test_activation_estimate_matches_the_memory_saved_for_backward_on_a_cpu():
    """Measured: the bytes of every distinct storage autograd saves during a forward pass
    (weights excluded), of a fp32 Llama without Liger. Stated tolerance: 25%."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2,
    ))
    ids = torch.randint(0, 512, (2, 128))
    saved: dict[int, int] = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(size for pointer, size in saved.items() if pointer not in weights)
    predicted = estimate_memory(model, tokens=ids.numel(), liger=False, compute_16bit=False).activations()
    assert predicted == pytest.approx(measured, rel=0.25)


def _meta(shape, lora):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=16, target_modules="all-linear")) if lora else model


# Peaks (torch.cuda.max_memory_allocated, GiB) measured on an H200 with Liger and fused AdamW
# (docs/planner.md): (shape, LoRA, micro-batch x sequence, quantization, recompute every, offload, Liger).
MEASURED = [
    ("llama-8b", True, 4096, "none", 0, False, True, 39.1),
    ("llama-8b", True, 4096, "none", 6, False, True, 34.9),
    ("llama-8b", True, 4096, "none", 3, False, True, 31.5),
    ("llama-8b", True, 4096, "none", 1, True, True, 16.9),
    ("llama-8b", True, 4096, "4bit", 0, False, True, 25.2),
    ("llama-8b", True, 4096, "4bit", 1, False, True, 7.9),
    ("llama-8b", True, 4096, "4bit", 1, True, True, 7.1),
    ("llama-1b", False, 8192, "none", 0, False, True, 18.2),
    ("llama-8b", True, 4096, "none", 1, False, False, 22.4),  # plain HF Trainer, checkpointing
    ("llama-1b", False, 8192, "none", 0, False, False, 33.4),  # plain HF Trainer
]


def test_predicted_peaks_are_within_15_percent_of_the_h200_measurements():
    models = {(shape, lora): _meta(shape, lora) for shape, lora in {(row[0], row[1]) for row in MEASURED}}
    for shape, lora, tokens, quantization, every, offload, liger, measured in MEASURED:
        estimate = estimate_memory(models[shape, lora], tokens, liger=liger, quantization=quantization)
        predicted = estimate.total(every, offload) / GIB
        assert predicted == pytest.approx(measured, rel=0.15), (shape, lora, quantization, every, offload, liger)


def test_qlora_peaks_with_tuneforge_s_fused_adapters_are_within_15_percent_of_the_h200_measurements():
    """tuneforge's QLoRA path (`methods/fused_lora.py`) on the 8B shape, micro-batch 2 x 2048
    (docs/benchmarks.md, 2026-11-30). Every activation kept: 19.8 GiB eager; 39.0 compiled, whose
    graphs keep each layer's dequantized weights for the backward (32 x 0.41 GiB)."""
    from tuneforge.methods.fused_lora import install_fused_lora, install_fused_lora_mlp

    model = _meta("llama-8b", lora=True)
    install_fused_lora(model)
    install_fused_lora_mlp(model)
    # (compiled, recompute every, offload, measured): offloaded, every layer recomputed, 7.1 eager
    # and 7.2 compiled (`speed.compile` auto's choice there).
    for compiled, every, offload, measured in [(False, 0, False, 19.8), (True, 0, False, 39.0), (False, 1, True, 7.1), (True, 1, True, 7.2)]:
        estimate = estimate_memory(model, 4096, liger=True, quantization="4bit", compiled=compiled)
        assert estimate.total(every, offload) / GIB == pytest.approx(measured, rel=0.15), (compiled, every, offload)
    eager = estimate_memory(model, 4096, liger=True, quantization="4bit")
    compiled = estimate_memory(model, 4096, liger=True, quantization="4bit", compiled=True)
    assert compiled.recomputed_weights == 0 and eager.recomputed_weights > 0.4 * GIB
    assert compiled.per_layer - eager.per_layer >= eager.recomputed_weights
    # CUDA graphs of the offloaded layers (ninth session): 8.3 GiB measured with two call shapes
    # captured; the pool keeps one layer's activations and dense weights beside a packed copy of it.
    graphed = estimate_memory(model, 4096, liger=True, quantization="4bit", graphed=True)
    assert graphed.total(1, True) / GIB == pytest.approx(8.3, rel=0.15)
    assert 0.9 * GIB < graphed.graph_pool < 1.6 * GIB and eager.graph_pool == 0


def test_fsdp_with_mixed_precision_is_planned_with_fp32_master_weights_as_measured_on_two_h200s():
    """accelerate's FSDP2 under bf16 mixed precision upcasts the trainable weights to fp32, and
    their gradients and Adam moments follow. Full fine-tuning of the 8B shape, micro-batch 2 x
    2048 per GPU, 2 H200s (docs/benchmarks.md): tuneforge (Liger, no recomputation) peaked at
    67.4 GiB on rank 0 where the plan, counting bf16 weights, said 44.7; plain HF (checkpointing)
    at 62.3 GiB."""
    base = {"model": {"path": "m"}, "data": {"datasets": [{"path": "a.jsonl"}]}, "train": {"bf16": True}}
    fsdp = Strategy.from_config(load_config({**base, "distributed": {"strategy": "fsdp"}}))
    assert fsdp.fp32_master
    assert not Strategy.from_config(load_config({**base, "distributed": {"strategy": "deepspeed", "zero_stage": 3}})).fp32_master
    assert not Strategy.from_config(load_config({**base, "train": {}, "distributed": {"strategy": "fsdp"}})).fp32_master

    model = _meta("llama-8b", lora=False)
    parameters = count_parameters(model).trainable
    bf16 = estimate_memory(model, 4096, liger=True)
    master = estimate_memory(model, 4096, liger=True, fp32_master=True)
    assert master.weights - bf16.weights == 2 * parameters
    assert (master.gradients, master.optimizer) == (4 * parameters, 8 * parameters)
    for liger, every, measured in ((True, 0, 67.4), (False, 1, 62.3)):
        estimate = estimate_memory(model, 4096, liger=liger, fp32_master=True).sharded(fsdp, gpus=2)
        assert estimate.total(every, False) / GIB == pytest.approx(measured, rel=0.05)
    # `train.bf16: false`: the bf16 weights train as they are, 44.6 GiB measured.
    bf16_fsdp = Strategy.from_config(load_config({**base, "train": {"bf16": False}, "distributed": {"strategy": "fsdp"}}))
    assert bf16.sharded(bf16_fsdp, gpus=2).total(0, False) / GIB == pytest.approx(44.6, rel=0.05)


def test_zero3_with_mixed_precision_is_planned_with_an_fp32_master_copy_as_measured_on_two_h200s():
    """DeepSpeed under bf16 keeps fp32 master weights beside the bf16 ones (ZeRO counts them as
    optimizer state) and its gradients in bf16. Full fine-tuning of the 8B shape, micro-batch
    2 x 2048 per GPU, 2 H200s (docs/benchmarks.md): tuneforge (Liger, no recomputation) peaked at
    81.9 GiB on rank 0 where the plan, counting bf16 weights and moments, said 44.7; plain HF
    (checkpointing, no Liger) at 68.8 GiB."""
    base = {"model": {"path": "m"}, "data": {"datasets": [{"path": "a.jsonl"}]}, "train": {"bf16": True}}
    zero3 = Strategy.from_config(load_config({**base, "distributed": {"strategy": "deepspeed", "zero_stage": 3}}))
    assert zero3.master_copy and not zero3.fp32_master
    assert not Strategy.from_config(load_config({**base, "distributed": {"strategy": "fsdp"}})).master_copy
    assert not Strategy.from_config(load_config({**base, "train": {}, "distributed": {"strategy": "deepspeed"}})).master_copy

    model = _meta("llama-8b", lora=False)
    parameters = count_parameters(model).trainable
    bf16 = estimate_memory(model, 4096, liger=True)
    master = estimate_memory(model, 4096, liger=True, master_copy=True)
    assert master.weights == bf16.weights and master.gradients == bf16.gradients == 2 * parameters
    assert master.optimizer == 12 * parameters  # fp32 copy and two fp32 moments
    for liger, every, measured in ((True, 0, 81.9), (False, 1, 68.8)):
        estimate = estimate_memory(model, 4096, liger=liger, master_copy=True).sharded(zero3, gpus=2)
        assert estimate.total(every, False) / GIB == pytest.approx(measured, rel=0.05)


def test_a_quantized_moe_plan_counts_its_fused_experts_as_tuneforge_stores_them(tmp_path, tiny_model_dir):
    """bitsandbytes quantizes linear layers only: 8-bit keeps the fused 3-D experts in 16 bits;
    4-bit stores them as NF4 (models/quantized_experts.py) and dequantizes one layer's at a time."""
    from transformers import MixtralConfig

    from tuneforge.plan.estimate import NF4_BYTES_PER_PARAMETER
    from tuneforge.plan.planner import PlanOptions, plan_config

    mixtral = tmp_path / "tiny-mixtral"
    MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    ).save_pretrained(str(mixtral))
    settings = recipe_config(tmp_path, tiny_model_dir)
    settings["method"] = {"name": "lora", "r": 4}
    values = 2 * 4 * (2 * 96 * 64 + 64 * 96)  # layers x experts x (gate_up + down)
    plans = {
        bits: plan_config(load_config({**settings, "model": {"path": str(mixtral), "init": "random", "quantization": bits}}),
                          PlanOptions(tokens=1000))
        for bits in ("4bit", "8bit")
    }
    assert f"fused MoE experts ({values * 2 / GIB:.1f} GiB, 3-D parameters) stay in" in plans["8bit"].table()
    assert "stores this model's fused MoE experts" in plans["4bit"].table() and plans["4bit"].to_json()["notes"]
    # 8-bit: the experts' bf16 bytes on top of the quantized rest; 4-bit: their NF4 bytes (the
    # linear layers' 8-bit storage adds a little more to the difference).
    difference = plans["8bit"].estimate.weights - plans["4bit"].estimate.weights
    assert values * (2 - NF4_BYTES_PER_PARAMETER) <= difference < values * (2 - NF4_BYTES_PER_PARAMETER) * 1.1
    # One layer's experts are dequantized while it computes: in each layer's activations.
    one_layer = values // 2 * 2
    assert plans["4bit"].estimate.per_layer - plans["8bit"].estimate.per_layer == one_layer
    dense = plan_config(load_config({**settings, "model": {"path": str(tiny_model_dir), "quantization": "4bit"}}), PlanOptions(tokens=1000))
    assert dense.notes == []


def test_the_plan_compiles_a_4bit_model_whose_every_layer_is_recomputed(tmp_path, tiny_model_dir):
    """`speed.compile: auto` as the planner applies it, with the memory it counts for compiled layers."""
    from tuneforge.plan.planner import PlanOptions, plan_config

    settings = {**recipe_config(tmp_path, tiny_model_dir), "method": {"name": "lora", "r": 4}}
    settings["model"] = {**settings["model"], "quantization": "4bit"}

    def plan(**speed):
        return plan_config(load_config({**settings, "speed": speed}), PlanOptions(tokens=1000))

    offloaded = plan(activations="offload")
    assert offloaded.setup["compiled"] and "layers compiled, activations offloaded" in offloaded.table()
    graphed = plan(activations="offload", cuda_graphs=True)
    assert graphed.setup["graphed"] and not graphed.setup["compiled"] and "CUDA graphs, activations offloaded" in graphed.table()
    kept, eager = plan(activations="keep"), plan(activations="offload", compile=False)
    assert not kept.setup["compiled"] and not eager.setup["compiled"]
    assert "layers compiled" not in eager.table()
    assert offloaded.estimate.per_layer > eager.estimate.per_layer  # the dequantized weights a compiled layer keeps
    assert plan(activations="keep", compile=True).setup["compiled"]
