"""Answers of several models to the same prompts, side by side, with the reference answers.

    items = read_prompts("heldout.jsonl", prompt_field="question", reference_field="answer")
    comparison = compare_models(["EleutherAI/pythia-70m", "runs/pythia-lamini"], items)
    print(comparison.to_table())      # or to_markdown(), to_json()

Every model formats the prompts with its own run's template. A model without one (the base
model of a run, usually) gets the template of the first run in the list, so base and tuned
model read the same prompt text: the comparison is about the weights, not the formatting.
"""

from __future__ import annotations

import gc
import json
import shutil
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.sources import SUPPORTED_SUFFIXES, read_file, resolve_files
from tuneforge.data.templates import template_from_metadata
from tuneforge.errors import DataError
from tuneforge.infer.generate import generate, load_for_inference
from tuneforge.infer.merge import model_dir_of
from tuneforge.train.run_dir import read_run_metadata


@dataclass(frozen=True)
class PromptItem:
    """A prompt and, when the file gives one, the reference answer."""

    prompt: str
    reference: str | None = None


def _text(value: Any, field: str, origin: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"field '{field}' is a {type(value).__name__}, expected text", where=origin)


def _data_prompts(file: Path, prompt_field: str, reference_field: str | None) -> list[PromptItem]:
    items = []
    for row in read_file(file):
        for field, setting in ((prompt_field, "--prompt-field"), (reference_field, "--reference-field")):
            if field is not None and field not in row.fields:
                raise DataError(
                    f"missing field '{field}'; the row has: {', '.join(sorted(row.fields)) or '(none)'}",
                    where=row.origin,
                    hint=f"name the field with {setting} (library: {setting[2:].replace('-', '_')}=...)",
                )
        reference_name = reference_field or "reference"
        reference = row.fields.get(reference_name)
        items.append(PromptItem(
            _text(row.fields[prompt_field], prompt_field, row.origin),
            None if reference is None else _text(reference, reference_name, row.origin),
        ))
    return items


def read_prompts(path: str | Path, *, prompt_field: str = "prompt", reference_field: str | None = None) -> list[PromptItem]:
    """Prompts from data files (JSON, JSON lines, CSV, Parquet) or text files (one a line).

    Args:
        path: A file, a directory or a glob, as for training data.
        prompt_field: Data files: the field holding the prompt.
        reference_field: Data files: the field holding the reference answer; when None, a
            `reference` field is used where a row has one.

    Raises:
        DataError: No such file, no prompt in it, or a row without `prompt_field` (or without
            the `reference_field` asked for).
    """
    items: list[PromptItem] = []
    for file in resolve_files(str(path)):
        if file.suffix in SUPPORTED_SUFFIXES:
            items += _data_prompts(file, prompt_field, reference_field)
        else:
            items += [PromptItem(line.strip()) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise DataError("no prompts in the file", where=str(path))
    return items


@dataclass
class Comparison:
    """`outputs[m][i]` is model `m`'s answer to `items[i]`; `templates[m]` how it was prompted."""

    models: list[str]
    templates: list[str]
    items: list[PromptItem]
    outputs: list[list[str]]

    @property
    def has_references(self) -> bool:
        return any(item.reference is not None for item in self.items)

    def _columns(self) -> list[str]:
        return ["prompt", *self.models, *(["reference"] if self.has_references else [])]

    def _cells(self) -> list[list[str]]:
        rows = []
        for index, item in enumerate(self.items):
            answers = [outputs[index].strip() for outputs in self.outputs]
            reference = [item.reference or ""] if self.has_references else []
            rows.append([item.prompt.strip(), *answers, *reference])
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [{"name": name, "template": template} for name, template in zip(self.models, self.templates)],
            "results": [
                {
                    "prompt": item.prompt,
                    "reference": item.reference,
                    "outputs": {name: outputs[index] for name, outputs in zip(self.models, self.outputs)},
                }
                for index, item in enumerate(self.items)
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", "<br>")

        columns = self._columns()
        lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self._cells()]
        return "\n".join(lines) + "\n"

    def to_table(self, width: int | None = None) -> str:
        """A terminal table as wide as the terminal (80 columns when not on one)."""
        columns = self._columns()
        width = width or shutil.get_terminal_size().columns
        column_width = max(12, (width - 1) // len(columns) - 3)

        def wrap(text: str) -> list[str]:
            return [piece for line in text.splitlines() or [""] for piece in textwrap.wrap(line, column_width) or [""]]

        rule = "+" + "+".join("-" * (column_width + 2) for _ in columns) + "+"
        lines = [rule]
        for row in [columns, *self._cells()]:
            wrapped = [wrap(text) for text in row]
            for depth in range(max(len(w) for w in wrapped)):
                parts = [(w[depth] if depth < len(w) else "").ljust(column_width) for w in wrapped]
                lines.append("| " + " | ".join(parts) + " |")
            lines.append(rule)
        return "\n".join(lines) + "\n"

    def render(self, fmt: str) -> str:
        return {"table": self.to_table, "markdown": self.to_markdown, "json": self.to_json}[fmt]()


def _first_run_template(models: list[str]) -> dict[str, Any] | None:
    """The template record of the first run among `models` (read from disk, nothing loaded)."""
    for source in models:
        directory = model_dir_of(source)
        record = read_run_metadata(directory).get("template") if directory is not None else None
        if record:
            return record
    return None


def _labels(models: list[str]) -> list[str]:
    """Column names: the sources as given, numbered when one is given twice."""
    labels: list[str] = []
    for source in models:
        labels.append(source if source not in labels else f"{source} #{labels.count(source) + 1}")
    return labels


def compare_models(
    models: list[str],
    items: list[PromptItem],
    *,
    raw: bool = False,
    system_prompt: str | None = None,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    **options: Any,
) -> Comparison:
    """Generate every prompt with every model, one model in memory at a time.

    `options` are generation options (`max_new_tokens`, `temperature`, ...).
    """
    shared = _first_run_template(models)
    templates, outputs = [], []
    for source in models:
        loaded = load_for_inference(source, trust_remote_code=trust_remote_code)
        if loaded.template is None and shared is not None:
            loaded = replace(loaded, template=template_from_metadata(shared))
        templates.append("raw" if raw or loaded.template is None else loaded.template.name)
        prompts = [item.prompt for item in items]
        outputs.append(generate(loaded, prompts, raw=raw, system_prompt=system_prompt, batch_size=batch_size, **options))
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return Comparison(_labels(models), templates, items, outputs)


__all__ = ["Comparison", "PromptItem", "compare_models", "read_prompts"]
