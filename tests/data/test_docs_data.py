"""Every config in docs/data.md builds its datasets from the files in examples/data."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from tuneforge.config import load_config
from tuneforge.data import build_datasets, parse_preference, read_rows
from tuneforge.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "data.md"
EXAMPLE_DATA = ROOT / "examples" / "data"


def _configs() -> list[dict]:
    text = DOC.read_text(encoding="utf-8")
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)]
    return [b for b in blocks if isinstance(b, dict) and "model" in b and "data" in b]


def _specs(config: dict) -> list[dict]:
    return [*config["data"]["datasets"], *config["data"].get("eval_datasets", [])]


def _is_hub(config: dict) -> bool:
    return any(str(spec.get("path", "")).startswith("hf:") for spec in _specs(config))


def _is_preference(config: dict) -> bool:
    return any(spec.get("format") == "preference" for spec in _specs(config))


CONFIGS = _configs()


@pytest.fixture
def doc_loader(tmp_path, monkeypatch):
    """The guide's `my_data.py`, importable as the guide says (from the directory tuneforge runs in)."""
    code = re.search(r"```python\n(# my_data\.py\n.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert code, "docs/data.md shows my_data.py in a ```python block"
    (tmp_path / "my_data.py").write_text(code.group(1), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_data", raising=False)  # another test may have imported its own


@pytest.fixture(scope="module")
def tokenizers():
    cache = {}

    def get(model_config):
        key = model_config.model_dump_json()
        if key not in cache:
            cache[key] = load_tokenizer(model_config)
        return cache[key]

    return get


def test_the_guide_has_configs_of_every_kind():
    assert len(CONFIGS) >= 15
    formats = {spec.get("format", "instruction") for config in CONFIGS for spec in _specs(config)}
    assert formats == {"instruction", "chat", "multiple_choice", "text", "preference"}


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_doc_config_builds(index, tokenizers, doc_loader, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = CONFIGS[index]
    if _is_hub(raw):
        pytest.skip("hub dataset: needs the network")
    config = load_config(raw)
    if _is_preference(raw):
        for number, spec in enumerate(config.data.datasets):
            rows = read_rows(spec, f"data.datasets.{number}")
            pairs = [parse_preference(row, spec) for row in rows]
            assert pairs and all(pair.chosen != pair.rejected for pair in pairs)
        return
    datasets = build_datasets(config.data, tokenizers(config.model), seed=0, use_cache=False)
    if config.data.streaming:
        first = next(iter(datasets.train))
        assert 1 < len(first["input_ids"]) <= config.data.max_length
    else:
        assert len(datasets.train) > 0
        assert all(stats.trained_tokens > 0 for stats in datasets.stats)
        assert all(stats.bad_rows == 0 for stats in datasets.stats)
    if config.data.eval_datasets or config.data.eval_split:
        assert datasets.eval is not None and len(datasets.eval) > 0


def test_every_example_data_file_is_used_by_a_doc_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = sorted(p for p in EXAMPLE_DATA.iterdir() if p.is_file())
    assert files
    used: set[Path] = set()
    for config in CONFIGS:
        for spec in _specs(config):
            source = spec.get("source") or {}
            path = spec.get("path") or source.get("data_files")
            if path and not str(path).startswith("hf:"):
                used.update(p.resolve() for p in ROOT.glob(path))
    unused = [p.name for p in files if p.resolve() not in used]
    assert not unused, f"example files no docs/data.md config reads: {unused}"
