"""Recomputed decoder layers replayed as CUDA graphs (train/layer_graphs.py): what a replay copies
into the captured layer, which calls it stands in for, which layers it refuses, how the plan turns
it on; and, on a GPU, that graphed layers train as the eager ones do."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.config.schema import SpeedConfig
from tuneforge.errors import ConfigError
from tuneforge.methods.fused_lora import install_fused_lora, install_fused_lora_mlp
from tuneforge.train.layer_graphs import LayerGraphs, NotGraphable, _Template, call_signature, graph_pool_bytes, layer_call, layer_tensors, not_graphable
from tuneforge.train.speed import LayerCheckpointing, resolve_compile, resolve_cuda_graphs

LLAMA = {
    "vocab_size": 96, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64,
}


def _lora_model(device: str = "cpu", four_bit_dir=None, lora_dropout: float = 0.0, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    if four_bit_dir is not None:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
        model = LlamaForCausalLM.from_pretrained(four_bit_dir, quantization_config=quantization, device_map=device)
    else:
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **config})).to(device, torch.bfloat16)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False, lora_dropout=lora_dropout))
    install_fused_lora(model)
    install_fused_lora_mlp(model)
    return model


@pytest.fixture(scope="module")
def four_bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("four-bit-llama")
    LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.bfloat16).save_pretrained(path)
    return path


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.base_model.model.model.layers)


def _call(layer: torch.nn.Module, hidden: torch.Tensor, **keywords):
    """A layer's call as transformers checkpoints it: partial(forward, layer, **keywords), (hidden,)."""
    return functools.partial(type(layer).forward.__wrapped__, layer, **keywords), (hidden,)


def test_a_copy_of_a_4bit_layer_reads_the_same_tensors_in_the_same_order(four_bit_dir):
    """What a replay copies into the captured layer: parameters, and each 4-bit weight's
    quantization statistics (absmax, code, offset, and the nested absmax and code)."""
    layer = _layers(_lora_model(four_bit_dir=four_bit_dir))[0]
    tensors = layer_tensors(layer)
    parameters = list(layer.parameters())
    assert len(tensors) == len(parameters) + 7 * 5  # q k v o gate up down
    assert all(type(tensor) is torch.Tensor for tensor in tensors)  # plain: no Params4bit dispatch on copy
    template = copy.deepcopy(layer)
    copied = layer_tensors(template)
    assert [(t.shape, t.dtype) for t in copied] == [(t.shape, t.dtype) for t in tensors]
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(copied, tensors, strict=True))
    # The fused forwards are bound to the copy's own modules, not the original's.
    assert template.self_attn.q_proj.forward.__self__ is template.self_attn.q_proj
    assert template.mlp.forward.__self__ is template.mlp
    graphs = LayerGraphs()
    assert copy.deepcopy(graphs) is graphs  # a copied layer's checkpoint function shares the graphs


def test_layers_with_dropout_or_weight_moving_hooks_are_not_graphed():
    assert not_graphable(_layers(_lora_model())[0]) is None
    dropout = _layers(_lora_model(lora_dropout=0.1))[0]
    assert "lora_dropout" in not_graphable(dropout) and "p=0.1" in not_graphable(dropout)
    assert not_graphable(dropout.eval()) is None  # no random numbers outside training
    attention = _layers(_lora_model(attention_dropout=0.1))[0].train()
    assert "self_attn has attention dropout" in not_graphable(attention)
    hooked = _layers(_lora_model())[0]
    hooked.mlp._hf_hook = object()
    assert "LlamaDecoderLayer.mlp has accelerate hooks" in not_graphable(hooked)


def test_a_compiled_layer_is_not_captured():
    """Graphs of compiled layers ran no faster and held more memory (docs/benchmarks.md)."""
    layer = _layers(_lora_model())[0]
    layer.compile()
    with pytest.raises(NotGraphable, match="LlamaDecoderLayer is compiled; CUDA graphs replay eager layers"):
        _Template(layer, LayerGraphs())


def test_the_call_signature_tells_shapes_and_keyword_values_apart():
    first, second = _layers(_lora_model())[:2]
    hidden = torch.zeros(2, 24, 64)
    cos_sin = (torch.zeros(1, 24, 16), torch.zeros(1, 24, 16))

    def signature(layer, hidden=hidden, **keywords):
        return call_signature(*_call(layer, hidden, **{"position_embeddings": cos_sin, "attention_mask": None, **keywords}))

    assert signature(first) == signature(second) is not None  # one capture serves every layer
    assert signature(first) != signature(first, hidden=torch.zeros(2, 20, 64))
    assert signature(first) != signature(first, use_cache=True)
    assert signature(first) != signature(first, attention_mask=torch.zeros(2, 1, 24, 24))
    assert signature(first, extra={1, 2}) is None  # a value that cannot be hashed
    # The form of transformers before 5.2x: partial(super().__call__, **kwargs), the bound nn.Module call.
    bound = functools.partial(torch.nn.Module.__call__.__get__(second), position_embeddings=cos_sin, attention_mask=None)
    assert layer_call(bound) == (torch.nn.Module.__call__, second)
    assert call_signature(bound, (hidden,)) is not None
    assert call_signature(bound, (hidden,)) == call_signature(functools.partial(torch.nn.Module.__call__.__get__(first), position_embeddings=cos_sin, attention_mask=None), (hidden,))
    assert call_signature(lambda hidden: hidden, (hidden,)) is None  # not transformers' partial form


def test_calls_off_a_gpu_run_as_they_are():
    layer = _layers(_lora_model())[0]
    function, args = _call(layer, torch.zeros(2, 24, 64))
    graphs = LayerGraphs()
    for _ in range(3):
        assert graphs.wrap(function, args) is function
    assert not graphs.captures and graphs.replays == 0
    assert graphs.describe() == "CUDA graphs: no layer call captured"


def test_cuda_graphs_need_recomputed_layers_on_a_gpu_and_turn_compile_auto_off():
    assert resolve_cuda_graphs(True, activations="offload", cuda=True)
    assert resolve_cuda_graphs(True, activations="recompute", cuda=True)
    assert not resolve_cuda_graphs(False, activations="keep", cuda=False)
    with pytest.raises(ConfigError, match="keeps every layer's activations"):
        resolve_cuda_graphs(True, activations="keep", cuda=True)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_cuda_graphs(True, activations="offload", cuda=False)
    compile_auto = functools.partial(resolve_compile, "auto", four_bit=True, activations="offload", recompute_every=1,
                                     strategy="ddp", triton_gpu=True)
    assert compile_auto() and not compile_auto(graphed=True)  # graphs capture eager layers


def test_compile_and_cuda_graphs_are_not_both_asked_for():
    with pytest.raises(ValueError, match="speed.compile and speed.cuda_graphs both"):
        SpeedConfig(compile=True, cuda_graphs=True)
    assert SpeedConfig().cuda_graphs is False


def test_graphs_serve_only_re_entrant_checkpointing():
    assert LayerCheckpointing(reentrant=True, offload=True, graphs=True).graphs is not None
    said = []
    assert LayerCheckpointing(reentrant=False, offload=True, graphs=True, report=said.append).graphs is None
    assert said and said[0].startswith("CUDA graphs off: they replay re-entrant recomputation")
    assert LayerCheckpointing(reentrant=True, offload=True, graphs=False).graphs is None


def _train_steps(model: torch.nn.Module, graphs: bool, lengths: list[int], limit: int = 4):
    """Losses and adapter gradients of SGD steps on random rows of `lengths`, every layer
    recomputed (re-entrant, inputs offloaded) as tuneforge runs them; and the run's graphs."""
    model.train()
    model.enable_input_require_grads()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    callback = LayerCheckpointing(reentrant=True, offload=True, graphs=graphs, report=lambda message: None)
    if graphs:
        callback.graphs.limit = limit
    callback.on_train_begin(None, None, None, model=model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(0)
    steps = []
    for length in lengths:
        tokens = torch.randint(0, 96, (2, length), generator=generator).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        steps.append((loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        optimizer.step()
        optimizer.zero_grad()
    return steps, callback.graphs


def _assert_same_steps(graphed, eager, rtol: float) -> None:
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(graphed, eager, strict=True)):
        torch.testing.assert_close(loss, ref_loss, rtol=rtol / 10, atol=1e-3, msg=f"step {step + 1}")
        assert grads.keys() == ref_grads.keys() and grads
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=1e-4, msg=f"step {step + 1}: {name}")
    name = next(name for name in graphed[1][1] if "layers.1." in name)
    assert not torch.equal(graphed[1][1][name], graphed[2][1][name])  # step 3 replayed the updated adapters


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16", "nf4"])
def test_graphed_layers_train_as_the_eager_layers_do(four_bit, request):
    """Steps of a model with graphed layers give the eager model's losses and gradients: the
    first step captures, later ones replay (after optimizer steps changed the adapters); a step of
    another length gets its own capture, or, past the limit of captured shapes, runs as it is."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    directory = request.getfixturevalue("four_bit_dir") if four_bit else None
    lengths = [24, 24, 24, 20, 24]
    eager, _ = _train_steps(_lora_model("cuda", directory), graphs=False, lengths=lengths)
    graphed, graphs = _train_steps(_lora_model("cuda", directory), graphs=True, lengths=lengths)
    assert graphs.off is None and len(graphs.captures) == 2 and graphs.replays == 5 * 3
    _assert_same_steps(graphed, eager, rtol=2e-2)
    one_shape, graphs = _train_steps(_lora_model("cuda", directory), graphs=True, lengths=lengths, limit=1)
    assert len(graphs.captures) == 1 and graphs.replays == 4 * 3
    assert graphs.calls_of_other_shapes == {"hidden states (2, 20, 64)": 3}  # step 4's length
    assert graph_pool_bytes() > 0 and "ran as they are (3 with hidden states (2, 20, 64))" in graphs.describe()
    _assert_same_steps(one_shape, eager, rtol=2e-2)
