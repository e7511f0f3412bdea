"""The model-family matrix: train every family tuneforge supports through the real pipeline.

    python -m tuneforge.train.family_matrix > docs/models.md

Each family's tiny model (from `tuneforge.models.families`) is saved with `save_pretrained`,
fine-tuned for a few steps with LoRA by `tuneforge.train.train`, and checked; the support
table in docs/models.md is rendered from the results so it cannot drift.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.models.families import (
    FAMILIES,
    TINY_VOCAB_SIZE,
    ModelFamily,
    build_tiny_model,
    default_lora_target_parameters,
    default_lora_targets,
    get_family,
)

TRAIN_STEPS = 3


@dataclass(frozen=True)
class FamilyResult:
    """What the matrix found for one family: a row of docs/models.md.

    Attributes:
        family: the family.
        targets: `default_lora_targets` of its tiny model.
        target_parameters: `default_lora_target_parameters` of its tiny model.
        lora_parameters: trainable parameters of the tiny model under tuneforge's default LoRA.
        error: why training failed (or the registry's known issue); None when it trained.
    """

    family: ModelFamily
    targets: tuple[str, ...]
    target_parameters: tuple[str, ...]
    lora_parameters: int
    error: str | None = None


def count_lora_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters after tuneforge's default LoRA method (`method: {name: lora}`)."""
    # Imported here: only the matrix reaches into the methods stage; the registry does not.
    from tuneforge.config.schema import LoraMethod
    from tuneforge.methods.prepare import prepare_model

    _, counts = prepare_model(LoraMethod(), model)
    return counts.trainable


def describe_family(family: ModelFamily) -> FamilyResult:
    """The family's doc row without training: build the tiny model and apply the default LoRA.

    Equals `check_family`'s result whenever training works (tests/models/test_families.py checks
    this per family), so the doc test needs no training.
    """
    model = build_tiny_model(family)
    targets = tuple(default_lora_targets(model)), tuple(default_lora_target_parameters(model))
    return FamilyResult(family, *targets, count_lora_parameters(model), family.known_issue)


def save_tiny_checkpoint(family: ModelFamily, directory: Path, tokenizer_dir: Path) -> Path:
    """Save the tiny model and the tokenizer in `tokenizer_dir` as one checkpoint directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if len(tokenizer) > TINY_VOCAB_SIZE:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens; tiny models have {TINY_VOCAB_SIZE}")
    build_tiny_model(family).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def lora_run_config(
    model_dir: Path, data_path: Path, output_dir: Path, cache_dir: Path | None = None
) -> dict[str, Any]:
    """The matrix's run: default LoRA, 3 logged steps on CPU, Q/A template, no checkpoints."""
    config: dict[str, Any] = {
        "model": {"path": str(model_dir)},
        "data": {
            "datasets": [
                {"path": str(data_path), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}
            ],
            "max_length": 32,
        },
        "method": {"name": "lora"},
        "train": {
            "max_steps": TRAIN_STEPS,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "save_strategy": "no",
            "use_cpu": True,
        },
        "output": {"dir": str(output_dir)},
    }
    if cache_dir is not None:
        config["data"]["cache_dir"] = str(cache_dir)
    return config


def write_successor_data(path: Path, count: int = 16) -> Path:
    """Rows of a learnable rule: the answer is the number after the question's number."""
    rows = [{"question": f"after {n}", "answer": str(n + 1)} for n in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def check_step_logs(family: ModelFamily, metrics_path: Path) -> list[dict[str, Any]]:
    """The run's per-step log lines, checked: finite losses, and a router loss for MoE models.

    Raises:
        RuntimeError: a step is missing, a loss is not finite, or an MoE step logged no
            positive `aux_loss`.
    """
    lines = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line]
    steps = [line for line in lines if "loss" in line]
    if len(steps) != TRAIN_STEPS:
        raise RuntimeError(f"expected {TRAIN_STEPS} logged steps, found {len(steps)}")
    for line in steps:
        if not math.isfinite(line["loss"]):
            raise RuntimeError(f"step {line['step']}: loss is {line['loss']}")
        if family.moe and not line.get("aux_loss", 0) > 0:
            raise RuntimeError(f"step {line['step']}: no router aux_loss logged")
    return steps


def check_family(family: ModelFamily, workdir: Path, tokenizer_dir: Path) -> FamilyResult:
    """Save the tiny model, train LoRA on it with `tuneforge.train`, check the logs, and report.

    A failure is recorded in the result (as `ExceptionType: first line`), not raised.
    """
    from tuneforge.train.recipe import train  # the matrix runs the whole pipeline

    model = build_tiny_model(family)
    targets = tuple(default_lora_targets(model)), tuple(default_lora_target_parameters(model))
    model_dir = save_tiny_checkpoint(family, workdir / "model", tokenizer_dir)
    data = write_successor_data(workdir / "train.jsonl")
    try:
        # Its own data cache: the matrix leaves the user's tokenised-data cache alone.
        result = train(lora_run_config(model_dir, data, workdir / "run", cache_dir=workdir / "cache"))
        check_step_logs(family, result.run_dir / "metrics.jsonl")
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row of the doc
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return FamilyResult(family, *targets, 0, f"{type(exc).__name__}: {first_line}")
    return FamilyResult(family, *targets, result.parameters.trainable)


_TOKENIZER_CORPUS = ("### Question:\nafter 41\n\n### Answer:\n42", "The quick brown fox jumps over the lazy dog.")


def build_tokenizer(directory: Path, vocab_size: int = 600, corpus: tuple[str, ...] | list[str] = _TOKENIZER_CORPUS) -> Path:
    """A byte-level BPE tokenizer trained on `corpus`: `<s>` = 0 (added on encode, as Llama
    does), `</s>` = 1, no pad token. The tests build theirs with it too."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(str(directory))
    return directory


_DOC_HEADER = """\
# Model families

Generated by `python -m tuneforge.train.family_matrix > docs/models.md`: for each family it builds
a tiny model (hidden size 32, 2 layers, vocabulary {vocab}) from the family's real
`transformers` config class, saves it with `save_pretrained`, and trains LoRA on it for
{steps} steps through `tuneforge train` with the default `target_modules: all-linear`. A
checkpoint whose `config.json` has one of these model types runs the same `transformers`
modelling class.

`all-linear` adapts every linear layer except the output head; the table lists the names it
resolves to. Give a list of some of them to adapt fewer (`target_modules: [q_proj, v_proj]`).
The last column is the number of trainable LoRA parameters of the tiny model (r = 16).

| family | model type | example checkpoints | MoE | default LoRA targets | tested |
| --- | --- | --- | --- | --- | --- |
"""

_DOC_FOOTER = """
**Mixture-of-experts models** add the router load-balancing loss to the training loss and log
it as `aux_loss` (`model.moe_aux_loss`, on by default). bitsandbytes quantizes linear layers
only, and transformers stores Mixtral's and Qwen-MoE's routed experts as fused 3-D parameters
(most of such a model's weights). With `model.quantization: 4bit` tuneforge stores them as
bitsandbytes NF4 itself (`tuneforge/models/quantized_experts.py`), dequantizes one layer's
experts at a time while it computes, and keeps them frozen: LoRA adapts attention and the
router. Loading holds the experts in 16 bits on the GPU before they are stored (90 GB for
Mixtral-8x7B) unless `model.quantize_via_cpu: true`, which stores them one tensor at a time from
CPU memory: Mixtral-8x7B's QLoRA then loads and trains in under 30 GiB of one GPU (measured on an
H200, docs/guide.md). With `8bit` they stay in 16 bits; `tuneforge plan` counts them either way.

**Checkpoints that ship their own code** (`auto_map` in `config.json`) need
`model.trust_remote_code: true`; `transformers` then runs that code, not its own
implementation, so the layer names above may not apply.
"""


def _row(result: FamilyResult) -> str:
    family = result.family
    name = family.name
    others = [n for n in family.known_as if n != family.name]
    if others:
        name += f" ({', '.join(others)})"
    checkpoints = ", ".join(f"`{c}`" for c in family.checkpoints)
    targets = ", ".join(f"`{t}`" for t in result.targets)
    if result.target_parameters:
        targets += "; parameters " + ", ".join(f"`{t}`" for t in result.target_parameters)
    tested = f"✗ {result.error}" if result.error else f"✓ {result.lora_parameters:,}"
    moe = "yes" if family.moe else "no"
    return f"| {name} | `{family.model_type}` | {checkpoints} | {moe} | {targets} | {tested} |\n"


_HUB_AUTO_MAP_NOTE = (
    "The hub checkpoints' `config.json` also names their own code (`auto_map`), so tuneforge "
    "asks for `model.trust_remote_code: true` (see below)."
)


def _notes(results: Sequence[FamilyResult]) -> str:
    notes = []
    for result in results:
        family = result.family
        parts = [family.note] if family.note else []
        if family.hub_auto_map:
            parts.append(_HUB_AUTO_MAP_NOTE)
        if parts:
            notes.append(f"- **{family.name}.** {' '.join(parts)}\n")
    return "\n" + "".join(notes) if notes else ""


def render_models_doc(results: Sequence[FamilyResult]) -> str:
    """docs/models.md: a table row per family, the families' notes, and the general notes."""
    header = _DOC_HEADER.format(vocab=TINY_VOCAB_SIZE, steps=TRAIN_STEPS)
    return header + "".join(_row(r) for r in results) + _notes(results) + _DOC_FOOTER


def run_matrix(families: Sequence[ModelFamily] = FAMILIES) -> list[FamilyResult]:
    """Train every family in a temporary directory; the results in registry order."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-families-") as tmp:
        root = Path(tmp)
        tokenizer_dir = build_tokenizer(root / "tokenizer")
        results = []
        for family in families:
            workdir = root / family.model_type
            workdir.mkdir()
            results.append(check_family(family, workdir, tokenizer_dir))
        return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix and print docs/models.md; exit 1 when a family disagrees with the registry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("families", nargs="*", help="display names or model types (default: all)")
    args = parser.parse_args(argv)
    families = [get_family(name) for name in args.families] if args.families else list(FAMILIES)
    # Training prints to stdout; send it to stderr so stdout is the document alone.
    with contextlib.redirect_stdout(sys.stderr):
        results = run_matrix(families)
    print(render_models_doc(results), end="")
    surprises = [r for r in results if (r.error is None) != (r.family.known_issue is None)]
    for result in surprises:
        print(f"{result.family.name}: expected {result.family.known_issue!r}, got {result.error!r}", file=sys.stderr)
    return 1 if surprises else 0


__all__ = [
    "FAMILIES",
    "FamilyResult",
    "ModelFamily",
    "build_tiny_model",
    "build_tokenizer",
    "check_family",
    "check_step_logs",
    "count_lora_parameters",
    "default_lora_target_parameters",
    "default_lora_targets",
    "describe_family",
    "get_family",
    "lora_run_config",
    "main",
    "render_models_doc",
    "run_matrix",
    "save_tiny_checkpoint",
    "write_successor_data",
]


if __name__ == "__main__":
    sys.exit(main())
