"""Every supported model family trains LoRA through tuneforge's real path, and docs/models.md is current.

Each family's tiny model is built from its real `transformers` config class, saved with
`save_pretrained`, loaded back by `tuneforge.train` and trained for 3 steps with the default
LoRA targets (`all-linear`).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, ParamWrapper
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import successor_rows, write_jsonl
from tuneforge.config.schema import LoraMethod, ModelConfig
from tuneforge.methods.prepare import prepare_model
from tuneforge.models.families import (
    FAMILIES,
    ModelFamily,
    build_tiny_model,
    default_lora_target_parameters,
    default_lora_targets,
    get_family,
)
from tuneforge.models.loading import load_model
from tuneforge.train import train
from tuneforge.train.family_matrix import (
    FamilyResult,
    check_step_logs,
    describe_family,
    lora_run_config,
    render_models_doc,
    save_tiny_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[0, 5, 9, 13, 40, 1]])


def _params(families) -> list:
    return [
        pytest.param(
            family,
            id=family.model_type,
            marks=[pytest.mark.xfail(reason=family.known_issue, strict=True)] if family.known_issue else [],
        )
        for family in families
    ]


class LogitsAtEnd(TrainerCallback):
    """Records the live model's logits when training ends, before anything is saved."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=IDS).logits.clone()


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("families-data") / "train.jsonl", successor_rows(16))


@pytest.fixture(scope="module")
def described() -> dict[str, FamilyResult]:
    """Each family's doc row, computed without training."""
    return {family.name: describe_family(family) for family in FAMILIES}


@pytest.mark.parametrize("family", _params(FAMILIES))
def test_lora_trains_only_adapters_and_reloads_identically(
    family: ModelFamily, tmp_path, tokenizer_dir, data_path, described
):
    model_dir = save_tiny_checkpoint(family, tmp_path / "model", tokenizer_dir)
    base_before = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    live = LogitsAtEnd()

    result = train(lora_run_config(model_dir, data_path, tmp_path / "run"), callbacks=[live])

    assert result.global_step == 3 and math.isfinite(result.train_loss)
    check_step_logs(family, result.run_dir / "metrics.jsonl")  # finite losses; aux_loss > 0 for MoE
    # The doc's count (LoRA applied without training) is what the real run trained.
    assert result.parameters.trainable == described[family.name].lora_parameters
    adapter = load_file(str(result.model_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # B starts at zero
    # The base weights inside the reloaded adapter model are the untouched originals.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(result.model_dir))
    base_after = reloaded.get_base_model().state_dict()
    compared = set()
    for name, tensor in base_after.items():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(tensor, base_before[original]), name
        compared.add(original)
    assert compared == set(base_before)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, live.logits)


@pytest.mark.parametrize("family", _params(FAMILIES))
def test_default_targets_are_what_peft_adapts(family: ModelFamily):
    # default_lora_targets re-creates peft's private `all-linear` resolution: this pins it to
    # what get_peft_model (through tuneforge's LoRA method) really adapts.
    model, _ = prepare_model(LoraMethod(), build_tiny_model(family))
    adapted_modules = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper)
    }
    adapted_parameters = set(model.peft_config["default"].target_parameters or [])
    fresh = build_tiny_model(family)
    assert sorted(adapted_modules) == default_lora_targets(fresh)
    assert sorted(adapted_parameters) == default_lora_target_parameters(fresh)
    head = next(n for n, m in fresh.named_modules() if m is fresh.get_output_embeddings())
    assert head not in default_lora_targets(fresh)


def test_default_targets_by_architecture():
    assert default_lora_targets(build_tiny_model(get_family("GPT-2"))) == ["c_attn", "c_fc", "c_proj"]  # Conv1D
    assert default_lora_targets(build_tiny_model(get_family("gpt_neox"))) == [
        "dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value",
    ]
    assert default_lora_target_parameters(build_tiny_model(get_family("Llama"))) == []
    mixtral = build_tiny_model(get_family("Mixtral"))
    assert default_lora_targets(mixtral) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert default_lora_target_parameters(mixtral) == ["down_proj", "gate.weight", "gate_up_proj"]


def test_tiny_configs_are_tiny_and_fit_the_test_tokenizer(tokenizer):
    assert len({family.model_type for family in FAMILIES}) == len(FAMILIES)
    for family in FAMILIES:
        model = build_tiny_model(family)
        assert model.config.model_type == family.model_type
        assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
        assert sum(p.numel() for p in model.parameters()) < 100_000, family.name
        assert family.moe == hasattr(model.config, "output_router_logits"), family.name


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(
            family,
            id=family.model_type,
        )
        for family in FAMILIES
        if family.hub_auto_map
    ],
)
def test_hub_style_config_with_auto_map_loads_the_builtin_model(family: ModelFamily, tmp_path, tokenizer_dir):
    model_dir = save_tiny_checkpoint(family, tmp_path / "model", tokenizer_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # As on the hub: the checkpoint also names its own code, which transformers does not need.
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    config_path.write_text(json.dumps(config), encoding="utf-8")
    model = load_model(ModelConfig(path=str(model_dir)))
    assert type(model) is type(build_tiny_model(family))


def test_models_doc_is_current(described):
    current = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    rendered = render_models_doc([described[family.name] for family in FAMILIES])
    assert current == rendered, "regenerate: python -m tuneforge.train.family_matrix > docs/models.md"


def test_doc_shows_failures_and_counts():
    llama = get_family("Llama")
    ok = FamilyResult(llama, ("q_proj",), (), 1234)
    failed = FamilyResult(llama, ("q_proj",), (), 0, "ModelError: boom")
    assert "| ✓ 1,234 |" in render_models_doc([ok])
    assert "| ✗ ModelError: boom |" in render_models_doc([failed])


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(KeyError, match="known: Llama, Mistral"):
        get_family("llama4")
