"""Evaluate a model on data: loss and perplexity, multiple-choice accuracy, QA exact match and F1.

    loaded = load_for_inference("runs/jcqa")
    task = EvalTask(type="multiple_choice", data={"path": "valid.json", "format": "multiple_choice"})
    result = run_task(loaded, task)
    result.metrics  # {"accuracy": 0.61, "chance": 0.2, "questions": 1119}

A task is the config's `EvalTask`, so `tuneforge eval`, `Finetuner.evaluate` and the
evaluation callback during training (`train/eval_callback.py`) run the same code. Rows are read
and encoded by the data pipeline, with the run's template unless the dataset names one:

- `loss`: examples tokenised and masked as for training (`tokenize_dataset`); the loss is the
  mean negative log-likelihood over every trained token, perplexity its exponential.
- `multiple_choice`: each choice is encoded as the assistant reply to the question, as
  `format: multiple_choice` trains it (`encode_conversation`), and scored by the
  log-likelihood of its trained tokens (the choice and its end-of-turn token), summed or
  divided by its token or character count (`normalize`). The highest score is the answer.
- `qa`: the reply to each prompt is generated greedily and compared with the reference after
  normalisation (Unicode NFKC, lower case, no punctuation): exact match, and F1 over characters
  (whitespace ignored), which suits languages written without spaces such as Japanese.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from transformers import DataCollatorForSeq2Seq

from tuneforge.config.schema import EvalTask
from tuneforge.data.build import tokenize_dataset
from tuneforge.data.formats import parse_multiple_choice, row_to_messages
from tuneforge.data.sources import read_rows
from tuneforge.data.templates import (
    Template,
    encode_conversation,
    encode_generation_prompt,
    resolve_template,
)
from tuneforge.data.tokenize import IGNORE_INDEX, Example
from tuneforge.errors import ConfigError
from tuneforge.infer.generate import LoadedModel
from tuneforge.models.generation import generate_texts


@dataclass
class TaskResult:
    """A task's metrics and, per row, what the model answered (for the JSON report)."""

    name: str
    type: str
    data: str
    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "data": self.data, "metrics": self.metrics, "examples": self.examples}


def task_template(loaded: LoadedModel, task: EvalTask) -> Template:
    """The run's template (data formatted as in training), unless the dataset names its own."""
    if task.data.template == "auto" and loaded.template is not None:
        return loaded.template
    return resolve_template(task.data.template, loaded.tokenizer)


@torch.no_grad()
def score_examples(loaded: LoadedModel, examples: list[Example], batch_size: int) -> list[tuple[float, int]]:
    """Per example: the summed log-probability of its trained tokens, and how many there are.

    Batches are padded by the training collator, so padding is masked as in training.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[start : start + batch_size]])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        # Position i predicts token i + 1.
        labels = batch["labels"][:, 1:].to(device)
        mask = labels != IGNORE_INDEX
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        scores += [(float(total), int(count)) for total, count in zip(picked.sum(-1), mask.sum(-1))]
    model.train(was_training)
    return scores


def evaluate_loss(loaded: LoadedModel, task: EvalTask) -> TaskResult:
    examples, stats = tokenize_dataset(
        task.data, loaded.tokenizer, task_template(loaded, task), task.max_length, f"eval task {task.key}"
    )
    scores = score_examples(loaded, examples, task.batch_size)
    total = sum(score for score, _ in scores)
    tokens = sum(count for _, count in scores)
    loss = -total / tokens
    # exp overflows a float past ~709: an untrained model's perplexity is still reported, as huge.
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "examples": stats.examples}
    return TaskResult(task.key, task.type, task.data.name, metrics)


def normalized_score(log_likelihood: float, tokens: int, text: str, normalize: str) -> float:
    """A choice's score: summed log-likelihood, or per token, or per character of its text."""
    if normalize == "tokens":
        return log_likelihood / tokens
    if normalize == "chars":
        return log_likelihood / max(len(text), 1)
    return log_likelihood


def evaluate_multiple_choice(loaded: LoadedModel, task: EvalTask) -> TaskResult:
    template = task_template(loaded, task)
    items, encoded = [], []
    for row in read_rows(task.data, f"eval task {task.key}"):
        item = parse_multiple_choice(row, task.data)
        prompt = row_to_messages(row, task.data)[:-1]  # system and question, as trained
        for choice in item.choices:
            reply = [*prompt, {"role": "assistant", "content": choice}]
            input_ids, labels = encode_conversation(loaded.tokenizer, template, reply, origin=row.origin)
            encoded.append(Example(input_ids, labels))
        items.append(item)
    scores = iter(score_examples(loaded, encoded, task.batch_size))
    examples, correct = [], 0
    for item in items:
        choice_scores = [normalized_score(*next(scores), choice, task.normalize) for choice in item.choices]
        prediction = max(range(len(choice_scores)), key=choice_scores.__getitem__)
        correct += prediction == item.label
        examples.append({"question": item.question, "choices": item.choices, "label": item.label,
                         "prediction": prediction, "scores": choice_scores})
    metrics = {
        "accuracy": correct / len(items),
        "chance": sum(1 / len(item.choices) for item in items) / len(items),
        "questions": len(items),
    }
    return TaskResult(task.key, task.type, task.data.name, metrics, examples)


def normalize_answer(text: str) -> str:
    """NFKC (full-width forms fold to ASCII), lower case, punctuation removed, spaces collapsed."""
    folded = unicodedata.normalize("NFKC", text).lower()
    kept = "".join(char for char in folded if not unicodedata.category(char).startswith("P"))
    return " ".join(kept.split())


def char_f1(prediction: str, reference: str) -> float:
    """F1 over the characters (as a multiset) of the normalised answers, spaces ignored."""
    predicted = Counter(normalize_answer(prediction).replace(" ", ""))
    expected = Counter(normalize_answer(reference).replace(" ", ""))
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((predicted & expected).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(predicted.values()), common / sum(expected.values())
    return 2 * precision * recall / (precision + recall)


def evaluate_qa(loaded: LoadedModel, task: EvalTask) -> TaskResult:
    template = task_template(loaded, task)
    prompts, references = [], []
    for row in read_rows(task.data, f"eval task {task.key}"):
        messages = row_to_messages(row, task.data)
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        prompts.append(messages[:last])
        references.append(messages[last]["content"])
    outputs = generate_texts(
        loaded.model, loaded.tokenizer,
        [encode_generation_prompt(loaded.tokenizer, template, prompt) for prompt in prompts],
        max_new_tokens=task.max_new_tokens, stop_token_ids=template.stop_token_ids(loaded.tokenizer),
        batch_size=task.batch_size,
    )
    examples = [
        {"prompt": prompt[-1]["content"], "reference": reference, "output": output,
         "exact_match": normalize_answer(output) == normalize_answer(reference), "f1": char_f1(output, reference)}
        for prompt, reference, output in zip(prompts, references, outputs)
    ]
    metrics = {
        "exact_match": sum(e["exact_match"] for e in examples) / len(examples),
        "f1": sum(e["f1"] for e in examples) / len(examples),
        "questions": len(examples),
    }
    return TaskResult(task.key, task.type, task.data.name, metrics, examples)


def eval_task(type: str, data: dict[str, Any], *, where: str, **settings: Any) -> EvalTask:
    """An `EvalTask` from keywords (command line, Python API), validated as a config entry is.

    A multiple-choice task reads `format: multiple_choice` data unless `data` says otherwise.

    Raises:
        ConfigError: Naming each invalid key, at `where`.
    """
    if type == "multiple_choice":
        data = {"format": "multiple_choice", **data}
    try:
        return EvalTask(type=type, data=data, **settings)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise ConfigError(problems, where=where, hint="docs/configuration.md lists the eval.tasks keys") from None


RUNNERS = {"loss": evaluate_loss, "multiple_choice": evaluate_multiple_choice, "qa": evaluate_qa}


def run_task(loaded: LoadedModel, task: EvalTask) -> TaskResult:
    """Run one evaluation task on a loaded model."""
    return RUNNERS[task.type](loaded, task)


def format_results(results: list[TaskResult]) -> str:
    """A plain-text table: one line per metric; multiple-choice accuracy shown against chance."""
    lines = [f"{'task':<20} {'metric':<12} {'value':>10}"]
    for result in results:
        for index, (metric, value) in enumerate(result.metrics.items()):
            shown = f"{value:>10.4f}" if isinstance(value, float) else f"{value:>10}"
            lines.append(f"{result.name if index == 0 else '':<20} {metric:<12} {shown}")
        if "chance" in result.metrics:
            ratio = result.metrics["accuracy"] / result.metrics["chance"]
            lines.append(f"{'':<20} {'':<12} {'':>10}  accuracy {ratio:.2f}x chance level")
    return "\n".join(lines) + "\n"


__all__ = [
    "TaskResult",
    "char_f1",
    "eval_task",
    "format_results",
    "normalize_answer",
    "run_task",
    "score_examples",
    "task_template",
]
