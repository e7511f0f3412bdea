"""The benchmark cases and what they share: one tokenizer, one set of saved weights per shape,
one set of tokenised rows per case, so every system trains the same model on the same tokens.

The rows come from tuneforge's own data pipeline (the same code `tuneforge train` runs), are
written to JSON lines, and the peers read them back; tuneforge reads the source data through its
config, which yields the same rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B: 8.03B parameters.
    "llama-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=False,
    ),
    # Llama-3.2-1B: 1.24B parameters.
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True,
    ),
    # For checking the benchmark itself on a CPU in seconds.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=8000, max_position_embeddings=4096,
    ),
}


@dataclass(frozen=True)
class Case:
    name: str
    shape: str
    method: str  # lora | qlora | full
    micro_batch: int
    seq: int
    data: str  # fixed: text cut into rows of `seq` tokens; varlen: lamini Q/A, question masked
    steps: int | None  # None: `epochs` over the data
    epochs: int = 2
    # How plain HF ran in the peer figures (../shared/gpu/README.md): checkpointing for 8B LoRA.
    baseline_checkpointing: bool = False
    # tuneforge's own layout for variable-length data: padding-free packing into `seq` tokens.
    packed_micro_batch: int = 1
    description: str = ""
    # Several processes (one per GPU), started through torchrun; micro_batch is per process.
    nproc: int = 1
    strategy: str = "ddp"  # ddp | fsdp | deepspeed (ZeRO-3): tuneforge's distributed.strategy
    # The two-GPU reference figures (../shared/gpu/README.md) kept fp32 master weights under bf16
    # autocast; the one-GPU ones trained the saved bf16 weights.
    baseline_fp32_master: bool = False
    # The one-process case with the same shape, for each system's scaling (x 1 GPU).
    one_gpu_case: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("lora8b", "llama-8b", "lora", 2, 2048, "fixed", 20, baseline_checkpointing=True,
             description="LoRA r16 all-linear, Llama-3.1-8B shape, micro-batch 2, seq 2048"),
        Case("qlora8b", "llama-8b", "qlora", 2, 2048, "fixed", 20, baseline_checkpointing=True,
             description="QLoRA NF4 r16, 8B shape, micro-batch 2, seq 2048"),
        Case("full1b", "llama-1b", "full", 4, 2048, "fixed", 20,
             description="full fine-tuning, Llama-3.2-1B shape, micro-batch 4, seq 2048"),
        Case("varlen8b", "llama-8b", "lora", 8, 4096, "varlen", None, baseline_checkpointing=True,
             description="variable-length SFT: LoRA r16 8B shape, lamini_docs Q/A, question masked, 2 epochs"),
        # Two GPUs (issue 14); tokens/s counts both GPUs' tokens, peak memory is rank 0's.
        Case("full1b-ddp2", "llama-1b", "full", 4, 2048, "fixed", 20, nproc=2, baseline_fp32_master=True,
             one_gpu_case="full1b", description="full fine-tuning, 1B shape, micro-batch 4, DDP on 2 GPUs"),
        Case("lora8b-ddp2", "llama-8b", "lora", 2, 2048, "fixed", 20, baseline_checkpointing=True, nproc=2,
             one_gpu_case="lora8b", description="LoRA r16 all-linear, 8B shape, micro-batch 2, DDP on 2 GPUs"),
        Case("full8b-fsdp2", "llama-8b", "full", 2, 2048, "fixed", 20, baseline_checkpointing=True, nproc=2,
             strategy="fsdp", baseline_fp32_master=True,
             description="full fine-tuning, 8B shape, FSDP2 full shard, micro-batch 2 per GPU, 2 GPUs"),
        Case("full8b-zero3", "llama-8b", "full", 2, 2048, "fixed", 20, baseline_checkpointing=True, nproc=2,
             strategy="deepspeed", baseline_fp32_master=True,
             description="full fine-tuning, 8B shape, DeepSpeed ZeRO-3, micro-batch 2 per GPU, 2 GPUs"),
        # The same cases on a tiny model: the benchmark's own test on a CPU.
        Case("tiny-lora", "tiny", "lora", 2, 128, "fixed", 6, baseline_checkpointing=True),
        Case("tiny-full", "tiny", "full", 2, 128, "fixed", 6),
        Case("tiny-varlen", "tiny", "lora", 8, 256, "varlen", None, epochs=1, baseline_checkpointing=True),
        Case("tiny-full-ddp2", "tiny", "full", 2, 128, "fixed", 6, nproc=2, baseline_fp32_master=True,
             one_gpu_case="tiny-full"),
    )
}


def lamini_rows(data_dir: Path) -> list[dict[str, str]]:
    path = data_dir / "lamini_docs" / "lamini_docs.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_assets(work: Path, data_dir: Path, shapes: set[str]) -> dict[str, Path]:
    """The tokenizer, and saved random weights for each shape (built on the GPU, saved once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from tuneforge.train.family_matrix import build_tokenizer

    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        corpus = [f"{row['question']}\n{row['answer']}" for row in lamini_rows(data_dir)]
        build_tokenizer(tokenizer_dir, vocab_size=2000, corpus=corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    paths = {"tokenizer": tokenizer_dir}
    for shape in sorted(shapes):
        directory = work / f"weights-{shape}"
        if not (directory / "config.json").exists():
            config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
            torch.manual_seed(0)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(str(directory), max_shard_size="5GB")
            tokenizer.save_pretrained(str(directory))
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        paths[shape] = directory
    return paths


def data_section(case: Case, work: Path, data_dir: Path, packing: bool) -> dict[str, Any]:
    """The tuneforge `data` section for a case (also used to make the peers' rows)."""
    if case.data == "fixed":
        source = work / "fixed-text.jsonl"
        if not source.exists():
            # One long document cut into windows of `seq` tokens: every row is full, none padded.
            text = "\n\n".join(f"{row['question']}\n{row['answer']}" for row in lamini_rows(data_dir))
            source.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
        spec = {"path": str(source), "format": "text", "on_too_long": "split"}
    else:
        spec = {
            "path": str(data_dir / "lamini_docs" / "lamini_docs.jsonl"),
            "prompt_fields": ["question"], "response_field": "answer", "template": "qa",
        }
    return {
        "datasets": [spec], "max_length": case.seq, "packing": packing, "cache_dir": str(work / "cache"),
        "on_bad_rows": "skip",  # lamini_docs has a few rows with an empty answer
    }


def write_rows(case: Case, work: Path, data_dir: Path, tokenizer_dir: Path) -> Path:
    """The case's tokenised, unpacked rows ({input_ids, labels} per line) for the peers."""
    from transformers import AutoTokenizer

    from tuneforge.config.schema import DataConfig
    from tuneforge.data.build import build_datasets

    path = work / f"rows-{case.name}.jsonl"
    if path.exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = DataConfig.model_validate(data_section(case, work, data_dir, packing=False))
    train = build_datasets(data, tokenizer, seed=42).train
    with path.open("w", encoding="utf-8") as handle:
        for row in train:
            handle.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    return path


__all__ = ["CASES", "SHAPES", "Case", "build_assets", "data_section", "write_rows"]
