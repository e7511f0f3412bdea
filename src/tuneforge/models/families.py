"""The model families tuneforge supports, each with a tiny real config for the test matrix.

Each family names the checkpoints it covers and builds a tiny model (hidden size 32, 2 layers,
vocabulary 640) from its real `transformers` config class, so the matrix
(`tuneforge.train.family_matrix`) runs the same modelling code as the full-size checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

TINY_VOCAB_SIZE = 640  # >= every tokenizer the matrix uses (the test tokenizer has 600 tokens)
TINY_POSITIONS = 128

# Every tiny model uses the test tokenizer's ids: BOS "<s>" = 0, EOS "</s>" = 1, no pad token
# (tuneforge pads with EOS and masks padding by position). Defaults such as GPT-2's 50256 would
# point past the tiny vocabulary.
_SPECIAL_IDS: dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}
# The common shape: 4 heads of 8 (2 key/value heads where the family has grouped-query attention).
_DECODER: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": TINY_POSITIONS,
    **_SPECIAL_IDS,
}


@dataclass(frozen=True)
class ModelFamily:
    """One architecture as `transformers` implements it, and the checkpoints that use it.

    Attributes:
        name: display name, e.g. `GPT-NeoX`.
        model_type: the `transformers` model type (`config.json`'s `model_type`).
        known_as: the names the seed documents use for models of this family.
        checkpoints: example hub ids.
        moe: whether the feed-forward blocks are mixtures of experts.
        tiny_config: builds a tiny config from the family's real config class.
        note: what users of the family should know, shown under the doc's table.
        hub_auto_map: the example checkpoints' `config.json` also names their own modelling
            code (`auto_map`), although `transformers` implements the model type.
        known_issue: why LoRA training through tuneforge does not work yet, or None.
    """

    name: str
    model_type: str
    known_as: tuple[str, ...]
    checkpoints: tuple[str, ...]
    moe: bool
    tiny_config: Callable[[], PretrainedConfig]
    note: str | None = None
    hub_auto_map: bool = False
    known_issue: str | None = None


def _llama() -> PretrainedConfig:
    return transformers.LlamaConfig(**_DECODER, num_key_value_heads=2)


def _mistral() -> PretrainedConfig:
    # A window shorter than the test sequences, so sliding-window attention is exercised.
    return transformers.MistralConfig(**_DECODER, num_key_value_heads=2, sliding_window=16)


def _mixtral() -> PretrainedConfig:
    return transformers.MixtralConfig(
        **_DECODER, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    )


def _qwen2() -> PretrainedConfig:
    return transformers.Qwen2Config(**_DECODER, num_key_value_heads=2)


def _qwen2_moe() -> PretrainedConfig:
    return transformers.Qwen2MoeConfig(
        **_DECODER,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )


def _qwen3() -> PretrainedConfig:
    return transformers.Qwen3Config(**_DECODER, num_key_value_heads=2, head_dim=8)


def _qwen3_moe() -> PretrainedConfig:
    return transformers.Qwen3MoeConfig(
        **_DECODER,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    )


def _gemma2() -> PretrainedConfig:
    return transformers.Gemma2Config(
        **_DECODER, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16
    )


def _gemma3_text() -> PretrainedConfig:
    # Both layer kinds in two layers (the real pattern is five sliding, then one full).
    return transformers.Gemma3TextConfig(
        **_DECODER,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )


def _phi3() -> PretrainedConfig:
    return transformers.Phi3Config(**_DECODER, num_key_value_heads=2)


def _gpt_neox() -> PretrainedConfig:
    return transformers.GPTNeoXConfig(**_DECODER)


def _opt() -> PretrainedConfig:
    return transformers.OPTConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_POSITIONS,
        **_SPECIAL_IDS,
    )


def _falcon() -> PretrainedConfig:
    # falcon-7b's layout: multi-query attention, attention and MLP in parallel, no biases.
    return transformers.FalconConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        bias=False,
        max_position_embeddings=TINY_POSITIONS,
        **_SPECIAL_IDS,
    )


def _mpt() -> PretrainedConfig:
    return transformers.MptConfig(
        vocab_size=TINY_VOCAB_SIZE, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2,
        max_seq_len=TINY_POSITIONS, **_SPECIAL_IDS,
    )


def _gpt2() -> PretrainedConfig:
    return transformers.GPT2Config(
        vocab_size=TINY_VOCAB_SIZE, n_embd=32, n_inner=64, n_layer=2, n_head=4,
        n_positions=TINY_POSITIONS, **_SPECIAL_IDS,
    )


def _gptj() -> PretrainedConfig:
    return transformers.GPTJConfig(
        vocab_size=TINY_VOCAB_SIZE, n_embd=32, n_inner=64, n_layer=2, n_head=4, rotary_dim=4,
        n_positions=TINY_POSITIONS, **_SPECIAL_IDS,
    )


def _bloom() -> PretrainedConfig:
    return transformers.BloomConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4, **_SPECIAL_IDS
    )


_EXPERTS_AS_PARAMETERS = (
    "peft maps `all-linear` onto the fused experts (`gate_up_proj`, `down_proj`) and the router "
    "(`gate.weight`) as `target_parameters`; `gate_up_proj` gets rank 2r, as its two projections "
    "had r each. peft's warning that the `gate_up_proj` rank pattern matched no module is harmless."
)

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="Llama",
        model_type="llama",
        known_as=("LLaMA-1", "LLaMA-2", "LLaMA-3", "ELYZA-japanese-Llama-2", "Japanese StableLM Beta", "OpenLLaMA"),
        checkpoints=(
            "meta-llama/Llama-2-7b-hf",
            "elyza/ELYZA-japanese-Llama-2-7b",
            "stabilityai/japanese-stablelm-base-beta-7b",
            "openlm-research/open_llama_13b_600bt",
        ),
        moe=False,
        tiny_config=_llama,
        note="Japanese StableLM Alpha (`stabilityai/japanese-stablelm-base-alpha-7b`) is not a Llama: "
        "it ships its own modelling code, so it needs `model.trust_remote_code: true` and "
        "`target_modules` naming its layers. The Beta models are Llama-2.",
    ),
    ModelFamily(
        name="Mistral", model_type="mistral", known_as=("Mistral",),
        checkpoints=("mistralai/Mistral-7B-v0.1",), moe=False, tiny_config=_mistral,
    ),
    ModelFamily(
        name="Mixtral", model_type="mixtral", known_as=("Mixtral",),
        checkpoints=("mistralai/Mixtral-8x7B-v0.1", "if001/tiny_mixtral_ja"), moe=True, tiny_config=_mixtral,
        note=_EXPERTS_AS_PARAMETERS,
    ),
    ModelFamily(
        name="Qwen2", model_type="qwen2", known_as=("Qwen2", "Qwen2.5"),
        checkpoints=("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-0.5B"), moe=False, tiny_config=_qwen2,
    ),
    ModelFamily(
        name="Qwen2-MoE", model_type="qwen2_moe", known_as=("Qwen1.5-MoE",),
        checkpoints=("Qwen/Qwen1.5-MoE-A2.7B",), moe=True, tiny_config=_qwen2_moe,
        note="peft does not map `all-linear` onto this family's fused routed experts (it does for "
        "Mixtral and Qwen3-MoE), so LoRA adapts attention and the shared expert; the routed "
        "experts and the router stay frozen.",
    ),
    ModelFamily(
        name="Qwen3", model_type="qwen3", known_as=("Qwen3",),
        checkpoints=("Qwen/Qwen3-8B",), moe=False, tiny_config=_qwen3,
    ),
    ModelFamily(
        name="Qwen3-MoE", model_type="qwen3_moe", known_as=("Qwen3-MoE",),
        checkpoints=("Qwen/Qwen3-30B-A3B",), moe=True, tiny_config=_qwen3_moe, note=_EXPERTS_AS_PARAMETERS,
    ),
    ModelFamily(
        name="Gemma 2", model_type="gemma2", known_as=("Gemma 2",),
        checkpoints=("google/gemma-2-9b",), moe=False, tiny_config=_gemma2,
    ),
    ModelFamily(
        name="Gemma 3", model_type="gemma3_text", known_as=("Gemma 3",),
        checkpoints=("google/gemma-3-1b-pt", "google/gemma-3-4b-pt"), moe=False, tiny_config=_gemma3_text,
        note="Tested is the text-only model (`gemma3_text`, e.g. 1B). `google/gemma-3-4b-pt` and larger "
        "are image-text checkpoints (`gemma3`, loaded as `Gemma3ForConditionalGeneration`): there "
        "`all-linear` also adapts the vision tower (`q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, "
        "`fc2`), which text-only data never updates. To adapt the language model only, set "
        "`target_modules: '.*language_model.*\\.(q|k|v|o|gate|up|down)_proj'`.",
    ),
    ModelFamily(
        name="Phi-3", model_type="phi3", known_as=("Phi-3",),
        checkpoints=("microsoft/Phi-3-mini-4k-instruct",), moe=False, tiny_config=_phi3, hub_auto_map=True,
    ),
    ModelFamily(
        name="GPT-NeoX",
        model_type="gpt_neox",
        known_as=("Pythia", "Dolly v2", "rinna japanese-gpt-neox", "OpenCALM"),
        checkpoints=(
            "EleutherAI/pythia-70m",
            "databricks/dolly-v2-12b",
            "rinna/japanese-gpt-neox-3.6b",
            "cyberagent/open-calm-7b",
        ),
        moe=False,
        tiny_config=_gpt_neox,
    ),
    ModelFamily(
        name="OPT", model_type="opt", known_as=("OPT",),
        checkpoints=("facebook/opt-1.3b", "facebook/opt-350m"), moe=False, tiny_config=_opt,
    ),
    ModelFamily(
        name="Falcon", model_type="falcon", known_as=("Falcon",),
        checkpoints=("tiiuae/falcon-7b",), moe=False, tiny_config=_falcon, hub_auto_map=True,
    ),
    ModelFamily(
        name="MPT", model_type="mpt", known_as=("MPT",),
        checkpoints=("mosaicml/mpt-7b",), moe=False, tiny_config=_mpt, hub_auto_map=True,
    ),
    ModelFamily(
        name="GPT-2", model_type="gpt2", known_as=("GPT-2", "Cerebras-GPT"),
        checkpoints=("openai-community/gpt2", "cerebras/Cerebras-GPT-111M"), moe=False, tiny_config=_gpt2,
        note="GPT-2's layers are `Conv1D` (transposed linear); peft adapts them as linear layers.",
    ),
    ModelFamily(
        name="GPT-J", model_type="gptj", known_as=("GPT-J",),
        checkpoints=("EleutherAI/gpt-j-6b",), moe=False, tiny_config=_gptj,
    ),
    ModelFamily(
        name="BLOOM", model_type="bloom", known_as=("BLOOM",),
        checkpoints=("bigscience/bloom-560m",), moe=False, tiny_config=_bloom,
    ),
)


def get_family(name: str) -> ModelFamily:
    """The family with this display name or model type.

    Raises:
        KeyError: no such family; the message lists the known ones.
    """
    for family in FAMILIES:
        if name in (family.name, family.model_type):
            return family
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def build_tiny_model(family: ModelFamily, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny model of the family, built through `AutoModelForCausalLM`."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family.tiny_config(), dtype=torch.float32)


def _resolve_all_linear(model: torch.nn.Module) -> Any:
    """The LoRA config `target_modules="all-linear"` becomes on this model, resolved as peft does."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    # peft resolves `all-linear` in private helpers while injecting the adapter; these are the
    # same calls in the same order (BaseTuner.inject_adapter), without touching the model.
    # tests/models/test_families.py fails if their resolution drifts from what peft adapts.
    config = LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM")
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # peft before the transformers-5 MoE conversion
        pass
    else:
        if hasattr(getattr(model, "config", None), "model_type"):
            # transformers 5 fused MoE experts into 3-D parameters; peft maps `all-linear` onto
            # them (as `target_parameters`) for the model types its conversion table knows.
            convert_peft_config_for_transformers(config, model, get_model_conversion_mapping(model))
    return _maybe_include_all_linear_layers(config, model)


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """The module names `target_modules: all-linear` resolves to, as one writes them in a config.

    Every Linear (and GPT-2 style Conv1D) layer except the output head. Fused MoE expert weights
    are parameters, not modules: see `default_lora_target_parameters`.

    Example:
        >>> default_lora_targets(build_tiny_model(get_family("Llama")))
        ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
    """
    return sorted({name.rsplit(".", 1)[-1] for name in _resolve_all_linear(model).target_modules})


def default_lora_target_parameters(model: torch.nn.Module) -> list[str]:
    """The parameters `all-linear` adapts directly (peft `target_parameters`): fused MoE experts.

    Empty for dense models, and for MoE models whose fused experts peft does not map.

    Example:
        >>> default_lora_target_parameters(build_tiny_model(get_family("Mixtral")))
        ['down_proj', 'gate.weight', 'gate_up_proj']
    """
    return sorted(_resolve_all_linear(model).target_parameters or [])
