"""Speed settings: Liger only where it can run, the activation plan picks the fastest setting that
fits, and selective recomputation gives the same gradients as keeping every activation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from tests.train.test_recipe import config as recipe_config
from tuneforge.config.schema import SpeedConfig
from tuneforge.config.training_args import TrainSection
from tuneforge.errors import ConfigError
from tuneforge.plan.estimate import GIB, MemoryEstimate, Strategy
from tuneforge.plan.planner import check_before_training
from tuneforge.train import speed, train
from tuneforge.train.speed import (
    SpeedPlan,
    plan_activations,
    plan_speed,
    resolve_compile,
    resolve_liger,
)


def test_liger_auto_is_off_without_a_gpu_and_true_is_an_error_there():
    on, reason = resolve_liger("auto", "llama", cuda=False)
    assert not on and "no CUDA GPU" in reason
    with pytest.raises(ConfigError, match="Liger kernels cannot run: no CUDA GPU") as error:
        resolve_liger(True, "llama", cuda=False)
    assert error.value.where == "speed.liger"
    assert resolve_liger(False, "llama", cuda=True) == (False, "off (speed.liger: false)")


def test_liger_auto_needs_a_model_type_liger_supports(monkeypatch):
    monkeypatch.setattr(speed, "liger_model_types", lambda: {"llama", "qwen2"})
    assert resolve_liger("auto", "llama", cuda=True) == (True, "on")
    on, reason = resolve_liger("auto", "gpt_neox", cuda=True)
    assert not on and "no kernels for model type 'gpt_neox'" in reason
    monkeypatch.setattr(speed, "liger_model_types", set)
    assert "not installed" in resolve_liger("auto", "llama", cuda=True)[1]


def test_use_liger_kernel_under_train_points_to_speed_liger(tmp_path, tiny_model_dir):
    from tuneforge.config.loading import load_config

    with pytest.raises(ConfigError, match="use speed.liger instead"):
        load_config(recipe_config(tmp_path, tiny_model_dir, use_liger_kernel=True))


ESTIMATE = MemoryEstimate(
    weights=10 * GIB, gradients=0, optimizer=0, per_layer=GIB, per_layer_checkpointed=GIB // 8,
    output_layer=0, forward_gradients=0, layers=8, runtime=0,
)


@pytest.mark.parametrize(
    ("budget_gib", "expected"),
    [
        (20.0, ("keep", 1)),  # 10 + 8 + 1.5 CUDA context
        # every 8th (layer 0 only): 10 + 7 kept + 1/8 input + 1.5 = 18.625; the last layer stays
        # kept, so no transient layer on top
        (19.0, ("recompute", 8)),
        # every 2nd (0, 2, 4, 6): 10 + 4 + 4 x 1/8 + 1.5 = 16; every 3rd keeps 5: 16.875
        (16.1, ("recompute", 2)),
        (13.6, ("recompute", 1)),  # 10 + 8 x 1/8 + 1 transient + 1.5 = 13.5: only recomputing all fits
        (13.0, ("offload", 1)),
    ],
)
def test_activation_plan_is_the_fastest_setting_that_fits(budget_gib, expected):
    activations, every, _, estimate_gib = plan_activations(ESTIMATE, int(budget_gib * GIB))
    assert (activations, every) == expected
    assert estimate_gib <= budget_gib or activations == "offload"


def test_on_cpu_the_plan_follows_train_gradient_checkpointing(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    plan = plan_speed(SpeedConfig(), TrainSection(), model, tokens_per_micro_batch=64, device="cpu")
    assert (plan.liger, plan.activations) == (False, "keep")
    plan = plan_speed(
        SpeedConfig(), TrainSection(gradient_checkpointing=True), model, tokens_per_micro_batch=64, device="cpu"
    )
    assert plan.activations == "recompute" and "train.gradient_checkpointing" in plan.describe()


def test_the_plan_estimates_per_gpu_memory_as_the_engine_shards_it(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.requires_grad_(True)
    whole = plan_speed(SpeedConfig(), TrainSection(), model, tokens_per_micro_batch=64, device="cpu").estimate
    fsdp = plan_speed(
        SpeedConfig(), TrainSection(), model, tokens_per_micro_batch=64, device="cpu", sharding=(Strategy.parse("fsdp"), 2)
    ).estimate
    # Full sharding on 2 GPUs: half the weights, gradients and optimizer state; activations unchanged.
    assert fsdp.optimizer == whole.optimizer // 2 and fsdp.gradients == whole.gradients // 2
    assert fsdp.weights == whole.weights // 2 and fsdp.per_layer == whole.per_layer
    assert fsdp.total() < whole.total()
    assert "memory plan: about" in check_before_training(
        plan_speed(SpeedConfig(), TrainSection(), model, tokens_per_micro_batch=64, device="cpu"), "cpu"
    )


class LayerCalls(TrainerCallback):
    """Counts each decoder layer's MLP calls in one training step (recomputation calls again; the
    layer's own hooks stay outside the checkpoint, its submodules' run again)."""

    def __init__(self, model):
        self.calls = [0] * len(model.model.layers)
        for index, layer in enumerate(model.model.layers):
            layer.mlp.register_forward_pre_hook(lambda module, args, i=index: self.calls.__setitem__(i, self.calls[i] + 1))


def one_step_gradients(tmp_path, model_dir, plan: SpeedPlan, callbacks=()):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    model.config.num_hidden_layers = len(model.model.layers)
    calls = LayerCalls(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=1, per_device_train_batch_size=2,
        learning_rate=0.0, report_to="none", save_strategy="no",
    )
    plan.apply(args)
    batch = {"input_ids": torch.arange(2, 34).view(2, 16), "labels": torch.arange(2, 34).view(2, 16)}
    trainer = Trainer(
        model=model, args=args, train_dataset=[{k: v[i] for k, v in batch.items()} for i in range(2)], callbacks=list(callbacks)
    )
    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.add_callback(Grab())
    trainer.train()
    return grads, calls.calls


def test_selective_recomputation_recomputes_only_every_nth_layer_with_equal_gradients(tmp_path, tiny_model_dir):
    kept, kept_calls = one_step_gradients(tmp_path / "keep", tiny_model_dir, SpeedPlan(False, "off", "keep"))
    every2, every2_calls = one_step_gradients(
        tmp_path / "every2", tiny_model_dir, SpeedPlan(False, "off", "recompute", recompute_every=2)
    )
    full, full_calls = one_step_gradients(tmp_path / "all", tiny_model_dir, SpeedPlan(False, "off", "recompute"))
    assert kept_calls == [1, 1]
    assert every2_calls == [2, 1]  # layer 0 recomputed in the backward, layer 1 kept its activations
    assert full_calls == [2, 2]
    assert kept.keys() == every2.keys() == full.keys() and kept
    for name in kept:
        torch.testing.assert_close(every2[name], kept[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(full[name], kept[name], rtol=1e-10, atol=1e-12)


def test_training_reports_the_speed_plan(tmp_path, tiny_model_dir, capsys):
    train(recipe_config(tmp_path, tiny_model_dir, max_steps=1), overrides=["speed.activations=recompute", "speed.recompute_every=2"])
    out = capsys.readouterr().out
    assert "Liger kernels off (no CUDA GPU" in out
    assert "activations recomputed in 1 of every 2 decoder layers (speed.activations)" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton GPU kernels: needs a CUDA device")
def test_liger_kernels_give_the_eager_loss_and_gradients(tiny_model_dir, liger_patches_undone):
    """PITFALLS 12: each optional kernel matches the eager path on a tiny model."""
    pytest.importorskip("liger_kernel")
    from transformers.integrations.liger import apply_liger_kernel

    def loss_and_grads(liger: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).cuda().train()
        if liger:
            apply_liger_kernel(model, None)  # what TrainingArguments.use_liger_kernel does
        ids = torch.randint(3, model.config.vocab_size, (2, 48), device="cuda")
        labels = ids.clone()
        labels[:, :10] = -100  # a masked prompt, as in instruction data
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(False)
    liger_loss, liger_grads = loss_and_grads(True)
    torch.testing.assert_close(liger_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(liger_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(tiny_model_dir):
    """PITFALLS 12: an optional speed-up matches the eager path (inductor on the CPU here)."""
    import torch._dynamo

    def loss_and_grads(compiled: bool):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).train()
        if compiled:
            assert speed.compile_decoder_layers(model) == len(model.model.layers)
        ids = torch.arange(3, 51).view(2, 24) % model.config.vocab_size
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_loss, eager_grads = loss_and_grads(False)
    compiled_loss, compiled_grads = loss_and_grads(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really went through dynamo
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_layers_leave_liger_s_layer_kernels_to_inductor():
    """Liger's rope and SwiGLU run outside any compiled graph (its dispatcher is compiler-disabled),
    and its RMSNorm failed inductor's recompilation for a new length: with `speed.compile` the plan
    asks the Trainer's Liger patch to leave them to inductor."""
    args = TrainingArguments(output_dir="unused", report_to=[], liger_kernel_config={"rms_norm": True})
    SpeedPlan(True, "on", "keep", compiled=True).apply(args)
    assert args.use_liger_kernel
    assert args.liger_kernel_config == {"rms_norm": False, "rope": False, "swiglu": False}
    assert "(not rope, swiglu, rms_norm: compiled layers fuse them)" in SpeedPlan(True, "on", "keep", compiled=True).describe()
    eager = TrainingArguments(output_dir="unused", report_to=[])
    SpeedPlan(True, "on", "keep").apply(eager)
    assert eager.use_liger_kernel and eager.liger_kernel_config is None  # every kernel
    SpeedPlan(False, "off", "keep", compiled=True).apply(eager)
    assert not eager.use_liger_kernel and eager.liger_kernel_config is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton GPU kernels: needs a CUDA device")
def test_compiled_layers_with_the_planned_liger_kernels_hold_one_graph_each(tiny_model_dir, liger_patches_undone):
    pytest.importorskip("liger_kernel")
    import torch._dynamo
    from transformers.integrations.liger import apply_liger_kernel

    def compiled_step(kernel_config):
        args = TrainingArguments(output_dir="unused", report_to=[], liger_kernel_config=kernel_config)
        SpeedPlan(True, "on", "keep", compiled=kernel_config is None).apply(args)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).cuda().train()
        apply_liger_kernel(model, args.liger_kernel_config)
        speed.compile_decoder_layers(model)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        ids = torch.arange(3, 51, device="cuda").view(2, 24) % model.config.vocab_size
        model(input_ids=ids, labels=ids).loss.backward()
        return dict(torch._dynamo.utils.counters["graph_break"])

    assert compiled_step(None) == {}
    assert compiled_step({}), "Liger's rope no longer splits a compiled layer: LIGER_KERNELS_LEFT_TO_INDUCTOR can shrink"


def test_compile_auto_is_for_4bit_models_whose_every_layer_is_recomputed_on_one_gpu_or_ddp():
    """Where compiling was measured to pay (docs/benchmarks.md): not for kept activations, where a
    compiled 4-bit layer keeps its dequantized weights, nor for 16-bit weights."""
    qlora = {"four_bit": True, "activations": "offload", "recompute_every": 1, "strategy": "ddp", "triton_gpu": True}
    assert resolve_compile("auto", **qlora)
    assert resolve_compile("auto", **{**qlora, "activations": "recompute"})
    for change in (
        {"four_bit": False}, {"activations": "keep"}, {"activations": "recompute", "recompute_every": 2},
        {"strategy": "fsdp"}, {"strategy": "zero3"}, {"triton_gpu": False},
    ):
        assert not resolve_compile("auto", **{**qlora, **change}), change
    assert not resolve_compile(False, **qlora)
    assert resolve_compile(True, **{**qlora, "four_bit": False, "activations": "keep"})


def test_the_speed_plan_compiles_an_offloaded_4bit_model_on_a_gpu_with_triton(tiny_model_dir, monkeypatch):
    import importlib.util

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    model.is_loaded_in_4bit = True  # what the planner reads; the estimate counts the linears as NF4
    train_section = TrainSection(bf16=True)

    find_spec = importlib.util.find_spec

    def planned(device: str, triton: bool, **speed_settings) -> SpeedPlan:
        def triton_or_not(name: str, *rest):
            return (object() if triton else None) if name == "triton" else find_spec(name, *rest)

        monkeypatch.setattr(importlib.util, "find_spec", triton_or_not)
        return plan_speed(SpeedConfig(**speed_settings), train_section, model, tokens_per_micro_batch=64, device=device)

    eager = planned("cuda", triton=True, activations="offload", compile=False)
    compiled = planned("cuda", triton=True, activations="offload")
    assert compiled.compiled and not eager.compiled and not compiled.graphed
    assert compiled.estimate.per_layer > eager.estimate.per_layer  # re-estimated for compiled layers
    assert not planned("cuda", triton=False, activations="offload").compiled
    assert not planned("cpu", triton=True, activations="offload").compiled
    assert not planned("cuda", triton=True, activations="keep").compiled
    # CUDA graphs replay eager layers: compile auto stays off under them.
    graphed = planned("cuda", triton=True, activations="offload", cuda_graphs=True)
    assert graphed.graphed and not graphed.compiled and "recomputed layers replay CUDA graphs" in graphed.describe()
    assert graphed.estimate.graph_pool > 0 == eager.estimate.graph_pool  # re-estimated with the graphs' pool
    with pytest.raises(ConfigError, match="speed.cuda_graphs replays recomputed decoder layers"):
        planned("cuda", triton=True, activations="keep", cuda_graphs=True)
    # A model whose config names no transformer shape has no estimate to redo.
    model = torch.nn.Linear(4, 4)
    model.is_loaded_in_4bit = True
    shapeless = planned("cuda", triton=True, activations="offload")
    assert shapeless.compiled and shapeless.estimate is None


def test_cuda_graphs_are_refused_where_a_sharding_engine_shards_the_weights(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="speed.cuda_graphs.*'fsdp'.*use it with ddp"):
        train(recipe_config(tmp_path, tiny_model_dir, max_steps=1), overrides=["speed.cuda_graphs=true", "distributed.strategy=fsdp"])


def test_compile_is_refused_where_a_sharding_engine_hooks_into_each_layer(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="speed.compile.*'fsdp'.*use it with ddp"):
        train(recipe_config(tmp_path, tiny_model_dir, max_steps=1), overrides=["speed.compile=true", "distributed.strategy=fsdp"])


def test_a_compiled_lora_run_learns_with_the_fused_lora_forward(tmp_path, tiny_model_dir, capsys):
    """The fused LoRA autograd function and the recomputation wrapper run through dynamo."""
    result = train(
        recipe_config(tmp_path, tiny_model_dir, max_steps=12, logging_steps=4),
        overrides=["method.name=lora", "speed.compile=true", "speed.activations=recompute"],
    )
    assert "torch.compile: 2 decoder layers" in capsys.readouterr().out
    assert result.eval_loss_after < result.eval_loss_before


def test_reentrant_checkpointing_gives_the_kept_gradients_and_is_used_where_exact(tmp_path, tiny_model_dir, monkeypatch):
    decisions = []

    def spy(function, args):
        decisions.append(exact := speed.reentrant_is_exact.__wrapped__(function, args))
        return exact

    spy.__wrapped__ = speed.reentrant_is_exact
    monkeypatch.setattr(speed, "reentrant_is_exact", spy)
    kept, _ = one_step_gradients(tmp_path / "keep", tiny_model_dir, SpeedPlan(False, "off", "keep"))
    reentrant, calls = one_step_gradients(
        tmp_path / "re", tiny_model_dir, SpeedPlan(False, "off", "recompute"),
        callbacks=[speed.LayerCheckpointing(reentrant=True, offload=False)],
    )
    assert calls == [2, 2]  # both layers recomputed in the backward
    assert decisions == [True, True]  # the embeddings train, so the hidden states carry gradients
    assert kept.keys() == reentrant.keys() and kept
    for name in kept:
        torch.testing.assert_close(reentrant[name], kept[name], rtol=1e-10, atol=1e-12)


def test_layers_whose_inputs_carry_no_gradient_keep_non_reentrant_checkpointing(tiny_model_dir):
    """PITFALLS: re-entrant checkpointing of a layer whose inputs need no gradient silently gives
    its trainable parameters none (a frozen embedding and no input-gradient hook, as in a LoRA or
    vision-tower layer)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64).train()
    model.requires_grad_(False)
    layer = model.model.layers[1]
    layer.mlp.down_proj.weight.requires_grad_(True)  # the one trainable weight, inside the layer
    model.model.layers[0].gradient_checkpointing = layer.gradient_checkpointing = True
    for module in model.model.layers:
        module._gradient_checkpointing_func = speed._LayerCheckpoint(partial(checkpoint, use_reentrant=False), True, False)
    ids = torch.arange(3, 19).view(1, 16)
    assert not speed.reentrant_is_exact(partial(layer.forward), (model.model.embed_tokens(ids),))
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.mlp.down_proj.weight.grad is not None and layer.mlp.down_proj.weight.grad.abs().sum() > 0
    # A gradient-carrying tensor passed by keyword is not one of the re-entrant function's inputs.
    hidden = torch.ones(1, 2, requires_grad=True)
    assert speed.reentrant_is_exact(partial(layer.forward, mask=None), (hidden,))
    assert not speed.reentrant_is_exact(partial(layer.forward, extra=hidden * 2), (hidden,))


def test_reentrant_checkpointing_is_for_one_process_or_ddp_without_the_unused_parameter_search():
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    offload = SpeedPlan(False, "off", "offload").layer_checkpointing(args, "ddp")
    assert (offload.reentrant, offload.offload) == (True, True)
    assert SpeedPlan(False, "off", "keep").layer_checkpointing(args, "ddp") is None
    for engine in ("fsdp", "deepspeed"):
        plan = SpeedPlan(False, "off", "recompute").layer_checkpointing(args, engine)
        assert (plan.reentrant, plan.offload) == (False, False)
    args.ddp_find_unused_parameters = True
    assert not SpeedPlan(False, "off", "recompute").layer_checkpointing(args, "ddp").reentrant


def test_offloaded_layers_train_as_kept_ones_and_their_inputs_go_through_the_offload_hooks(tmp_path, tiny_model_dir, monkeypatch):
    packed = []
    original = speed.OffloadToCpu._pack
    monkeypatch.setattr(speed.OffloadToCpu, "_pack", lambda self, t: packed.append(t.shape) or original(self, t))
    kept, _ = one_step_gradients(tmp_path / "keep", tiny_model_dir, SpeedPlan(False, "off", "keep"))
    for reentrant in (True, False):
        packed.clear()
        offloaded, calls = one_step_gradients(
            tmp_path / f"off{reentrant}", tiny_model_dir, SpeedPlan(False, "off", "offload"),
            callbacks=[speed.LayerCheckpointing(reentrant=reentrant, offload=True)],
        )
        assert calls == [2, 2]
        assert torch.Size([2, 16, 32]) in packed  # each layer's hidden-state input (batch x tokens x hidden)
        for name in kept:
            torch.testing.assert_close(offloaded[name], kept[name], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading copies between a CUDA GPU and pinned memory")
def test_offload_keeps_the_saved_tensors_in_cpu_memory_fetches_the_previous_layer_ahead_and_gives_the_same_gradients(monkeypatch):
    device = torch.device("cuda")
    weight = torch.randn(1024, 1024, device=device, requires_grad=True)
    x = torch.randn(4096, 1024, device=device)
    fetched_ahead = []
    original = speed.OffloadToCpu._fetch_ahead.__func__
    monkeypatch.setattr(speed.OffloadToCpu, "_fetch_ahead", classmethod(lambda cls, ref: fetched_ahead.append(n := original(cls, ref)) or n))

    def run(offload: bool):
        weight.grad = None
        hidden = [x]
        for _ in range(8):  # each "layer" under its own context, as each recomputed decoder layer
            with speed.OffloadToCpu() if offload else contextlib.nullcontext():
                hidden.append(torch.tanh(hidden[-1] @ weight))
        del hidden[:-1]
        torch.cuda.synchronize()
        # A tensor whose copy ran on the side stream is freed once the allocator sees that copy's
        # event complete, which it checks when it next allocates.
        torch.empty(1, device=device)
        held = torch.cuda.memory_allocated()
        hidden[-1].sum().backward()
        return held, weight.grad.clone()

    kept_bytes, kept_grad = run(False)
    offloaded_bytes, offloaded_grad = run(True)
    activation = 4096 * 1024 * 4
    assert kept_bytes - offloaded_bytes >= 4 * activation, (kept_bytes, offloaded_bytes)  # most left the GPU
    torch.testing.assert_close(offloaded_grad, kept_grad)
    # Layers 8..2 each fetched the one before them (its input and its output, saved by matmul and
    # tanh) while their own backward ran; layer 1's tensors were all fetched by then.
    assert sum(fetched_ahead) >= 7 and fetched_ahead[-1] == 0, fetched_ahead


def test_the_trainer_counts_the_parameters_for_its_flops_once(tmp_path, tiny_model_dir, monkeypatch):
    """transformers counts them on every step (a walk over every module: 60 ms of host time on
    an 8B LoRA step); the figures stay the Trainer's own."""
    from tuneforge.train.trainer import FlopsPerTokenOnceMixin

    class Counted(FlopsPerTokenOnceMixin, Trainer):
        pass

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    trainer = Counted(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    batches = [{"input_ids": torch.ones(2, 8, dtype=torch.long)}, {"input_ids": torch.ones(3, 5, dtype=torch.long)}]
    expected = [Trainer.floating_point_ops(trainer, batch) for batch in batches]
    assert expected[0] > 0
    walks = []
    original = type(model).num_parameters
    monkeypatch.setattr(type(model), "num_parameters", lambda self, *a, **k: walks.append(1) or original(self, *a, **k))
    assert [trainer.floating_point_ops(batch) for batch in batches * 3] == expected * 3
    assert len(walks) == 1
    assert trainer.floating_point_ops({"pixel_values": torch.ones(1)}) == 0  # no token ids: the Trainer's answer


def test_the_trainer_walks_the_module_tree_once_not_every_step(tmp_path, tiny_model_dir, monkeypatch):
    """`train()`, `zero_grad()` and the gradient clip each walked every module on every step
    (13 ms of host time on an 8B LoRA step); the losses, gradient norms and modes stay the same."""
    from tuneforge.train.trainer import FlopsPerTokenOnceMixin, ModuleWalksOnceMixin

    class WalksOnce(ModuleWalksOnceMixin, FlopsPerTokenOnceMixin, Trainer):
        pass

    walks: list[int] = []  # the step in which the root model's tree was walked
    in_step = [0]
    for name in ("named_modules", "named_children"):
        original = getattr(torch.nn.Module, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if in_step[0] and self is walks_root[0]:
                walks.append(in_step[0])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, name, counted)
    walks_root: list = [None]

    class Observe(TrainerCallback):
        def __init__(self):
            self.norms, self.modes = [], []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            in_step[0] = state.global_step + 1

        def on_step_end(self, args, state, control, model=None, **kwargs):
            in_step[0] = 0
            self.modes.append(model.model.layers[0].mlp.training)
            if state.global_step == 3:
                model.model.layers[0].mlp.eval()  # a callback switching one submodule: step 4 undoes it

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "grad_norm" in logs:
                self.norms.append((round(logs["loss"], 6), round(logs["grad_norm"], 6)))

    rows = [{"input_ids": torch.arange(i, i + 8) % 50, "labels": torch.arange(i, i + 8) % 50} for i in range(24)]
    results = {}
    for trainer_class in (Trainer, WalksOnce):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        walks_root[0] = model
        walks.clear()
        observe = Observe()
        args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), use_cpu=True, report_to="none",
                                 max_steps=6, per_device_train_batch_size=4, logging_steps=1, max_grad_norm=0.5,
                                 save_strategy="no", seed=0)
        trainer = trainer_class(model=model, args=args, train_dataset=rows, callbacks=[observe])
        trainer.train()
        results[trainer_class] = (list(walks), observe.norms, observe.modes)
        assert "train" not in vars(model) and "zero_grad" not in vars(model)  # nothing left on the model
    plain_walks, plain_norms, plain_modes = results[Trainer]
    once_walks, once_norms, once_modes = results[WalksOnce]
    assert sorted(set(plain_walks)) == [1, 2, 3, 4, 5, 6] and len(plain_walks) >= 3 * 6  # three walks a step
    assert set(once_walks) == {1, 4}  # taking the lists; `train()` putting the switched submodule back
    assert once_norms == plain_norms and len(once_norms) == 6
    assert once_modes == plain_modes == [True] * 6


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
)
def test_the_clip_inside_the_fused_optimizer_gives_clip_grad_norm_s_steps(tmp_path, tiny_model_dir, monkeypatch, device):
    """The clip's factor goes to torch's fused AdamW, which applies it as it reads each gradient,
    instead of a pass of `clip_grad_norm_` that reads and writes every gradient: the same losses,
    logged norms and weights, and no such pass. On a GPU in bf16, where the plain clip rounds the
    scaled gradients to bf16 and the fused one does not: equal within bf16's precision."""
    from tuneforge.train.guards import fused_optimizer
    from tuneforge.train.trainer import ClipInFusedOptimizerMixin

    class ClipsInOptimizer(ClipInFusedOptimizerMixin, Trainer):
        pass

    scaling_passes = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: scaling_passes.append(1) or original(*a, **k))
    rows = [{"input_ids": torch.arange(i, i + 8) % 50, "labels": torch.arange(i, i + 8) % 50} for i in range(24)]
    results = {}
    for trainer_class in (Trainer, ClipsInOptimizer):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32 if device == "cpu" else torch.bfloat16)
        args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), use_cpu=device == "cpu", report_to="none",
                                 max_steps=6, per_device_train_batch_size=4, logging_steps=1, max_grad_norm=0.05,
                                 learning_rate=1e-2, save_strategy="no", seed=0)
        trainer = trainer_class(model=model, args=args, train_dataset=rows)
        scaling_passes.clear()
        trainer.train()
        logged = [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "grad_norm" in entry]
        results[trainer_class] = (logged, len(scaling_passes), {k: v.detach().clone() for k, v in model.named_parameters()})
        assert fused_optimizer(trainer.optimizer.optimizer)  # transformers' default optimizer is fused AdamW
    plain_logged, plain_passes, plain_weights = results[Trainer]
    fused_logged, fused_passes, fused_weights = results[ClipsInOptimizer]
    assert plain_passes == 6 and fused_passes == 0
    assert all(norm > 0.05 for _, norm in plain_logged)  # every step was clipped
    assert len(fused_logged) == 6
    close = 1e-5 if device == "cpu" else 2e-2
    for (plain_loss, plain_norm), (fused_loss, fused_norm) in zip(plain_logged, fused_logged):
        assert fused_loss == pytest.approx(plain_loss, rel=close) and fused_norm == pytest.approx(plain_norm, rel=close)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(fused_weights[name].float(), weight.float(), rtol=close, atol=close / 20, msg=name)
    assert plain_logged[-1][0] < plain_logged[0][0]  # it trained
