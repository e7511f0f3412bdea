from pathlib import Path

import pytest
import yaml

from tuneforge.config import load_config, parse_override
from tuneforge.config.schema import FreezeMethod, LoraMethod
from tuneforge.errors import ConfigError

BASE = """\
model:
  path: some/model
data:
  datasets:
    - path: train.jsonl
      prompt_fields: [question]
      response_field: answer
train:
  learning_rate: 1.0e-4
"""


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults(base_file):
    config = load_config(base_file)
    assert config.model.path == "some/model"
    assert config.method.name == "full"
    assert config.train.learning_rate == 1e-4
    assert config.output.dir == "runs/base"  # named after the config file


def test_unknown_key_names_file_line_and_suggests(tmp_path, base_file):
    path = write(tmp_path, BASE + "  learnig_rate: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert f"{path}:10" in text
    assert "train.learnig_rate" in text
    assert "did you mean 'learning_rate'?" in text


def test_unknown_key_in_nested_section_lists_known_keys(tmp_path):
    path = write(tmp_path, BASE + "method:\n  name: lora\n  rank: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert f"{path}:12 (method.rank)" in text
    assert "did you mean 'r'?" not in text or "known keys" in text
    assert "lora_alpha" in text  # the known keys of the LoRA section are listed


def test_renamed_key_points_to_new_name(tmp_path):
    path = write(tmp_path, BASE + "  evaluation_strategy: steps\n")
    with pytest.raises(ConfigError, match=r"use train\.eval_strategy instead"):
        load_config(path)


def test_wrong_type_names_key_value_and_expectation(tmp_path):
    path = write(tmp_path, BASE + "  num_train_epochs: three\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "train.num_train_epochs" in text
    assert "valid number" in text
    assert "'three'" in text
    assert f"{path}:10" in text


def test_invalid_choice_lists_choices(tmp_path):
    path = write(tmp_path, BASE.replace("  path: some/model", "  path: some/model\n  dtype: bf16"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "model.dtype" in str(info.value) and "'bfloat16'" in str(info.value)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "data:\n  datasets: [{path: x.jsonl}]\n")
    with pytest.raises(ConfigError, match=r"\(model\): required key is missing"):
        load_config(path)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "config file not found" in str(info.value) and "nope.yaml" in str(info.value)


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, BASE + "  learning_rate: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r":10: duplicate key 'learning_rate'"):
        load_config(path)


def test_yml_extension_and_extends(tmp_path, base_file):
    child = write(tmp_path, "extends: base.yaml\nmethod:\n  name: lora\n  r: 4\n", "child.yml")
    config = load_config(child)
    assert isinstance(config.method, LoraMethod) and config.method.r == 4
    assert config.model.path == "some/model"  # inherited
    assert config.train.learning_rate == 1e-4


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_overrides_types_and_nesting(base_file):
    config = load_config(
        base_file,
        [
            "train.learning_rate=3e-4",
            "train.num_train_epochs=2",
            "method.name=freeze",
            "method.trainable=[lm_head]",
            "data.datasets.0.max_rows=5",
            "model.trust_remote_code=true",
        ],
    )
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.train.num_train_epochs == 2
    assert isinstance(config.method, FreezeMethod) and config.method.trainable == ["lm_head"]
    assert config.data.datasets[0].max_rows == 5
    assert config.model.trust_remote_code is True


def test_bad_override_is_located_on_the_command_line(base_file):
    with pytest.raises(ConfigError, match=r"command line override 'train\.warmup_stepz=3'"):
        load_config(base_file, ["train.warmup_stepz=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no_equals_sign")
    with pytest.raises(ConfigError, match="not an existing list item"):
        load_config(base_file, ["data.datasets.3.path=x"])


def test_freeze_needs_patterns(tmp_path):
    path = write(tmp_path, BASE + "method:\n  name: freeze\n")
    with pytest.raises(ConfigError, match="needs 'trainable'/'frozen' patterns or a preset"):
        load_config(path)


def test_dataset_needs_exactly_one_source(tmp_path):
    path = write(tmp_path, "model: {path: m}\ndata:\n  datasets:\n    - format: text\n")
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config(path)


def test_the_saved_config_holds_every_section_and_loads_back_equal(tmp_path):
    from tuneforge.config import dump_config
    from tuneforge.config.schema import Config

    config = load_config(
        {"model": {"path": "m"}, "data": {"datasets": [{"path": "d.jsonl"}]}},
        ["guards.max_nonfinite_steps=0", "speed.activations=offload", "output.dir=" + str(tmp_path)],
    )
    saved = yaml.safe_load(dump_config(config))
    assert list(saved)[:4] == ["model", "data", "method", "train"]
    assert set(saved) == set(Config.model_fields)
    assert load_config(saved) == config


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
@pytest.mark.parametrize(
    "distributed",
    [{"strategy": "ddp"}, {"strategy": "fsdp"}]
    + [{"strategy": "deepspeed", "zero_stage": stage} for stage in (1, 2, 3)],
    ids=["ddp", "fsdp", "zero1", "zero2", "zero3"],
)
@pytest.mark.parametrize(
    "method",
    [{"name": "full"}, {"name": "freeze", "last_layers": 1}, {"name": "lora"}, {"name": "dpo", "adapter": {"name": "lora"}}],
    ids=["full", "freeze", "lora", "dpo-lora"],
)
def test_support_matrix_of_quantization_engine_and_method(quantization, distributed, method):
    """PITFALLS 11: every cell is decided when the config loads, and a refusal names the alternative."""
    preference = method["name"] == "dpo"
    config = {
        "model": {"path": "m", "quantization": quantization},
        "data": {"datasets": [{"path": "d.jsonl", "format": "preference" if preference else "instruction"}]},
        "method": method,
        "distributed": distributed,
    }
    adapter = method.get("adapter", method)["name"] == "lora"
    engine = distributed["strategy"] if distributed["strategy"] != "deepspeed" else f"zero{distributed['zero_stage']}"
    if quantization == "none":
        assert load_config(config).distributed.engine == engine
    elif not adapter:
        with pytest.raises(ConfigError, match="only adapters train on quantized weights; use method.name: lora"):
            load_config(config)
    elif engine in ("fsdp", "zero3"):
        with pytest.raises(ConfigError, match=f"cannot train under {engine}:.*(strategy: ddp|zero_stage: 2)"):
            load_config(config)
    else:
        assert load_config(config).model.quantization == quantization


def test_the_zero_stage_of_a_users_deepspeed_file_is_checked_too(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    config = {
        "model": {"path": "m", "quantization": "4bit"}, "data": {"datasets": [{"path": "d.jsonl"}]},
        "method": {"name": "lora"}, "distributed": {"strategy": "deepspeed", "deepspeed_config": str(ds)},
    }
    with pytest.raises(ConfigError, match="cannot train under zero3"):
        load_config(config)
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    assert load_config(config).distributed.engine == "zero2"
