import pytest
import torch

from tests.models.custom_code import write_custom_checkpoint
from tuneforge.config.schema import ModelConfig
from tuneforge.errors import ModelError
from tuneforge.models import load_model, load_tokenizer


@pytest.fixture
def custom_dir(tmp_path, tokenizer_dir, tokenizer):
    return write_custom_checkpoint(tmp_path / "tiny-custom", tokenizer_dir, len(tokenizer))


def test_custom_code_is_refused_without_trust_naming_flag_and_files(custom_dir):
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(path=str(custom_dir), init="random"))
    text = str(info.value)
    assert "trust_remote_code: true" in text
    assert "modeling_tiny_custom.py" in text and "configuration_tiny_custom.py" in text


def test_custom_code_with_relative_imports_loads_when_trusted(custom_dir):
    config = ModelConfig(path=str(custom_dir), init="random", trust_remote_code=True)
    model = load_model(config)
    assert type(model).__name__ == "TinyCustomForCausalLM"
    model.save_pretrained(str(custom_dir))  # weights next to the code, like a hub checkpoint
    reloaded = load_model(ModelConfig(path=str(custom_dir), trust_remote_code=True))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_random_init_applies_config_overrides(tiny_model_dir):
    model = load_model(ModelConfig(path=str(tiny_model_dir), init="random", config_overrides={"num_hidden_layers": 1}))
    assert model.config.num_hidden_layers == 1
    assert model.dtype == torch.float32


def test_dtype_is_applied(tiny_model_dir):
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16"))
    assert model.dtype == torch.bfloat16


def test_pad_token_falls_back_to_eos(tiny_model_dir):
    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "right"


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot find a model config"):
        load_model(ModelConfig(path=str(tmp_path / "nowhere")))


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    (tmp_path / "pickled").mkdir()
    model.config.save_pretrained(str(tmp_path / "pickled"))
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")  # as older checkpoints ship
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(path=str(tmp_path / "pickled")))
    assert "pytorch_model.bin" in str(info.value) and "allow_pickle_weights" in str(info.value)


def test_config_without_weights_points_to_random_init(tmp_path, tiny_model_dir):
    from tuneforge.models.loading import preflight

    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    with pytest.raises(ModelError, match="no weights.*\n.*model.init: random"):
        preflight(ModelConfig(path=str(tmp_path / "config-only")))
    preflight(ModelConfig(path=str(tmp_path / "config-only"), init="random"))  # fine
