import json
import re

import pytest
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import successor_rows, write_jsonl
from tuneforge.errors import ConfigError
from tuneforge.infer import generate, load_for_inference
from tuneforge.train import train


def config(tmp_path, model_dir, rows=80, **train_args) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(rows))
    settings = {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "save_strategy": "no", "use_cpu": True}
    settings.update(train_args)
    return {
        "model": {"path": str(model_dir)},
        "data": {
            "datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}],
            "eval_split": 0.2,
            "max_length": 32,
        },
        "train": settings,
        "output": {"dir": str(tmp_path / "run")},
    }


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_full_finetuning_lowers_eval_loss_and_writes_the_run(tmp_path, tiny_model_dir):
    result = train(config(tmp_path, tiny_model_dir, max_steps=60, logging_steps=10))
    assert result.eval_loss_after < 0.5 * result.eval_loss_before
    run = result.run_dir
    assert (run / "config.yaml").exists() and (run / "model" / "model.safetensors").exists()
    assert (run / "model" / "tokenizer.json").exists()
    metrics = read_metrics(run)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(m["tokens_per_second"] > 0 for m in metrics if "loss" in m)
    assert result.tokens_seen > 0
    # The saved run generates with the training template and reloads through plain HF.
    loaded = load_for_inference(str(run))
    assert loaded.template is not None and loaded.template.name == "qa"
    assert isinstance(generate(loaded, ["after 3"], max_new_tokens=4)[0], str)
    AutoModelForCausalLM.from_pretrained(str(run / "model"))


def test_overfit_model_stops_at_the_trained_terminator_even_when_pad_is_eos(tmp_path, tiny_model_dir):
    """PITFALLS 1: the tokenizer pads with EOS, yet EOS stays supervised and generation stops."""
    data = write_jsonl(tmp_path / "one.jsonl", [{"question": "what stops?", "answer": "this answer does"}] * 8)
    settings = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}]},
        "train": {"max_steps": 80, "learning_rate": 1e-2, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True},
        "output": {"dir": str(tmp_path / "run")},
    }
    train(settings)
    loaded = load_for_inference(str(tmp_path / "run"))
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id
    (answer,) = generate(loaded, ["what stops?"], max_new_tokens=30)
    assert answer == "this answer does"  # nothing generated after the terminator


def test_packed_training_learns_and_reports_packing(tmp_path, tiny_model_dir, capsys):
    settings = config(tmp_path, tiny_model_dir, max_steps=40, logging_steps=10, per_device_train_batch_size=2)
    settings["data"]["packing"] = True
    result = train(settings)
    out = capsys.readouterr().out
    assert "packed batches use attention implementation 'sdpa'" in out
    assert re.search(r"packing: 64 examples -> \d+ rows of <= 32 tokens", out)
    assert result.eval_loss_after < 0.6 * result.eval_loss_before
    assert result.tokens_seen > 0


def test_generation_uses_the_system_prompt_the_run_trained_with(tmp_path, tiny_model_dir):
    from tuneforge.infer import encode_for_model

    settings = config(tmp_path, tiny_model_dir, max_steps=1)
    settings["data"]["datasets"][0].update(system_prompt="Count on.", template="qa")
    train(settings)
    loaded = load_for_inference(str(tmp_path / "run"))
    with_system = loaded.tokenizer.decode(encode_for_model(loaded, "after 3"))
    assert with_system.startswith("<s>Count on.") and "after 3" in with_system
    replaced = loaded.tokenizer.decode(encode_for_model(loaded, "after 3", system_prompt="Other."))
    assert replaced.startswith("<s>Other.")


class CrashAt(TrainerCallback):
    """Simulates a crash after the given step (after that step's checkpoint, if any)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_auto_continues_at_the_right_step_with_the_same_losses(tmp_path, tiny_model_dir):
    straight = train(config(tmp_path / "a", tiny_model_dir, max_steps=6, logging_steps=1))
    uninterrupted = [m["loss"] for m in read_metrics(straight.run_dir) if "loss" in m]

    settings = config(tmp_path / "b", tiny_model_dir, max_steps=6, logging_steps=1, save_strategy="steps", save_steps=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(settings, callbacks=[CrashAt(5)])
    with pytest.raises(ConfigError, match="already holds files"):
        train(settings)  # resume: never is the default: no silent restart
    resumed = train(settings, overrides=["output.resume=auto"])
    assert resumed.resumed_from.endswith("checkpoint-4")
    assert resumed.global_step == 6
    metrics = read_metrics(resumed.run_dir)
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # the crashed step-5 log line is not kept twice
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses == pytest.approx(uninterrupted, rel=1e-5)


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, tiny_model_dir):
    settings = config(tmp_path, tiny_model_dir, max_steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a tuneforge run"):
        train(settings, overrides=["output.overwrite=true"])
    assert (tmp_path / "run" / "precious.txt").exists()


def test_invalid_training_argument_combination_is_a_config_error(tmp_path, tiny_model_dir):
    settings = config(tmp_path, tiny_model_dir, max_steps=1, load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch")
    with pytest.raises(ConfigError) as info:
        train(settings)
    assert "train" in str(info.value)


def test_run_that_cannot_fit_on_disk_fails_before_training(tmp_path, tiny_model_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"checkpoints and the final model, but only 0\.0 GiB is free"):
        train(config(tmp_path, tiny_model_dir, max_steps=2, save_strategy="steps", save_steps=1))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_an_output_directory_that_cannot_be_written_fails_before_anything_loads(tmp_path, tiny_model_dir):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write to the run directory") as error:
        train(config(tmp_path, tiny_model_dir, max_steps=1), overrides=[f"output.dir={tmp_path / 'a_file' / 'run'}"])
    assert "output.dir=" in str(error.value)


def test_resuming_on_changed_data_is_refused_unless_allowed(tmp_path, tiny_model_dir):
    settings = config(tmp_path, tiny_model_dir, max_steps=2, save_strategy="steps", save_steps=2)
    train(settings)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    from tuneforge.train.checkpoints import read_manifest

    assert len(read_manifest(checkpoint)["data_fingerprint"]) == 24
    data = tmp_path / "train.jsonl"
    data.write_text(data.read_text() + '{"question": "after 999", "answer": "1000"}\n')
    longer = {**settings, "train": {**settings["train"], "max_steps": 4}}
    with pytest.raises(ConfigError, match="the training data changed since checkpoint-2 was written") as error:
        train(longer, overrides=["output.resume=auto"])
    assert "output.resume_on_changed_data=true" in str(error.value)
    result = train(longer, overrides=["output.resume=auto", "output.resume_on_changed_data=true"])
    assert result.resumed_from == str(checkpoint) and result.global_step == 4


def test_one_process_on_several_gpus_trains_on_the_first_without_data_parallel(tmp_path, capsys):
    """On a 2-GPU machine without a launcher the Trainer would wrap the model in DataParallel
    (n_gpu > 1), which broke tuneforge's forward ("index is on cuda:1"). Simulated here by
    setting what the Trainer read from `torch.cuda.device_count()`."""
    import transformers

    from tuneforge.train.recipe import one_gpu_per_process

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    _ = args.device
    args._n_gpu = 2
    assert one_gpu_per_process(args).n_gpu == 1
    out = capsys.readouterr().out
    assert "2 GPUs visible to one process" in out and "--nproc-per-node 2" in out
    # One GPU (or none): nothing changes and nothing is said.
    args._n_gpu = 1
    assert one_gpu_per_process(args).n_gpu == 1
    assert capsys.readouterr().out == ""


def test_batches_go_to_the_device_without_waiting_for_it(tmp_path, tiny_model_dir):
    """A blocking copy of a pinned batch to the GPU waits for every kernel queued before it, so the
    recipe asks accelerate for non-blocking copies; a user's own `accelerator_config` still wins."""
    from tuneforge.config.loading import load_config
    from tuneforge.train.recipe import _build_training_arguments

    args = _build_training_arguments(load_config(config(tmp_path / "a", tiny_model_dir)), tmp_path / "a" / "run")
    assert args.accelerator_config.non_blocking is True
    mine = config(tmp_path / "b", tiny_model_dir, accelerator_config={"non_blocking": False})
    assert _build_training_arguments(load_config(mine), tmp_path / "b" / "run").accelerator_config.non_blocking is False
