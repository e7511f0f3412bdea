"""`tuneforge compare`: prompts from text or data files, answers side by side in three formats."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl
from tests.infer.test_generation import run_config
from tuneforge.cli.main import main
from tuneforge.errors import DataError
from tuneforge.infer import generate, load_for_inference
from tuneforge.infer.compare import Comparison, PromptItem, read_prompts
from tuneforge.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    return train(run_config(tmp_path_factory.mktemp("compare"), tiny_model_dir, {"name": "full"})).run_dir


def test_prompts_come_from_text_lines_or_named_fields(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("after 3\n\n  after 4  \n")
    assert read_prompts(text) == [PromptItem("after 3"), PromptItem("after 4")]
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"question": "after 3", "answer": 4}, {"question": "after 9", "answer": "10"}])
    assert read_prompts(rows, prompt_field="question", reference_field="answer") == [
        PromptItem("after 3", "4"), PromptItem("after 9", "10")
    ]
    default_fields = write_jsonl(tmp_path / "default.jsonl", [{"prompt": "p", "reference": "r"}, {"prompt": "q"}])
    assert read_prompts(default_fields) == [PromptItem("p", "r"), PromptItem("q")]
    with pytest.raises(DataError, match=r"rows.jsonl:1: missing field 'prompt'; the row has: answer, question") as info:
        read_prompts(rows)
    assert "--prompt-field" in str(info.value)
    with pytest.raises(DataError, match="missing field 'ref'"):
        read_prompts(default_fields, reference_field="ref")  # a field asked for must be there


def test_compare_base_and_tuned_side_by_side(run, tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "heldout.jsonl", [{"question": "after 30", "answer": "the number 31"},
                                                       {"question": "after 8", "answer": "the number 9"}])
    common = [str(tiny_model_dir), str(run), "--prompts", str(prompts), "--prompt-field", "question",
              "--reference-field", "answer", "--max-new-tokens", "6"]
    assert main(["compare", *common, "--output", str(tmp_path / "compare.json")]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    # The base model has no template of its own: it reads the prompts the way the run does.
    assert report["models"] == [{"name": str(tiny_model_dir), "template": "qa"}, {"name": str(run), "template": "qa"}]
    tuned = generate(load_for_inference(str(run)), ["after 30", "after 8"], max_new_tokens=6)
    assert [r["outputs"][str(run)] for r in report["results"]] == tuned  # the same answers as `generate`
    assert [r["reference"] for r in report["results"]] == ["the number 31", "the number 9"]
    assert all(set(r["outputs"]) == {str(tiny_model_dir), str(run)} for r in report["results"])

    capsys.readouterr()
    assert main(["compare", *common, "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0] == f"| prompt | {tiny_model_dir} | {run} | reference |"
    assert markdown[2].startswith("| after 30 | ") and markdown[2].endswith(f" | {tuned[0].strip()} | the number 31 |")


def test_terminal_table_wraps_long_answers_within_the_width():
    comparison = Comparison(
        models=["base", "tuned"], templates=["qa", "qa"],
        items=[PromptItem("a question | with a pipe", "reference answer")],
        outputs=[["word " * 30], ["short\nsecond line"]],
    )
    table = comparison.to_table(width=80)
    lines = table.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[1].split("|")[1:-1] == [" prompt           ", " base             ", " tuned            ", " reference        "]
    assert "second line" in table and table.count("word") == 30
    assert "a question \\| with a pipe" in comparison.to_markdown()
    assert "short<br>second line" in comparison.to_markdown()


def test_compare_needs_two_models(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    assert main(["compare", "only-one", "--prompts", str(prompts)]) == 2
    assert "at least two models" in capsys.readouterr().err
