"""`Finetuner`: fine-tune, generate and evaluate in a few lines of Python.

    from tuneforge import Finetuner
    ft = Finetuner("EleutherAI/pythia-70m")
    ft.load_data_from_jsonlines("docs.jsonl", input_key="question", output_key="answer")
    ft.train()
    print(ft.generate("How do I ..."))

It only writes a config: every call builds the same dict a YAML file holds and runs the same
`tuneforge.train`, `load_for_inference`, `run_task` and `export_model` as the CLI
(`ft.config` shows it; `tuneforge train` on it, saved as YAML, does the same run).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config.schema import DataConfig, DatasetSpec, ModelConfig, OutputConfig
from tuneforge.errors import ConfigError

DEFAULT_EVAL_SPLIT = 0.1


class Finetuner:
    """A config under construction, the run it trains, and the model it loads.

    Args:
        model: Hub id or directory of the model to fine-tune (`model.path`).
        method: `full`, `freeze` or `lora`, or a `method` section as a dict.
        output_dir: The run directory (`output.dir`); default `runs/finetuner`.
        overrides: `section.key=value` strings, as on the command line.
        settings: Any other key of the `model`, `data` or `output` section (`init`,
            `max_length`, `eval_split`, `overwrite`, ...), else a `train` key
            (`TrainingArguments`: `max_steps`, `learning_rate`, ...).

    `eval_split` defaults to 0.1, so training reports the eval loss before and after.
    """

    def __init__(
        self,
        model: str,
        *,
        method: str | dict[str, Any] = "full",
        output_dir: str | Path = "runs/finetuner",
        overrides: list[str] | None = None,
        **settings: Any,
    ) -> None:
        self.config: dict[str, Any] = {
            "model": {"path": str(model)},
            "data": {"datasets": [], "eval_split": DEFAULT_EVAL_SPLIT},
            "method": {"name": method} if isinstance(method, str) else dict(method),
            "train": {},
            "output": {"dir": str(output_dir)},
        }
        # Route each keyword to the section that defines it; TrainingArguments takes the rest
        # (and validates them when the config loads, with a suggestion for typos).
        for key, value in settings.items():
            section = next(
                (name for name, schema in (("model", ModelConfig), ("data", DataConfig), ("output", OutputConfig))
                 if key in schema.model_fields),
                "train",
            )
            self.config[section][key] = value
        self.overrides = list(overrides or [])
        self.run_dir: Path | None = None
        self._loaded: Any = None

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Finetuner:
        """A Finetuner for a finished run: its saved config, generating with its model."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not (run_dir / "model").is_dir() or not config_path.is_file():
            raise ConfigError(
                "not a finished tuneforge run (expected config.yaml and model/)",
                where=str(run_dir),
                hint="give the output.dir of a run that completed",
            )
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        finetuner = cls(config["model"]["path"])
        finetuner.config, finetuner.run_dir = config, run_dir
        return finetuner

    def load_data(self, path: str | Path, **spec: Any) -> Finetuner:
        """Add a training dataset: any `data.datasets` entry keys (`format`, `template`, `max_rows`, ...)."""
        self.config["data"]["datasets"].append({"path": str(path), **spec})
        return self

    def load_data_from_jsonlines(
        self, path: str | Path, input_key: str = "question", output_key: str = "answer", **spec: Any
    ) -> Finetuner:
        """Add question/answer rows: the prompt is `input_key`, the trained response `output_key`."""
        return self.load_data(path, prompt_fields=[input_key], response_field=output_key, **spec)

    def train(self, **settings: Any) -> Any:
        """Run `tuneforge.train` on the config (`settings`: more `train` keys); returns its `RunResult`."""
        from tuneforge import train

        if not self.config["data"]["datasets"]:
            raise ConfigError("no training data", where="Finetuner", hint="call load_data_from_jsonlines(...) first")
        self.config["train"].update(settings)
        result = train(copy.deepcopy(self.config), overrides=self.overrides)
        self.run_dir, self._loaded = result.run_dir, None
        return result

    @property
    def model_source(self) -> str:
        """What generation and evaluation use: the trained run, or the model before training."""
        return str(self.run_dir) if self.run_dir is not None else self.config["model"]["path"]

    def _model(self) -> Any:
        from tuneforge.infer.generate import load_for_inference

        if self._loaded is None:
            trust = bool(self.config["model"].get("trust_remote_code", False))
            self._loaded = load_for_inference(self.model_source, trust_remote_code=trust)
        return self._loaded

    def generate(self, prompt: str | list[str], **options: Any) -> str | list[str]:
        """Answer one prompt (a string) or several (a list), formatted as in training.

        `options`: `max_new_tokens`, `temperature`, `top_p`, `top_k`, `repetition_penalty`,
        `batch_size`, `system_prompt`, `raw`.
        """
        from tuneforge.infer.generate import generate

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        outputs = [text.strip() for text in generate(self._model(), prompts, **options)]
        return outputs[0] if isinstance(prompt, str) else outputs

    def evaluate(self, data: str | Path | None = None, *, type: str = "loss", **settings: Any) -> Any:
        """Run one evaluation task (an `eval.tasks` entry) on the model; returns its `TaskResult`.

        Args:
            data: A data path; default: the first dataset loaded (all its rows, training rows
                included), with its settings.
            type: `loss`, `multiple_choice` or `qa`.
            settings: Dataset keys (`prompt_fields`, `response_field`, `format`, `max_rows`,
                ...) and task keys (`normalize`, `max_new_tokens`, `max_length`, `batch_size`).
        """
        from tuneforge.infer.evaluate import eval_task, run_task

        if data is None:
            if not self.config["data"]["datasets"]:
                raise ConfigError("no data to evaluate on", where="Finetuner.evaluate", hint="pass data=...")
            spec = dict(self.config["data"]["datasets"][0])
        else:
            spec = {"path": str(data)}
        spec.update({key: value for key, value in settings.items() if key in DatasetSpec.model_fields})
        task = {key: value for key, value in settings.items() if key not in DatasetSpec.model_fields}
        return run_task(self._model(), eval_task(type, spec, where="Finetuner.evaluate", **task))

    def save(self, directory: str | Path, **options: Any) -> Path:
        """Write the trained model as a standalone checkpoint (`tuneforge export`; adapters merged)."""
        from tuneforge.infer.export import export_model

        if self.run_dir is None:
            raise ConfigError("nothing trained yet", where="Finetuner.save", hint="call train() first")
        return export_model(self.run_dir, directory, **options)


__all__ = ["Finetuner"]
