"""The fused LoRA forward (methods/fused_lora.py) against peft's own: same outputs, same gradients,
fewer saved bytes, plain-LoRA merging, and the same training run through the config switch."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from tests.conftest import successor_rows, write_jsonl
from tuneforge.methods import fused_lora
from tuneforge.methods.fused_lora import (
    FusedLora,
    install_fused_lora,
    install_fused_lora_mlp,
    install_norm_recompute,
)
from tuneforge.plan.estimate import estimate_memory
from tuneforge.train import train

TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))


def _lora_model(dtype: torch.dtype = torch.float32, **lora) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).to(dtype)
    # init_lora_weights=False: B is random too, so the adapters change the output from step 0.
    settings = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))


def _loss_and_grads(model: torch.nn.Module, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    device = next(model.parameters()).device
    tokens = TOKENS.to(device)
    embeddings = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(inputs_embeds=embeddings, labels=tokens).loss
    loss.backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, embeddings.grad.float()


def test_fp32_outputs_and_gradients_equal_peft():
    peft_model = _lora_model()
    fused_model = copy.deepcopy(peft_model)
    assert install_fused_lora(fused_model) == 2 * 7  # every adapted linear of both layers
    peft_loss, peft_grads, peft_input_grad = _loss_and_grads(peft_model)
    fused_loss, fused_grads, fused_input_grad = _loss_and_grads(fused_model)
    assert fused_loss.item() == pytest.approx(peft_loss.item(), rel=1e-6)
    assert set(fused_grads) == set(peft_grads) and len(fused_grads) == 2 * 7 * 2
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(fused_input_grad, peft_input_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA matmul path needs a CUDA device"),
        ]),
    ],
)
def test_bf16_base_with_fp32_adapters_matches_peft_under_autocast_and_keeps_adapter_dtypes(device):
    peft_model = _lora_model(torch.bfloat16, r=8).to(device)
    # peft keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype): the case that copies.
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    fused_model = copy.deepcopy(peft_model)
    install_fused_lora(fused_model)
    peft_loss, peft_grads, _ = _loss_and_grads(peft_model, autocast=True)
    fused_loss, fused_grads, _ = _loss_and_grads(fused_model, autocast=True)
    assert fused_loss.item() == pytest.approx(peft_loss.item(), rel=1e-2)
    for name, grad in peft_grads.items():
        fused = fused_grads[name]
        assert fused.dtype == grad.dtype
        cosine = torch.nn.functional.cosine_similarity(fused.flatten(), grad.flatten(), dim=0)
        assert cosine > 0.999, (name, cosine)


def _saved_bytes(model: torch.nn.Module, autocast: bool = True) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    embeddings = model.get_input_embeddings()(TOKENS).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(inputs_embeds=embeddings, labels=TOKENS)
    return sum(storages.values())


def test_fused_forward_keeps_no_copies_of_layer_inputs():
    peft_model = _lora_model(torch.bfloat16)
    fused_model = copy.deepcopy(peft_model)
    install_fused_lora(fused_model)
    peft_bytes, fused_bytes = _saved_bytes(peft_model), _saved_bytes(fused_model)
    # peft keeps a bf16 copy of the input per adapted linear (7 per layer, hidden 64 or 160 wide);
    # reading q/k/v and gate/up inputs as they are saves at least the 3 extra copies per layer.
    tokens = TOKENS.numel()
    assert peft_bytes - fused_bytes >= 2 * 3 * tokens * 64 * 2, (peft_bytes, fused_bytes)
    # The planner's estimate sees the same: fewer bytes per layer with the fused forward.
    assert estimate_memory(fused_model, tokens, liger=False).per_layer < estimate_memory(peft_model, tokens, liger=False).per_layer


@pytest.mark.parametrize(
    ("dtype", "device"),
    [
        (torch.float64, "cpu"),
        (torch.bfloat16, "cpu"),
        pytest.param(torch.bfloat16, "cuda", marks=[  # Liger's SwiGLU kernels
            pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ]),
    ],
)
def test_the_fused_mlp_gives_the_fused_adapters_outputs_and_gradients(dtype, device):
    reference = _lora_model(dtype).to(device)
    install_fused_lora(reference)
    fused = copy.deepcopy(reference)
    assert install_fused_lora_mlp(fused) == 2
    ref_loss, ref_grads, ref_input_grad = _loss_and_grads(reference)
    loss, grads, input_grad = _loss_and_grads(fused)
    assert set(grads) == set(ref_grads)
    if dtype == torch.float64:  # compared in fp32 (`_loss_and_grads`): summation order only
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(input_grad, ref_input_grad, rtol=1e-6, atol=1e-7)
        return
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-2)  # bf16: the same direction, rounding apart
    for name, grad in [*ref_grads.items(), ("input", ref_input_grad)]:
        mine = input_grad if name == "input" else grads[name]
        assert torch.nn.functional.cosine_similarity(mine.flatten(), grad.flatten(), dim=0) > 0.999, name


def test_the_fused_mlp_keeps_gate_and_up_but_not_their_product():
    """The down adapter's input, silu(gate) * up, is what a LoRA MLP would keep on top of the
    SwiGLU's gate and up: one ffn-wide tensor a token per layer (3.5 GiB on an 8B model)."""
    reference = _lora_model(torch.bfloat16)
    install_fused_lora(reference)
    fused = copy.deepcopy(reference)
    install_fused_lora_mlp(fused)
    ffn_wide = TOKENS.numel() * 160 * 2  # bf16 bytes of one ffn-wide activation
    assert _saved_bytes(reference) - _saved_bytes(fused) >= 2 * ffn_wide  # both layers, at least the product each
    plain = copy.deepcopy(reference)
    plain.base_model.model.model.layers[0].mlp.act_fn = torch.nn.GELU()  # not SwiGLU: left alone
    assert install_fused_lora_mlp(plain) == 1
    # The planner counts it: the largest layer (the GELU one, unfused) keeps the product too.
    tokens = TOKENS.numel()
    kept = estimate_memory(plain, tokens, liger=True).per_layer - estimate_memory(reference, tokens, liger=True).per_layer
    assert kept == ffn_wide


def test_the_fused_mlp_follows_the_adapter_switches():
    """A DPO reference pass runs with the adapters off; a merged adapter is in the weights."""
    model = _lora_model()
    install_fused_lora(model)
    install_fused_lora_mlp(model)
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=TOKENS).logits
        base = copy.deepcopy(model).base_model.model
        for module in base.modules():
            if hasattr(module, "disable_adapters") and hasattr(module, "lora_A"):
                module.enable_adapters(False)
        torch.testing.assert_close(off, base(input_ids=TOKENS).logits)
        on = model(input_ids=TOKENS).logits
        assert not torch.allclose(on, off)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=TOKENS).logits, on, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        merged = model.merge_and_unload()  # plain linear layers under the MLP's forward now
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, on, rtol=1e-4, atol=1e-5)


def test_the_adapter_adds_into_the_base_output_without_a_copy():
    """An out-of-place addmm first copies the base output into its own (5 ms a step on 8B LoRA).
    With dropout the adapter reads another input than the base and runs after peft's base call."""
    model = _lora_model(lora_dropout=0.1)
    install_fused_lora(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}
    q_proj.base_layer.register_forward_hook(lambda module, args, output: seen.__setitem__("base", output.data_ptr()))
    q_proj.register_forward_hook(lambda module, args, output: seen.__setitem__("lora", output.data_ptr()))
    model(input_ids=TOKENS)
    assert seen["lora"] == seen["base"]


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
)
def test_compiled_adapters_add_into_the_base_output_in_place(device):
    """Under `torch.compile` the in-place add of the adapter's product would become an out-of-place
    `addmm`, which copies the base output into a new buffer first (15 ms a step of offloaded
    QLoRA-8B). On a GPU compiled layers add it with Triton's kernel in place, forward and backward;
    without Triton (CPU builds) the add stays an `addmm`. Both give the eager loss and gradients."""
    from torch._inductor.utils import run_and_get_code

    from tuneforge.methods import low_rank_add
    from tuneforge.train.speed import compile_decoder_layers

    def run(compiled: bool):
        model = _lora_model(torch.bfloat16).to(device)
        install_fused_lora(model)
        install_fused_lora_mlp(model)
        if compiled:
            assert compile_decoder_layers(model) == 2
        return _loss_and_grads(model)

    eager_loss, eager_grads, eager_input_grad = run(False)
    torch._dynamo.reset()
    (loss, grads, input_grad), code = run_and_get_code(run, True)
    assert len(code) >= 2  # the layers' forward and backward
    lines = [line for source in code for line in source.splitlines()]
    if device == "cuda" and low_rank_add.add_low_rank_ is not None:
        assert not [line for line in lines if "addmm" in line]
        assert [line for line in lines if "add_low_rank_kernel" in line]
    torch.testing.assert_close(loss, eager_loss, rtol=1e-2, atol=0)
    for name, grad in [*eager_grads.items(), ("input", eager_input_grad)]:
        mine = input_grad if name == "input" else grads[name]
        assert torch.nn.functional.cosine_similarity(mine.flatten(), grad.flatten(), dim=0) > 0.999, name


def test_one_plain_adapter_runs_with_its_frozen_base_as_one_function_unless_the_base_has_hooks():
    """peft's forward calls the base linear, then the adapter: two autograd nodes and a layer
    of Python per linear, and a LoRA step is partly bound by that host work."""
    model = _lora_model()
    install_fused_lora(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj(TOKENS[:1, :, None].float().expand(1, 24, 64).contiguous().requires_grad_()).grad_fn.name() == (
        "_FrozenLinearLoraBackward"
    )
    calls = []
    q_proj.base_layer.register_forward_pre_hook(lambda module, args: calls.append(1))  # e.g. accelerate's offload
    model(input_ids=TOKENS)
    assert len(calls) == 1  # the hooked base is called, through peft's forward


def test_merging_a_fused_adapter_is_plain_lora_merging():
    model = _lora_model()
    install_fused_lora(model)
    with torch.no_grad():
        adapter_logits = model(input_ids=TOKENS).logits
        base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
        model.merge_adapter()
        merged_logits = model(input_ids=TOKENS).logits
        model.unmerge_adapter()
        torch.testing.assert_close(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, adapter_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)


def test_dora_adapters_keep_their_own_forward():
    model = _lora_model(use_dora=True)
    assert install_fused_lora(model) == 0
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not isinstance(q_proj.lora_variant["default"], FusedLora)
    assert getattr(q_proj, "cast_input_dtype_enabled", True)


def test_a_deepspeed_partitioned_adapter_runs_through_its_modules():
    """ZeRO-3 gathers a weight when its module runs, so a partitioned adapter is not read directly."""
    model = _lora_model()
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits
    install_fused_lora(model)
    calls = []
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            module.lora_A["default"].weight.ds_id = 1  # what DeepSpeed marks its parameters with
            module.lora_A["default"].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2 * 7


class _FusedCount(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.fused = sum(isinstance(m.lora_variant.get("default"), FusedLora) for m in model.modules() if hasattr(m, "lora_variant"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from tuneforge.methods.fused_lora import _swiglu_down_lora_forward

        self.fused_mlps = sum(getattr(m.forward, "__func__", None) is _swiglu_down_lora_forward for m in model.modules())


def test_the_config_switch_trains_the_same_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "successor.jsonl", successor_rows(24))
    losses, fused_layers = {}, {}
    for fused in (True, False):
        counter = _FusedCount()
        config = {
            "model": {"path": str(tiny_model_dir)},
            "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}],
                     "max_length": 64},
            "method": {"name": "lora", "r": 8, "lora_alpha": 16},
            "train": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
                      "save_strategy": "no", "use_cpu": True, "report_to": [], "seed": 0},
            "output": {"dir": str(tmp_path / f"run-{fused}"), "overwrite": True},
            "speed": {"fused_lora": fused},
        }
        result = train(config, callbacks=[counter])
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        losses[fused] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
        fused_layers[fused] = (counter.fused, counter.fused_mlps)
    assert fused_layers[False] == (0, 0)
    assert fused_layers[True] == (2 * 7, 2)  # every adapted linear, and both layers' MLPs
    assert len(losses[True]) == 6 and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.fixture(scope="module")
def four_bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("four-bit-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _qlora_model(path, device: str = "cpu") -> torch.nn.Module:
    """A QLoRA model as tuneforge loads one: NF4, double quantization, bf16 compute (bitsandbytes
    quantizes and dequantizes on the CPU too)."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, device_map=device)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False))


def test_4bit_layers_run_base_and_adapter_as_one_function_with_the_same_outputs_and_gradients(four_bit_dir, monkeypatch):
    """peft runs bitsandbytes' autograd function, clones its output and adds the adapter in a
    second one: a third of an 8B QLoRA step was the GPU waiting on that host work."""
    import bitsandbytes

    reference = _qlora_model(four_bit_dir)
    install_fused_lora(reference)
    for module in reference.modules():
        vars(module).pop("forward", None)  # peft's 4-bit forward with the fused adapter inside
    fused = _qlora_model(four_bit_dir)
    assert install_fused_lora(fused) == 2 * 7
    assert install_fused_lora_mlp(fused) == 2  # the 4-bit down projection too
    bitsandbytes_calls = []
    original = bitsandbytes.matmul_4bit
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", lambda *a, **k: bitsandbytes_calls.append(1) or original(*a, **k))
    ref_loss, ref_grads, ref_input_grad = _loss_and_grads(reference)
    assert len(bitsandbytes_calls) == 2 * 7  # the reference went through bitsandbytes' function
    bitsandbytes_calls.clear()
    loss, grads, input_grad = _loss_and_grads(fused)
    assert bitsandbytes_calls == []
    assert set(grads) == set(ref_grads) and all(g.dtype == torch.float32 for g in grads.values())
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-3)  # bf16 compute in both
    for name, grad in [*ref_grads.items(), ("input", ref_input_grad)]:
        mine = input_grad if name == "input" else grads[name]
        assert torch.nn.functional.cosine_similarity(mine.flatten(), grad.flatten(), dim=0) > 0.999, name


def test_4bit_fused_forward_follows_the_adapter_switches(four_bit_dir):
    model = _qlora_model(four_bit_dir).train()  # as in training (bitsandbytes repacks CPU weights for eval)
    install_fused_lora(model)
    install_fused_lora_mlp(model)
    with torch.no_grad():
        on = model(input_ids=TOKENS).logits
        with model.disable_adapter():
            off = model(input_ids=TOKENS).logits
        plain = LlamaForCausalLM.from_pretrained(four_bit_dir, quantization_config=model.config.quantization_config,
                                                 device_map="cpu").train()
        torch.testing.assert_close(off, plain(input_ids=TOKENS).logits)
        assert (on - off).abs().max() > 0.1


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
)
def test_compiled_4bit_layers_hold_the_fused_adapter_and_dequantization_in_one_graph(four_bit_dir, device):
    """`speed.compile` on a QLoRA model: each decoder layer compiles to one graph with no break
    (bitsandbytes' operators, not direct kernel calls, under compile) and trains as eager does."""
    from tuneforge.train.speed import compile_decoder_layers

    tokens = TOKENS.to(device)

    def loss_and_grads(compiled: bool):
        model = _qlora_model(four_bit_dir, device).train()
        install_fused_lora(model)
        install_fused_lora_mlp(model)
        if compiled:
            assert compile_decoder_layers(model) == 2
        parameters = {p.data_ptr() for p in model.parameters()}
        saved_shapes = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.data_ptr() not in parameters:
                saved_shapes.append(tuple(tensor.shape))
            return tensor

        with torch.autocast(device, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach().float(), grads, saved_shapes

    eager_loss, eager_grads, eager_saved = loss_and_grads(False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_loss, compiled_grads, compiled_saved = loss_and_grads(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-3, atol=0)
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        assert torch.nn.functional.cosine_similarity(compiled_grads[name].flatten(), grad.flatten(), dim=0) > 0.99, name
    # The compiled graph dequantizes each weight once for its forward and backward and keeps the
    # result (what the planner counts, `estimate_memory(compiled=True)`); eager keeps none.
    weights = [(64, 64), (32, 64), (32, 64), (64, 64), (160, 64), (160, 64), (64, 160)]  # q k v o gate up down
    assert not any(shape in weights for shape in eager_saved)
    # The first layer's q, k and v pass no gradient back to the frozen embeddings: not kept.
    assert sorted(shape for shape in compiled_saved if shape in weights) == sorted(weights + weights[3:])


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
)
def test_compiled_4bit_layers_take_packed_rows_of_new_lengths_without_a_compile_each(four_bit_dir, device, liger_patches_undone):
    """`speed.compile: auto` compiles recomputed QLoRA layers, and packed batches change length
    every step: on the CPU dynamo marks the length dynamic after the second one, so five lengths
    make two graphs; none is broken, and each step's loss is the eager one's. On a GPU the compiled
    model has Liger's kernels as a compiled run's plan configures them (inductor failed on Liger's
    RMSNorm and SwiGLU there)."""
    from tuneforge.train.speed import SpeedPlan, compile_decoder_layers

    def losses(compiled: bool) -> list[torch.Tensor]:
        model = _qlora_model(four_bit_dir, device).train()
        if compiled and device == "cuda" and importlib.util.find_spec("liger_kernel"):  # Liger patches globally: last
            from transformers import TrainingArguments
            from transformers.integrations.liger import apply_liger_kernel

            args = TrainingArguments(output_dir="unused", report_to=[])
            SpeedPlan(True, "on", "recompute", compiled=True).apply(args)
            apply_liger_kernel(model, args.liger_kernel_config)
        install_fused_lora(model)
        install_fused_lora_mlp(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        if compiled:
            compile_decoder_layers(model)
        found = []
        for length in (24, 40, 56, 33, 61):
            ids = torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
            positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])[None].to(device)  # two packed rows
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
            loss.backward()
            found.append(loss.detach().float())
        return found

    eager = losses(False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = losses(True)
    if device == "cpu":  # on an H200 these five short lengths compiled five graphs: not asserted there
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=0)


def test_adapters_reading_a_norm_keep_its_input_and_recompute_its_output_once(monkeypatch):
    """q, k and v (gate and up) read the norm's output; the norm keeps its input for its own
    backward, so keeping the output too is 2 GiB on an 8B LoRA step. In fp32 transformers'
    RMSNorm keeps its input as it is, as Liger's does in 16 bits."""
    monkeypatch.setattr(fused_lora, "keeps_its_input", lambda norm: type(norm).__name__ == "LlamaRMSNorm")
    reference = _lora_model(torch.float32)
    install_fused_lora(reference)
    install_fused_lora_mlp(reference)
    recomputing = copy.deepcopy(reference)
    assert install_norm_recompute(recomputing) == 2 * 2 + 1  # two a layer and the final norm
    assert install_norm_recompute(recomputing) == 0  # once
    hidden_bytes = TOKENS.numel() * 64 * 4
    assert _saved_bytes(reference, autocast=False) - _saved_bytes(recomputing, autocast=False) == 2 * 2 * hidden_bytes

    norm_calls = []
    for layer in recomputing.base_model.model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            original = norm.forward
            norm.forward = lambda x, _original=original: norm_calls.append(torch.is_grad_enabled()) or _original(x)
    ref_loss, ref_grads, ref_input_grad = _loss_and_grads(reference)
    loss, grads, input_grad = _loss_and_grads(recomputing)
    # Four norms ran in the forward (hooked, with grad) and were recomputed once each in the backward.
    assert norm_calls == [True] * 4 + [False] * 4
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(input_grad, ref_input_grad, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_norm_outputs_are_recomputed_exactly_inside_recomputed_layers(monkeypatch, reentrant):
    """Under checkpointing the layer runs again in the backward pass: re-entrant recomputes it
    before the adapters' backward, non-re-entrant unpacks the norm input the adapters kept from
    the recomputation. Either way the gradients are those of keeping everything."""
    monkeypatch.setattr(fused_lora, "keeps_its_input", lambda norm: type(norm).__name__ == "LlamaRMSNorm")
    reference = _lora_model(torch.float32)
    install_fused_lora(reference)
    install_fused_lora_mlp(reference)
    recomputing = copy.deepcopy(reference)
    install_norm_recompute(recomputing)
    recomputing.train()
    recomputing.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    norm_calls = []
    for layer in recomputing.base_model.model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            original = norm.forward
            norm.forward = lambda x, _original=original: norm_calls.append(1) or _original(x)
    ref_loss, ref_grads, ref_input_grad = _loss_and_grads(reference)
    loss, grads, input_grad = _loss_and_grads(recomputing)
    assert len(norm_calls) == 3 * 4  # the forward, the layers' recomputation, the outputs' recomputation
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(input_grad, ref_input_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reentrant", [True, False])
def test_recomputed_4bit_layers_keep_the_dense_weight_for_their_backward(four_bit_dir, monkeypatch, reentrant):
    """Under re-entrant checkpointing a 4-bit weight is dequantized in the forward and in the
    recomputation, which the backward follows at once and reuses: two dequantizations a linear,
    not three. A non-re-entrant recomputation only refills the forward's saved tensors, so its
    backward dequantizes again. Both give the gradients of the unrecomputed model."""
    calls = []
    original = fused_lora.dequantize_4bit
    monkeypatch.setattr(fused_lora, "dequantize_4bit", lambda *a, **k: calls.append(1) or original(*a, **k))

    def loss_and_grads(checkpointing: bool):
        model = _qlora_model(four_bit_dir).train()
        install_fused_lora(model)
        install_fused_lora_mlp(model)
        model.enable_input_require_grads()  # as checkpointing needs: every linear's input gradient is computed
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        calls.clear()
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    ref_loss, ref_grads, ref_calls = loss_and_grads(False)
    loss, grads, recomputed_calls = loss_and_grads(True)
    assert ref_calls == 2 * 2 * 7  # forward and backward, 7 linears in each of 2 layers
    assert recomputed_calls == (ref_calls if reentrant else 3 * 2 * 7)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
