"""`tuneforge.Finetuner`: the three-line API builds a config and runs the CLI's code paths."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoModelForCausalLM

import tuneforge
from tests.conftest import write_jsonl
from tuneforge import Finetuner
from tuneforge.cli.main import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.infer import generate, load_for_inference

FAST = {"learning_rate": 3e-3, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True}


def test_keywords_go_to_the_section_that_defines_them(tmp_path):
    ft = Finetuner("some/model", method="lora", init="random", max_length=64, eval_split=0.2, overwrite=True,
                   max_steps=7, learning_rate=1e-4, output_dir=tmp_path / "run")
    ft.load_data_from_jsonlines("qa.jsonl", input_key="q", output_key="a", max_rows=10)
    assert ft.config == {
        "model": {"path": "some/model", "init": "random"},
        "data": {"datasets": [{"path": "qa.jsonl", "prompt_fields": ["q"], "response_field": "a", "max_rows": 10}],
                 "eval_split": 0.2, "max_length": 64},
        "method": {"name": "lora"},
        "train": {"max_steps": 7, "learning_rate": 1e-4},
        "output": {"dir": str(tmp_path / "run"), "overwrite": True},
    }
    config = load_config(ft.config)  # the CLI's validation accepts it as it is
    assert config.method.name == "lora" and config.train.max_steps == 7


def test_mistakes_fail_as_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="call load_data_from_jsonlines"):
        Finetuner("m").train()
    ft = Finetuner("m", learnig_rate=1e-4, output_dir=tmp_path / "run")
    ft.load_data_from_jsonlines("qa.jsonl")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        ft.train()
    with pytest.raises(ConfigError, match="nothing trained yet"):
        ft.save(tmp_path / "out")
    with pytest.raises(ConfigError, match="not a finished tuneforge run"):
        Finetuner.from_run(tmp_path)


@pytest.fixture(scope="module")
def lamini_subset(tmp_path_factory):
    """The first 96 Lamini rows to train on, and 4 later ones held out for compare."""
    from tests.conftest import SHARED

    source = SHARED / "data" / "lamini_docs" / "lamini_docs.jsonl"
    if not source.is_file():
        pytest.skip(f"needs the shared data folder at {SHARED} (absent in a bare clone)")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:100]]
    root = tmp_path_factory.mktemp("lamini")
    return source, write_jsonl(root / "heldout.jsonl", rows[96:])


def test_three_line_api_on_lamini_docs_lowers_eval_loss_and_compares(lamini_subset, tiny_model_dir, tmp_path, capsys):
    source, heldout = lamini_subset
    # The three lines, with the size of the demo run set through keywords.
    ft = Finetuner(str(tiny_model_dir), output_dir=tmp_path / "run", max_length=128, max_steps=40, **FAST)
    ft.load_data_from_jsonlines(source, input_key="question", output_key="answer", template="plain", max_rows=96)
    result = ft.train()
    assert result.eval_loss_after < 0.8 * result.eval_loss_before, (result.eval_loss_before, result.eval_loss_after)

    # Held-out rows: the tuned model's loss is lower than the base model's.
    spec = {"prompt_fields": ["question"], "response_field": "answer", "template": "plain", "max_length": 128}
    tuned_loss = ft.evaluate(heldout, **spec).metrics["loss"]
    base_loss = Finetuner(str(tiny_model_dir)).evaluate(heldout, **spec).metrics["loss"]
    assert tuned_loss < base_loss

    question = json.loads(heldout.read_text().splitlines()[0])["question"]
    answer = ft.generate(question, max_new_tokens=12)
    assert answer == generate(load_for_inference(str(result.run_dir)), [question], max_new_tokens=12)[0].strip()

    capsys.readouterr()
    code = main(["compare", str(tiny_model_dir), str(result.run_dir), "--prompts", str(heldout), "--prompt-field", "question",
                 "--reference-field", "answer", "--format", "json", "--max-new-tokens", "12"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [model["name"] for model in report["models"]] == [str(tiny_model_dir), str(result.run_dir)]
    assert len(report["results"]) == 4 and all(row["reference"] for row in report["results"])
    for row in report["results"]:
        assert set(row["outputs"]) == {str(tiny_model_dir), str(result.run_dir)}
    assert report["results"][0]["outputs"][str(result.run_dir)].strip() == answer


def test_from_run_and_save_use_the_finished_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"question": f"after {n}", "answer": f"the number {n + 1}"} for n in range(40)])
    ft = Finetuner(str(tiny_model_dir), method="lora", output_dir=tmp_path / "run", max_length=32, max_steps=30, **FAST)
    ft.load_data_from_jsonlines(data)
    ft.train()
    again = Finetuner.from_run(tmp_path / "run")
    assert again.config["method"]["name"] == "lora" and again.run_dir == tmp_path / "run"
    prompts = ["after 3", "after 17"]
    assert again.generate(prompts, max_new_tokens=6) == ft.generate(prompts, max_new_tokens=6)
    out = again.save(tmp_path / "export", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(str(out))  # the adapter merged into a plain checkpoint
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert Finetuner.from_run(tmp_path / "run").generate("after 3", max_new_tokens=6) == generate(
        load_for_inference(str(out)), ["after 3"], max_new_tokens=6)[0].strip()


def test_finetuner_is_exported_lazily():
    assert tuneforge.Finetuner is Finetuner
    assert "Finetuner" in tuneforge.__all__
    with pytest.raises(AttributeError):
        tuneforge.NoSuchThing  # noqa: B018
    assert re.match(r"\d+\.\d+", tuneforge.__version__)
