"""Shared fixtures: a tokenizer trained here and tiny models saved through the real HF paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneforge.train import family_matrix

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

CORPUS = [
    "### Question:\nWhat is the capital of France?\n\n### Answer:\nParis",
    "Below is an instruction that describes a task. Write a response.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "日本の首都はどこですか？ 東京です。富士山は日本で一番高い山です。",
    "深圳报告首例肺炎确诊病例，另有8例在隔离观察和治疗中。",
    "Lamini is a library for fine-tuning language models on your own data.",
]


def build_tokenizer(directory: Path, vocab_size: int = 600) -> Path:
    return family_matrix.build_tokenizer(directory, vocab_size, corpus=CORPUS)


def build_tiny_llama(directory: Path, tokenizer_dir: Path, **overrides) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(autouse=True, scope="session")
def isolated_data_cache(tmp_path_factory):
    """Tests never read or fill the user's tokenised-data cache."""
    import os

    os.environ["TUNEFORGE_CACHE"] = str(tmp_path_factory.mktemp("tuneforge-cache"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def successor_rows(count: int, start: int = 0) -> list[dict]:
    """A learnable rule: the answer is the number after the question's number."""
    return [{"question": f"after {n}", "answer": str(n + 1)} for n in range(start, start + count)]


@pytest.fixture
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"needs the shared data folder at {SHARED} (absent in a bare clone)")
    return SHARED


@pytest.fixture
def liger_patches_undone():
    """Liger patches `modeling_llama`'s functions and classes, not only the model it is given: put
    them back, so later tests in the process build plain Llama models."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name, value in saved.items():
        setattr(modeling_llama, name, value)
