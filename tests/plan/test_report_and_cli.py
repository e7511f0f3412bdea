"""`tuneforge plan` prints a plan and a verdict; runs end with report.md and a real loss plot,
and `tuneforge report` works on a run that was interrupted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from transformers import TrainerCallback

from tests.train.test_recipe import config as recipe_config
from tuneforge import train
from tuneforge.cli.main import main


def test_plan_cli_prints_json_with_a_verdict_and_fixes(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(recipe_config(tmp_path, tiny_model_dir)), encoding="utf-8")
    assert main(["plan", str(path), "--json", "--gpu-memory", "80"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["train_tokens"] > 0 and plan["estimated_seconds"] > 0
    assert plan["parameters"]["trainable"] == plan["parameters"]["total"] > 0
    # 1.5 GiB of CUDA context alone exceeds 1 GiB: not fitting, with the changes that would
    assert main(["plan", str(path), "--gpu-memory", "1", "--tokens", "1000"]) == 1
    table = capsys.readouterr().out
    assert "DOES NOT FIT" in table and "GFLOP" in table


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt  # as a user's Ctrl-C


def test_an_interrupted_run_gets_a_report_and_a_non_blank_loss_plot(tmp_path, tiny_model_dir, capsys):
    settings = recipe_config(tmp_path, tiny_model_dir, max_steps=12, logging_steps=1, save_strategy="steps", save_steps=4)
    with pytest.raises(KeyboardInterrupt):
        train(settings, callbacks=[StopAt(6)])
    run = tmp_path / "run"
    assert not (run / "summary.json").exists() and not (run / "report.md").exists()
    assert main(["report", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_step"] == 5  # step 6 stopped before its log
    assert summary["last_checkpoint"].endswith("checkpoint-4") and summary["tokens_seen"] > 0
    pixels = np.asarray(Image.open(run / "loss.png").convert("L"), dtype=float)
    assert pixels.var() > 100  # lines and axes drawn, not a blank canvas
    assert "interrupted" in (run / "report.md").read_text()


def test_a_finished_run_writes_the_report_and_logs_live_metrics(tmp_path, tiny_model_dir):
    result = train(recipe_config(tmp_path, tiny_model_dir, max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=2))
    run = result.run_dir
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and "eval_loss" in summary["eval_results"]
    assert (run / "report.md").exists() and (run / "loss.png").stat().st_size > 0
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("elapsed_seconds" in r and "tokens_per_second" in r for r in logs if "loss" in r)
    assert list((run / "runs").glob("*/events.out.tfevents.*"))  # TensorBoard, offline, by default
