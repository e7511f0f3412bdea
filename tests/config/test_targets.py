import sys
import textwrap

import pytest

from tuneforge.config import load_config
from tuneforge.config.schema import Component
from tuneforge.config.targets import instantiate
from tuneforge.data import read_rows
from tuneforge.errors import ConfigError


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_components.py").write_text(
        textwrap.dedent(
            """
            def make_rows(count, prefix="q"):
                return [{"question": f"{prefix}{i}", "answer": str(i)} for i in range(count)]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield "my_components"
    sys.modules.pop("my_components", None)


def config_with_source(source: dict) -> dict:
    return {
        "model": {"path": "m"},
        "data": {"datasets": [{"source": source, "prompt_fields": ["question"], "response_field": "answer"}]},
    }


def test_target_component_builds_rows(user_module):
    config = load_config(config_with_source({"_target_": "my_components.make_rows", "count": 3, "prefix": "x"}))
    rows = read_rows(config.data.datasets[0], "data.datasets.0")
    assert [row.fields["question"] for row in rows] == ["x0", "x1", "x2"]
    assert rows[2].origin == "my_components.make_rows row 2"


def test_missing_module_fails_at_load_time_naming_key(user_module):
    with pytest.raises(ConfigError) as info:
        load_config(config_with_source({"_target_": "not_a_module.make_rows"}))
    assert "data.datasets.0.source._target_" in str(info.value)
    assert "not_a_module" in str(info.value)


def test_missing_attribute_is_named(user_module):
    with pytest.raises(ConfigError, match="has no attribute 'make_rowz'"):
        load_config(config_with_source({"_target_": "my_components.make_rowz"}))


def test_wrong_keyword_arguments_are_reported(user_module):
    component = Component.model_validate({"_target_": "my_components.make_rows", "cnt": 3})
    with pytest.raises(ConfigError, match="does not accept these arguments"):
        instantiate(component, "data.datasets.0.source")
