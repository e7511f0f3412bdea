"""Vision-language models: a vision tower and a projector in front of a causal LM (LLaVA layout).

    images = prepare_image_inputs(config.model, tokenizer)   # before the data stage
    model = load_model(config.model)                         # assembles when model.vision is set
    fit_to_tokenizer(model, tokenizer, images)               # image token row and id

Two ways a language model becomes a VLM (docs/vision.md):

- transformers' own `LlavaForConditionalGeneration` (`LlavaConfig` with the vision and the
  text config) for every language model transformers implements: Llama, Mistral, Mixtral,
  Qwen2/3, Gemma, ... The result is a standard checkpoint that `AutoModelForImageTextToText`
  and serving engines load.
- `TuneforgeVlmForConditionalGeneration` for language models that ship their own code
  (`trust_remote_code`, as Tanuki-8x8B): `LlavaConfig` cannot name their config class, so this
  small composite holds the language model whole, saves its code files next to the weights,
  and loads through `AutoModelForImageTextToText` once `tuneforge` is imported.

The projector is transformers' `LlavaMultiModalProjector` in both: `mlp2x_gelu` is its GELU
MLP; `linear` is the same two layers with the identity activation, a linear map (GIT, heron).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import (
    custom_object_save,
    get_class_from_dynamic_module,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from tuneforge.config.schema import LoraMethod, ModelConfig, VisionConfig
from tuneforge.data.images import ImageInputs
from tuneforge.errors import ModelError
from tuneforge.models.parameters import embedding_rows

PROJECTOR_ACTIVATIONS = {"mlp2x_gelu": "gelu", "linear": "linear"}
PROJECTOR = "multi_modal_projector"  # its module name in both layouts


def is_vlm_config(model_config: PretrainedConfig) -> bool:
    """A vision-language config: LLaVA, this module's composite, or others with a vision tower."""
    return getattr(model_config, "vision_config", None) is not None


def checkpoint_is_vlm(config: ModelConfig) -> bool:
    """Whether `model.path` holds a vision-language model (read from its config, nothing loaded)."""
    return auto_model_class(config.path) is AutoModelForImageTextToText


def _vision_config(vision: VisionConfig) -> PretrainedConfig:
    try:
        loaded = AutoConfig.from_pretrained(vision.path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read the vision tower's config: {str(exc).strip().splitlines()[0]}",
            where=f"model.vision.path={vision.path}",
            hint="give a CLIP or SigLIP checkpoint (hub id or directory with config.json)",
        ) from None
    # A full CLIP/SigLIP checkpoint carries the tower's config inside it.
    return getattr(loaded, "vision_config", None) or loaded


def _has_class_token(vision_config: PretrainedConfig) -> bool:
    # CLIP prepends a class embedding to the patches; SigLIP has none.
    return vision_config.model_type.startswith("clip")


def select_strategy(vision: VisionConfig, vision_config: PretrainedConfig) -> str:
    if vision.feature_select != "auto":
        return vision.feature_select
    return "default" if _has_class_token(vision_config) else "full"


def tokens_per_image(vision_config: PretrainedConfig, strategy: str) -> int:
    """Image features per image: one per patch, plus the class token when it is kept."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if strategy == "full" and _has_class_token(vision_config) else 0)


def _image_processor(source: str, where: str) -> Any:
    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the image processor: {str(exc).strip().splitlines()[0]}",
            where=where,
            hint="the directory needs preprocessor_config.json; set model.vision.image_processor",
        ) from None


def prepare_image_inputs(config: ModelConfig, tokenizer: Any) -> ImageInputs | None:
    """What the data stage needs from the VLM (None for a text-only model).

    Assembly adds the image token to the tokenizer; a VLM checkpoint's tokenizer has it.
    """
    if config.vision is not None:
        vision_config = _vision_config(config.vision)
        image_token = config.vision.image_token
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        count = tokens_per_image(vision_config, select_strategy(config.vision, vision_config))
        processor = _image_processor(config.vision.image_processor or config.vision.path, "model.vision.image_processor")
    elif config.builder is None and checkpoint_is_vlm(config):
        return checkpoint_image_inputs(config.path, config.path, tokenizer, trust_remote_code=config.trust_remote_code)
    else:
        return None
    return ImageInputs(image_token, tokenizer.convert_tokens_to_ids(image_token), count, processor)


def checkpoint_image_inputs(
    model_path: str, processor_path: str, tokenizer: Any, *, trust_remote_code: bool = False
) -> ImageInputs:
    """A saved VLM's image inputs: token and feature count from its config, the image processor
    from `processor_path` (an adapter run keeps it beside the adapter)."""
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    image_token = tokenizer.convert_ids_to_tokens(model_config.image_token_id)
    count = tokens_per_image(model_config.vision_config, model_config.vision_feature_select_strategy)
    processor = _image_processor(processor_path, processor_path)
    return ImageInputs(image_token, model_config.image_token_id, count, processor)


def auto_model_class(path: str) -> type:
    """`AutoModelForImageTextToText` for a saved VLM, else `AutoModelForCausalLM`."""
    config_dict, _ = PretrainedConfig.get_config_dict(path)
    return AutoModelForImageTextToText if "vision_config" in config_dict else AutoModelForCausalLM


def load_vision_tower(vision: VisionConfig, *, random_init: bool, dtype: Any) -> PreTrainedModel:
    """The vision half of a CLIP/SigLIP checkpoint (or fresh random weights of its shape)."""
    vision_config = _vision_config(vision)
    tower_class = AutoModel._model_mapping[type(vision_config)]  # CLIPVisionModel, SiglipVisionModel
    if random_init:
        return tower_class._from_config(vision_config, dtype=None if dtype == "auto" else dtype)
    try:
        return tower_class.from_pretrained(vision.path, config=vision_config, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(
            str(exc).strip().splitlines()[0],
            where=f"model.vision.path={vision.path}",
            hint="for a config-only directory set model.init: random",
        ) from None


def _projector_settings(vision: VisionConfig, vision_config: PretrainedConfig) -> dict[str, Any]:
    return {
        "projector_hidden_act": PROJECTOR_ACTIVATIONS[vision.projector],
        "vision_feature_layer": vision.feature_layer,
        "vision_feature_select_strategy": select_strategy(vision, vision_config),
    }


def _is_transformers_model(language_model: torch.nn.Module) -> bool:
    return type(language_model).__module__.startswith("transformers.")


@contextmanager
def _without_zero3_init() -> Iterator[None]:
    """Build an empty shell as under any other engine. With a DeepSpeed ZeRO-3 config active,
    transformers builds every sub-model (`from_config`) inside `deepspeed.zero.Init` and then
    initialises its weights gathered, which fails on `meta` ("Cannot copy out of meta tensor");
    the parts moved in are partitioned already, and DeepSpeed partitions the new projector when
    it wraps the model."""
    from transformers.integrations import deepspeed as hf_deepspeed

    kept = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = kept


def _as_llava(language_model: PreTrainedModel, tower: PreTrainedModel, settings: dict[str, Any]) -> LlavaForConditionalGeneration:
    """LLaVA around the loaded modules: built empty on `meta`, then the real parts moved in."""
    # LLaVA's config and init reset the sub-configs (the loaded modules' own) to the default
    # attention: keep what loading chose (`model.attn_implementation`).
    attention = {
        "text_config": language_model.config._attn_implementation,
        "vision_config": tower.config._attn_implementation,
    }
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=language_model.config,
        image_seq_length=tokens_per_image(tower.config, settings["vision_feature_select_strategy"]),
        **settings,
    )
    if hasattr(config.text_config, "output_router_logits"):
        # LLaVA's outputs have no place for router logits (Mixtral-style MoE): no router loss.
        config.text_config.output_router_logits = False
    with torch.device("meta"), _without_zero3_init():
        model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attention)
    model.model.vision_tower = tower
    model.model.language_model = language_model.base_model
    model.lm_head = language_model.get_output_embeddings()
    # The new projector in the language model's dtype (bf16 with a bf16 model).
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(language_model.dtype)
    model.generation_config = language_model.generation_config
    return model


def assemble_vlm(config: ModelConfig, language_model: PreTrainedModel, dtype: Any) -> PreTrainedModel:
    """Vision tower + projector + `language_model`; LLaVA when transformers implements the LM."""
    assert config.vision is not None
    tower = load_vision_tower(config.vision, random_init=config.init == "random", dtype=dtype)
    settings = _projector_settings(config.vision, tower.config)
    if _is_transformers_model(language_model):
        return _as_llava(language_model, tower, settings)
    model = TuneforgeVlmForConditionalGeneration(
        TuneforgeVlmConfig(vision_config=tower.config, text_config=language_model.config, **settings),
        vision_tower=tower,
        language_model=language_model,
    )
    model.multi_modal_projector.to(language_model.dtype)
    return model


def fit_to_tokenizer(model: PreTrainedModel, tokenizer: Any, images: ImageInputs) -> None:
    """Room for the image token in the embeddings, and its id in the config."""
    if len(tokenizer) > embedding_rows(model):
        # The image token's row is never read (features replace it); mean init keeps it harmless.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.image_token_id = images.image_token_id


def language_model_targets(model: torch.nn.Module) -> str:
    """LoRA `all-linear` for a VLM: a regex of the language model's linear layers only.

    The vision tower stays as pretrained and the projector trains in full (modules_to_save).
    """
    head = model.get_output_embeddings()
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "language_model" in name and module is not head
        }
    )
    return rf".*language_model.*\.({'|'.join(names)})"


def vlm_method(method: Any, model: torch.nn.Module) -> Any:
    """The method for a VLM: LoRA's `all-linear` means the language model's linear layers, and
    the projector trains in full with the adapters (saved with them)."""
    if not isinstance(method, LoraMethod):
        return method
    update: dict[str, Any] = {}
    if method.target_modules == "all-linear":
        update["target_modules"] = language_model_targets(model)
    if PROJECTOR not in method.modules_to_save:
        update["modules_to_save"] = [*method.modules_to_save, PROJECTOR]
    return method.model_copy(update=update)


def save_processor(model_dir: Path, tokenizer: Any, images: ImageInputs, model: torch.nn.Module) -> None:
    """`processor_config.json` and the image processor next to the model: `AutoProcessor` then
    prepares text and images as training did (placeholder expansion included)."""
    config = model.config
    vision_config = config.vision_config
    LlavaProcessor(
        image_processor=images.processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=images.image_token,
        num_additional_image_tokens=1 if _has_class_token(vision_config) else 0,
        chat_template=getattr(tokenizer, "chat_template", None),
    ).save_pretrained(str(model_dir))


class TuneforgeVlmConfig(PretrainedConfig):
    """The composite's config: the vision config, the language model's (own-code) config, the projector."""

    model_type = "tuneforge_vlm"

    def __init__(
        self,
        vision_config: PretrainedConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        image_token_id: int | None = None,
        projector_hidden_act: str = "gelu",
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: str = "default",
        multimodal_projector_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(vision_config, dict):
            vision_config = AutoConfig.for_model(**vision_config)
        self.vision_config = vision_config
        # The language model's config class lives in its own code: a dict until the model
        # resolves it from the code saved with the checkpoint (see `_text_config`).
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.multimodal_projector_bias = multimodal_projector_bias
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("vision_config", "text_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return output

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        return self.text_config


def _text_config(config: TuneforgeVlmConfig) -> PretrainedConfig:
    """The language model's config object, its class imported from the code saved with the checkpoint."""
    text = config.text_config
    if isinstance(text, PretrainedConfig):
        return text
    reference = (text or {}).get("auto_map", {}).get("AutoConfig")
    if reference is None:
        raise ModelError(
            "the composite VLM's text_config names no code for its config (auto_map.AutoConfig)",
            where=config.name_or_path,
        )
    config_class = get_class_from_dynamic_module(reference, config.name_or_path)
    return config_class.from_dict(text)


class TuneforgeVlmForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Vision tower + LLaVA projector + a whole causal LM with its own code.

    The forward pass is LLaVA's: image features replace the image-token embeddings, then the
    language model runs on the embeddings (it must accept `inputs_embeds`, as Llama-derived
    models do).
    """

    config_class = TuneforgeVlmConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(
        self,
        config: TuneforgeVlmConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        config.text_config = _text_config(config)
        super().__init__(config)
        self.vision_tower = vision_tower or AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(
            config.text_config, trust_remote_code=True
        )
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.language_model.get_output_embeddings()

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> torch.nn.Embedding:
        embeddings = self.language_model.resize_token_embeddings(*args, **kwargs)
        self.config.text_config.vocab_size = embedding_rows(self)
        return embeddings

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        selected = hidden[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # drop the class token
        return self.multi_modal_projector(selected)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features in the image tokens' places."""
        embeddings = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeddings
        features = self.get_image_features(pixel_values.to(self.vision_tower.dtype))
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"{int(mask.sum())} image tokens in the text but {features.shape[0]} images of "
                f"{features.shape[1]} features"
            )
        return embeddings.masked_scatter(mask.unsqueeze(-1), features.to(embeddings.dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """The language model generates from the merged embeddings; the output starts with `input_ids`."""
        return self.language_model.generate(
            input_ids=input_ids, inputs_embeds=self.embed(input_ids, pixel_values), **kwargs
        )

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        # The language model's own code files (and those they import) go with the weights.
        custom_object_save(self.language_model, str(save_directory), config=self.config.text_config)
        custom_object_save(self.config.text_config, str(save_directory))
        self.config.save_pretrained(str(save_directory))  # with the text config's auto_map now set


AutoConfig.register(TuneforgeVlmConfig.model_type, TuneforgeVlmConfig, exist_ok=True)
AutoModelForImageTextToText.register(TuneforgeVlmConfig, TuneforgeVlmForConditionalGeneration, exist_ok=True)


__all__ = [
    "TuneforgeVlmConfig",
    "TuneforgeVlmForConditionalGeneration",
    "assemble_vlm",
    "auto_model_class",
    "checkpoint_image_inputs",
    "checkpoint_is_vlm",
    "fit_to_tokenizer",
    "is_vlm_config",
    "language_model_targets",
    "load_vision_tower",
    "prepare_image_inputs",
    "save_processor",
    "select_strategy",
    "tokens_per_image",
    "vlm_method",
]
