import re
from pathlib import Path

from tuneforge.cli.main import main
from tuneforge.data.preview import (
    MASK_CLOSE,
    MASK_OPEN,
    length_histogram,
    render_example,
)

ROOT = Path(__file__).resolve().parents[2]


def test_render_example_marks_untrained_spans(tokenizer):
    ids = tokenizer("Q: hi A: yo")["input_ids"]
    split = len(tokenizer("Q: hi A:")["input_ids"])
    labels = [-100] * split + ids[split:]
    text = render_example(tokenizer, ids, labels, color=False)
    assert text == f"{MASK_OPEN}<s>Q: hi A:{MASK_CLOSE} yo"
    colored = render_example(tokenizer, ids, labels, color=True)
    assert "\033[90m" in colored and "\033[32m yo" in colored


def test_length_histogram_counts_everything():
    lines = length_histogram([1, 2, 2, 9, 10], bins=3)
    assert sum(int(line.split()[1]) for line in lines) == 5


def test_preview_and_preprocess_on_the_quickstart(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert main(["data", "preview", "examples/quickstart.yaml", "--count", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example") == 2
    assert re.search(r"«<s>### Question:\nWrite [a-z ]+ in digits\.\n\n### Answer:\n»\d+</s>", out)
    assert "train.jsonl: 850 rows -> 850 examples" in out
    assert "length histogram" in out
    assert main(["preprocess", "examples/quickstart.yaml"]) == 0
    out = capsys.readouterr().out
    assert "already cached:" in out and "reusing tokenised data from cache" in out


def test_preview_shows_preference_pairs_and_preprocess_caches_them(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["data", "preview", "examples/dpo_lora.yaml", "--count", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- pair") == 1
    assert re.search(r"--- pair 0: prompt \d+ tokens, chosen \d+ and rejected \d+ trained\n", out)
    # The prompt is masked; both replies are trained through their end-of-turn token.
    assert "prompt:   «<s>### Question:\nExplain what a hash table is in one sentence.\n\n### Answer:\n»\n" in out
    assert "chosen:   A hash table stores key-value pairs" in out and "constant time on average.</s>\n" in out
    assert "rejected: It is a table.</s>\n" in out
    assert "examples/data/preference.jsonl: 3 rows -> 3 examples" in out
    assert main(["preprocess", "examples/dpo_lora.yaml"]) == 0
    out = capsys.readouterr().out
    assert "already cached:" in out and "reusing tokenised data from cache" in out


def test_preview_shows_grpo_prompts_with_the_columns_the_rewards_get(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["data", "preview", "examples/grpo_lora.yaml", "--count", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "--- prompt 0: 17 tokens; the completions are generated in training\n" in out
    assert "prompt: «<s>### Question:\nWrite seventy five in digits.\n\n### Answer:\n»\n" in out
    assert "for the rewards: question='Write seventy five in digits.', answer='75'\n" in out
    assert "examples/quickstart/train.jsonl: 64 rows -> 64 examples" in out
