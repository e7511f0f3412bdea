"""Docs, examples and CI stay in sync with the code."""

import re
from pathlib import Path
from typing import get_args

import pytest
import yaml

from tuneforge.config import load_config
from tuneforge.config.reference import SECTIONS, render_reference
from tuneforge.config.schema import Config
from tuneforge.config.section import Section

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current():
    current = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert current == render_reference(), "regenerate: python -m tuneforge.config.reference > docs/configuration.md"


def _section_classes(annotation, found: set) -> set:
    if isinstance(annotation, type) and issubclass(annotation, Section):
        if annotation not in found and annotation.__name__ != "TrainSection":
            found.add(annotation)
            for field in annotation.model_fields.values():
                _section_classes(field.annotation, found)
        return found
    for arg in get_args(annotation):
        _section_classes(arg, found)
    return found


def test_every_section_is_documented():
    documented = {model for _, model, _ in SECTIONS}
    reachable = _section_classes(Config, set()) - {Config}
    assert len(reachable) >= 8
    assert not reachable - documented


def test_every_example_config_validates_and_says_how_to_run_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    examples = sorted((ROOT / "examples").glob("**/*.yaml"))
    assert examples
    for path in examples:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("#"), f"{path} must open with a comment"
        relative = path.relative_to(ROOT)
        assert f"tuneforge train {relative}" in path.read_text(encoding="utf-8")
        load_config(path)


def _yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_config_snippets_in_docs_validate(doc, tmp_path, monkeypatch):
    path = ROOT / doc if doc == "README.md" else ROOT / "docs" / doc
    # The guide's custom-loader example names my_data.load_rows: provide it.
    (tmp_path / "my_data.py").write_text("def load_rows(split):\n    return [{'question': 'q', 'answer': 'a'}]\n")
    monkeypatch.chdir(tmp_path)
    for block in _yaml_blocks(path):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "model" in data and "data" in data:
            load_config(data)


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    install = ci[ci.index("# README install:") + 1]
    test = ci[ci.index("# README test:") + 1]
    assert install in readme and test in readme
