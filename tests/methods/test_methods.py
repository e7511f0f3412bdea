import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import successor_rows, write_jsonl
from tuneforge import train
from tuneforge.config.schema import FreezeMethod, FullMethod, LoraMethod
from tuneforge.errors import MethodError
from tuneforge.methods import prepare_model, select_trainable

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def test_select_trainable_patterns():
    assert select_trainable(NAMES, [r"layers\.1\."], []) == {NAMES[2], NAMES[3]}
    assert select_trainable(NAMES, [], ["embed_tokens", "lm_head"]) == set(NAMES[1:5])
    assert select_trainable(NAMES, [r"layers\.1\.", "lm_head"], ["mlp"]) == {NAMES[2], NAMES[5]}


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(MethodError, match="'visual_projection' matches no parameter"):
        select_trainable(NAMES, ["visual_projection"], [])


def test_full_and_freeze_requires_grad_exactly(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model, counts = prepare_model(FreezeMethod(trainable=["lm_head"]), model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"lm_head.weight"}
    assert counts.trainable == model.lm_head.weight.numel()
    model, counts = prepare_model(FullMethod(), model)
    assert counts.trainable == counts.total


def test_freeze_or_lora_with_nothing_trainable_fails(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with pytest.raises(MethodError, match="no parameter would train"):
        prepare_model(FreezeMethod(trainable=["lm_head"], frozen=["lm_head"]), model)


class LogitsAtEnd(TrainerCallback):
    """Records the live model's logits when training ends, before anything is saved."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self.logits: torch.Tensor | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.ids).logits.clone()


def run_config(tmp_path, model_dir, method: dict, steps: int = 2) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(16))
    return {
        "model": {"path": str(model_dir)},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}], "max_length": 32},
        "method": method,
        "train": {"max_steps": steps, "learning_rate": 1e-2, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_freeze_only_selected_parameters_change(tmp_path, tiny_model_dir):
    before = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    result = train(run_config(tmp_path, tiny_model_dir, {"name": "freeze", "trainable": [r"layers\.1\.mlp", "lm_head"]}))
    after = load_file(str(result.model_dir / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    }


def test_lora_changes_only_adapters_and_reloads_identically(tmp_path, tiny_model_dir):
    from peft import PeftModel

    base_before = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    live = LogitsAtEnd(ids)
    result = train(run_config(tmp_path, tiny_model_dir, {"name": "lora", "r": 4, "merge": True}), callbacks=[live])
    adapter = load_file(str(result.model_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    # The adapters trained (B starts at zero, so a non-zero B means it was updated).
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)
    # The base weights inside the reloaded adapter model are the untouched originals.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(result.model_dir))
    for name, tensor in reloaded.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(tensor, base_before[original]), name
    reloaded.eval()
    merged = AutoModelForCausalLM.from_pretrained(str(result.run_dir / "merged")).eval()
    with torch.no_grad():
        adapter_logits = reloaded(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(input_ids=ids).logits
    assert torch.equal(adapter_logits, live.logits)
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-5)


def test_lora_unknown_target_module_is_explained(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with pytest.raises(MethodError) as info:
        prepare_model(LoraMethod(target_modules=["query_key_value"]), model)
    assert "q_proj" in str(info.value)  # the hint lists this model's linear layer names


def test_parameters_partitioned_by_zero3_are_counted_at_their_full_size():
    """Under DeepSpeed ZeRO-3 the model is partitioned while it loads: each parameter's tensor is
    empty and `ds_numel` holds its size. Counting `numel()` found nothing to train and stopped
    the 8B ZeRO-3 run with "no parameter would train"."""
    import torch

    from tuneforge.methods.prepare import count_parameters
    from tuneforge.train.checkpoints import estimate_save_bytes

    layer = torch.nn.Linear(4, 3)
    for parameter in layer.parameters():
        parameter.ds_numel = parameter.numel()
        parameter.data = torch.empty(0)  # what a ZeRO-3 partition leaves on a rank
    counts = count_parameters(layer)
    assert (counts.trainable, counts.total) == (15, 15)
    assert estimate_save_bytes(layer, save_only_model=True) == 15 * 4


def test_the_vocabulary_of_a_zero3_partitioned_embedding_is_read_from_its_full_shape():
    """`new_special_tokens` compared the tokenizer with `weight.shape[0]`, 0 under ZeRO-3: it
    always resized, and on a padded vocabulary cut rows off."""
    import torch

    from tuneforge.models.parameters import embedding_rows

    model = torch.nn.Module()
    embeddings = torch.nn.Embedding(534, 8)
    model.get_input_embeddings = lambda: embeddings
    assert embedding_rows(model) == 534
    embeddings.weight.ds_shape = embeddings.weight.shape
    embeddings.weight.data = torch.empty(0)
    assert embedding_rows(model) == 534


def test_the_plan_reads_zero3_partitioned_experts_at_their_full_shape():
    """A fused 3-D expert weight partitioned by ZeRO-3 is an empty 1-D tensor on each rank: the
    plan's 16-bit expert count read its shape and found no experts."""
    import torch

    from tuneforge.plan.estimate import expert_bytes

    model = torch.nn.Module()
    model.experts = torch.nn.Parameter(torch.zeros(4, 6, 8, dtype=torch.bfloat16))
    expected = 4 * 6 * 8 * 2
    assert expert_bytes(model) == expected
    model.experts.ds_shape, model.experts.ds_numel = model.experts.shape, model.experts.numel()
    model.experts.data = torch.empty(0, dtype=torch.bfloat16)
    assert expert_bytes(model) == expected
