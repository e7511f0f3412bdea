"""Vision-language models: assembly, the two training stages, reload, generation with images."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from tests.vision_assets import COLOURS, blank_image, build_tiny_clip, shape_rows, write_caption_data, write_llava_data
from tuneforge.errors import ModelError
from tuneforge.infer import generate, load_for_inference
from tuneforge.infer.chat import ChatSession
from tuneforge.train import train

TRAIN = {"per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True, "logging_steps": 20}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_two_stages_learn_from_the_image_and_reload_identically(tmp_path, clip_dir, tiny_model_dir):
    images = tmp_path / "images"
    train_rows = shape_rows(images, 96, seed=1)
    held_out = shape_rows(images, 24, seed=2)  # new renders: positions and sizes never trained on
    stage1 = train({
        "model": {"path": str(tiny_model_dir), "vision": {"path": str(clip_dir)}},
        "data": {
            "datasets": [{"path": str(write_caption_data(tmp_path / "captions.jsonl", train_rows)),
                          "format": "caption", "image_root": str(images), "template": "qa"}],
            "max_length": 64,
        },
        "method": {"name": "freeze", "trainable": ["multi_modal_projector"]},  # heron's keys_to_finetune
        "train": {**TRAIN, "max_steps": 20, "learning_rate": 3e-3},
        "output": {"dir": str(tmp_path / "stage1")},
    })
    stage1_model = stage1.model_dir
    assert stage1.parameters.trainable < stage1.parameters.total / 4  # projector only
    assert isinstance(AutoModelForImageTextToText.from_pretrained(str(stage1_model)), LlavaForConditionalGeneration)

    stage2 = train({
        "model": {"path": str(stage1_model)},  # the previous stage's output
        "data": {
            "datasets": [{"path": str(write_llava_data(tmp_path / "llava.json", train_rows)),
                          "format": "llava", "image_root": str(images)}],
            "max_length": 64,
        },
        "method": {"name": "full"},  # stage 2 with the vision tower unfrozen too
        "train": {**TRAIN, "max_steps": 100, "learning_rate": 5e-3},
        "output": {"dir": str(tmp_path / "stage2")},
    })

    loaded = load_for_inference(str(stage2.run_dir))
    question = "What colour is the shape?"

    def accuracy(image_paths: list[str]) -> float:
        answers = generate(loaded, [question] * len(held_out), images=[[p] for p in image_paths], max_new_tokens=8)
        return sum(a.strip() == row["colour"] for a, row in zip(answers, held_out)) / len(held_out)

    with_image = accuracy([str(images / row["image"]) for row in held_out])
    blank = accuracy([str(blank_image(tmp_path))] * len(held_out))
    chance = 1 / len(COLOURS)
    print(f"held-out colour accuracy: {with_image:.2f} with the image, {blank:.2f} with a blank image, chance {chance:.2f}")
    assert with_image >= 0.9
    assert blank <= chance + 0.01  # one answer for every blank image: a third of a balanced set

    # Chat shows the image with the first turn and keeps it in view: same answer as generate.
    first = held_out[0]
    session = ChatSession(loaded, images=[str(images / first["image"])], max_new_tokens=8)
    assert session.send(question) == first["colour"]
    assert session.prompt_text().count(loaded.images.image_token) == 1
    session.send("And the shape?")
    assert session.messages[0]["content"].startswith(loaded.images.image_token)
    with pytest.raises(ModelError, match="text-only model"):
        ChatSession(load_for_inference(str(tiny_model_dir)), images=[str(blank_image(tmp_path))])

    # The saved model is a standard LLaVA checkpoint: Auto classes, identical logits.
    processor = AutoProcessor.from_pretrained(str(stage2.model_dir))
    from PIL import Image

    inputs = processor(images=Image.open(images / held_out[0]["image"]), text="<image>\n" + question, return_tensors="pt")
    reloaded = AutoModelForImageTextToText.from_pretrained(str(stage2.model_dir)).eval()
    with torch.no_grad():
        expected = loaded.model(**inputs).logits
        assert torch.equal(reloaded(**inputs).logits, expected)


REMOTE_CONFIG = '''
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote_llama"
'''

REMOTE_MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    """A language model with its own code, as Tanuki-8x8B ships (seed 004)."""

    config_class = TinyRemoteConfig
'''


def _remote_code_lm(directory, tokenizer_dir):
    """A checkpoint whose classes live in its own files, imported relatively (needs trust_remote_code)."""
    import json

    from tests.conftest import build_tiny_llama

    build_tiny_llama(directory, tokenizer_dir)
    (directory / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (directory / "modeling_tiny_remote.py").write_text(REMOTE_MODELING)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="tiny_remote_llama", architectures=["TinyRemoteForCausalLM"],
        auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                  "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"},
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _short_run(tmp_path, model: dict, method: dict) -> object:
    images = tmp_path / "images"
    rows = shape_rows(images, 16, seed=3)
    return train({
        "model": model,
        "data": {"datasets": [{"path": str(write_llava_data(tmp_path / "llava.json", rows)), "format": "llava",
                               "image_root": str(images)}], "max_length": 64},
        "method": method,
        "train": {**TRAIN, "max_steps": 4, "learning_rate": 3e-3, "logging_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    })


def _losses(run_dir) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_remote_code_language_model_assembles_trains_and_reloads(tmp_path, clip_dir, tokenizer_dir):
    from tuneforge.models.vlm import TuneforgeVlmForConditionalGeneration

    lm = _remote_code_lm(tmp_path / "remote-lm", tokenizer_dir)
    result = _short_run(
        tmp_path, {"path": str(lm), "trust_remote_code": True, "vision": {"path": str(clip_dir), "projector": "linear"}},
        {"name": "full"},
    )
    losses = _losses(result.run_dir)
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # trained, no NaN
    model = AutoModelForImageTextToText.from_pretrained(str(result.model_dir), trust_remote_code=True)
    assert isinstance(model, TuneforgeVlmForConditionalGeneration)
    assert type(model.language_model).__name__ == "TinyRemoteForCausalLM"
    loaded = load_for_inference(str(result.run_dir))
    answer = generate(loaded, ["What colour is the shape?"], images=[[str(next((tmp_path / "images").glob("*.png")))]],
                      max_new_tokens=3)
    assert isinstance(answer[0], str)


def test_mixtral_language_model_assembles_into_llava_and_trains_with_lora(tmp_path, clip_dir, tokenizer_dir):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )).save_pretrained(str(tmp_path / "mixtral"))
    tokenizer.save_pretrained(str(tmp_path / "mixtral"))
    result = _short_run(tmp_path, {"path": str(tmp_path / "mixtral"), "vision": {"path": str(clip_dir)}}, {"name": "lora", "r": 4})
    assert len(_losses(result.run_dir)) == 4
    # LoRA on the language model only; the projector trains in full and is saved with the adapter.
    from safetensors import safe_open

    with safe_open(str(result.model_dir / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any("multi_modal_projector" in n for n in names)
    assert any("language_model" in n and "lora_A" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    base = AutoModelForImageTextToText.from_pretrained(str(result.run_dir / "base"))
    assert base.config.text_config.model_type == "mixtral"
