"""One system on one case, in its own process (Unsloth patches transformers on import):

    python -m tuneforge.bench.worker SYSTEM CASE.json WORK RESULT.json

Systems:
- `tuneforge`: `tuneforge.train` with its defaults (speed.liger and speed.activations on auto,
  padding-free packing for variable-length data).
- `hf`: plain `transformers.Trainer` + PEFT, as the peer figures were measured: same rows,
  padded to the longest in the batch, fused AdamW, gradient checkpointing where the case says.
- `trl`: TRL's `SFTTrainer` with BFD packing and padding-free batches (variable-length case).
- `unsloth`: Unsloth's `FastLanguageModel` with its own gradient checkpointing.
All use the same learning rate, seed, rows and `StepTimer`.

A case with `nproc > 1` runs this module under torchrun (runner.py): every rank trains, rank 0
writes the result. Plain HF then runs as people launch it: DDP, or FSDP2 full shard with
LlamaDecoderLayer wrapping and FSDP's activation checkpointing, or DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from tuneforge.bench.cases import Case
from tuneforge.bench.timing import StepTimer, write_result

LEARNING_RATE = 2e-4
SEED = 42
WARMUP_STEPS = 3
# Losses are logged every 10 steps, as tuneforge logs by default: a log reads the loss on the
# host, which empties the GPU's queue; a run that logged every step would pay that each step.
LOGGING_STEPS = 10
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logging_steps(case: Case) -> int:
    """Every `LOGGING_STEPS` steps, and at least twice in a run of fixed steps."""
    return max(1, min(LOGGING_STEPS, case.steps // 2)) if case.steps else LOGGING_STEPS


def _schedule(case: Case) -> dict[str, Any]:
    return {"max_steps": case.steps} if case.steps else {"num_train_epochs": case.epochs}


def _common_arguments(case: Case, run_dir: Path, micro_batch: int, **extra: Any) -> dict[str, Any]:
    return {
        "output_dir": str(run_dir),
        "per_device_train_batch_size": micro_batch,
        "learning_rate": LEARNING_RATE,
        "seed": SEED,
        "bf16": torch.cuda.is_available(),
        "use_cpu": not torch.cuda.is_available(),
        "logging_steps": logging_steps(case),
        "save_strategy": "no",
        "report_to": "none",
        "include_num_input_tokens_seen": "non_padding",
        **_schedule(case),
        **extra,
    }


def _rows(work: Path, case: Case) -> Any:
    from datasets import Dataset

    lines = (work / f"rows-{case.name}.jsonl").read_text(encoding="utf-8").splitlines()
    return Dataset.from_list([json.loads(line) for line in lines])


def run_tuneforge(case: Case, work: Path, run_dir: Path, callbacks: list[Any], overrides: list[str]) -> None:
    from tuneforge.bench.cases import data_section
    from tuneforge import train  # the public entry point: the path `tuneforge train` runs

    varlen = case.data == "varlen"
    method: dict[str, Any] = {"name": "full"} if case.method == "full" else {
        "name": "lora", "r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "target_modules": "all-linear",
    }
    arguments = _common_arguments(case, run_dir, case.packed_micro_batch if varlen else case.micro_batch)
    for key in ("output_dir", "include_num_input_tokens_seen"):
        arguments.pop(key)  # tuneforge sets these itself
    config = {
        "model": {
            "path": str(work / f"weights-{case.shape}"),
            "quantization": "4bit" if case.method == "qlora" else "none",
        },
        "data": {**data_section(case, work, work / "data", packing=varlen)},
        "method": method,
        "train": arguments,
        "output": {"dir": str(run_dir), "overwrite": True},
        "distributed": {"strategy": case.strategy},  # deepspeed: ZeRO-3, the default stage
    }
    train(config, overrides=overrides, callbacks=callbacks)


def _peft_model(case: Case, work: Path, checkpointing: bool) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if case.method == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    cuda = torch.cuda.is_available()
    bf16_weights = cuda and not case.baseline_fp32_master
    # FSDP and ZeRO-3 place (and shard) the weights themselves; DDP needs each rank's own GPU.
    placement = {} if case.strategy != "ddp" else {
        "device_map": {"": f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"}
    }
    model = AutoModelForCausalLM.from_pretrained(
        str(work / f"weights-{case.shape}"), dtype=torch.bfloat16 if bf16_weights else torch.float32,
        attn_implementation="sdpa", quantization_config=quantization, **placement,
    )
    if case.method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=LORA_TARGETS, **LORA))


def run_hf(case: Case, work: Path, run_dir: Path, callbacks: list[Any], overrides: list[str]) -> None:
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    checkpointing = case.baseline_checkpointing
    # Before the model: with ZeRO-3 the arguments make from_pretrained load straight into shards.
    arguments = TrainingArguments(**_common_arguments(case, run_dir, case.micro_batch, **_hf_engine(case, checkpointing)))
    model = _peft_model(case, work, checkpointing)
    Trainer(
        model=model, args=arguments, train_dataset=_rows(work, case),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        callbacks=callbacks,
    ).train()


def _hf_engine(case: Case, checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments for the case's engine, as the Hugging Face docs configure it."""
    if case.strategy == "fsdp":
        return {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                "version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "activation_checkpointing": checkpointing,
            },
        }
    if case.strategy == "deepspeed":
        from tuneforge.config.schema import DistributedConfig
        from tuneforge.train.distributed import deepspeed_config

        # The shipped ZeRO-3 file is DeepSpeed's standard one with "auto" values.
        return {"deepspeed": deepspeed_config(DistributedConfig(strategy="deepspeed", zero_stage=3)),
                "gradient_checkpointing": checkpointing}
    return {"gradient_checkpointing": checkpointing}


def run_trl(case: Case, work: Path, run_dir: Path, callbacks: list[Any], overrides: list[str]) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = _rows(work, case).map(
        lambda row: {"completion_mask": [int(label != -100) for label in row["labels"]]}, remove_columns=["labels"]
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(work / f"weights-{case.shape}"), dtype=torch.bfloat16, attn_implementation="sdpa",
    )
    arguments = _common_arguments(case, run_dir, case.packed_micro_batch, gradient_checkpointing=True)
    config = SFTConfig(
        **arguments, packing=True, packing_strategy="bfd", padding_free=True, max_length=case.seq,
        completion_only_loss=True, dataset_num_proc=1,
    )
    SFTTrainer(
        model=model, args=config, train_dataset=rows, processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", target_modules=LORA_TARGETS, **LORA), callbacks=callbacks,
    ).train()


def run_unsloth(case: Case, work: Path, run_dir: Path, callbacks: list[Any], overrides: list[str]) -> None:
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )
    from unsloth import FastLanguageModel  # first: it patches transformers

    model, _ = FastLanguageModel.from_pretrained(
        str(work / f"weights-{case.shape}"), max_seq_length=case.seq, dtype=torch.bfloat16,
        load_in_4bit=case.method == "qlora", full_finetuning=case.method == "full",
    )
    if case.method != "full":
        model = FastLanguageModel.get_peft_model(
            model, target_modules=LORA_TARGETS, use_gradient_checkpointing="unsloth", random_state=SEED, **LORA
        )
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    Trainer(
        model=model, args=TrainingArguments(**_common_arguments(case, run_dir, case.micro_batch)),
        train_dataset=_rows(work, case),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        callbacks=callbacks,
    ).train()


SYSTEMS = {"tuneforge": run_tuneforge, "hf": run_hf, "trl": run_trl, "unsloth": run_unsloth}


def main(argv: list[str]) -> int:
    label, case_path, work, result_path, *flags = argv
    from tuneforge.train.distributed import die_with_launcher

    die_with_launcher()  # a case the runner stops on its timeout takes its torchrun workers along
    # `tuneforge+speed.activations=recompute`: a system with config overrides (tuneforge only).
    system, *overrides = label.split("+")
    case = Case(**json.loads(Path(case_path).read_text(encoding="utf-8")))
    callbacks: list[Any] = [StepTimer()]
    if "--profile" in flags:
        from tuneforge.bench.profile import StepProfiler

        callbacks.append(StepProfiler(step=WARMUP_STEPS + 1, trace_path=f"{result_path}.trace.json.gz"))
    # Each run its own folder: runs of one case may go at once (`tuneforge bench --parallel`).
    run_dir = Path(work) / "runs" / Path(result_path).name.removeprefix("result-").removesuffix(".json")
    SYSTEMS[system](case, Path(work), run_dir, callbacks, overrides)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0's timer and memory are the result
    profiled = (callbacks[1].step, callbacks[1].seconds_spent) if len(callbacks) > 1 else None
    result = {"system": label, "case": case.name, **callbacks[0].result(WARMUP_STEPS, left_out=profiled)}
    if len(callbacks) > 1:
        result["profile_seconds"] = callbacks[1].seconds_by_class
        result["profile_top_other"] = callbacks[1].top_other
        result["profile_compute_seconds"] = callbacks[1].compute_seconds
    write_result(result_path, result)
    return 0


if __name__ == "__main__":
    from tuneforge.cli.main import exit_process

    exit_process(main(sys.argv[1:]))
