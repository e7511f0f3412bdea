"""Fold a LoRA run's adapter into its base weights and write a checkpoint that stands alone.

    tuneforge merge runs/llama3-8b-lora --out exports/llama3-8b-merged --dtype bfloat16
    merge_run("runs/llama3-8b-lora", "exports/llama3-8b-merged", dtype="bfloat16")

The base is loaded from disk in a float dtype, never 4-bit, even for a QLoRA run: merging
into quantized weights changes outputs (peft#2321, PITFALLS 17). Before merging, the
adapter-on-base model's logits on a few fixed token sequences are recorded; the written
checkpoint is then reloaded with plain `AutoModelForCausalLM` and must reproduce them within
`max_logit_gap`, or nothing is kept.

The checkpoint is self-contained (PITFALLS 18): safetensors only, the tokenizer with the run's
chat template, a generation config whose `eos_token_id` holds the template's stop tokens, the
base's remote-code `.py` files, and a `tuneforge.json` (`adapter: false`, template kept).
`tuneforge.infer.export` writes other sources through the same functions.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
)

from tuneforge.data.templates import (
    Template,
    encode_prompt_for_generation,
    template_from_metadata,
)
from tuneforge.errors import ModelError, TuneforgeError
from tuneforge.train.run_dir import read_run_metadata, write_run_metadata

DType = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Largest |logit| difference accepted between adapter-on-base and the merged checkpoint. Both
# sides round in the working dtype, along different paths (x·W + x·A·B vs x·(W + A·B)), so the
# bound follows the dtype's precision: float32 agrees to rounding noise; bf16 keeps 8 mantissa
# bits, so on logits of 20-30 a few rounding steps already add up to tenths. What the check
# exists for (a merge into other weights than the adapter saw, an overflow, a lost module)
# moves logits by about as much as the adapter itself does (`MergeReport.adapter_effect`).
DEFAULT_MAX_LOGIT_GAP: dict[str, float] = {"float32": 1e-3, "float16": 1e-1, "bfloat16": 5e-1}

# Fixed probes: plain text in several scripts, code, and (with a template) a chat prompt.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))",
    "日本の首都は東京です。深圳是中国的一个城市。",
)
PROBE_PROMPT = "Write forty two in digits."
PROBE_MAX_TOKENS = 64

# What `save_pretrained` writes that a loader could execute on read; never part of an export.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class MergeError(TuneforgeError):
    """A run cannot be merged or exported, or the result does not reproduce the source."""


@dataclass
class MergeReport:
    """What `merge_run` wrote and how closely it reproduces adapter-on-base.

    Attributes:
        out_dir: The checkpoint directory.
        max_logit_gap: Largest |logit| difference, merged checkpoint vs adapter-on-base.
        threshold: The gap above which the merge was refused.
        adapter_effect: Largest |logit| difference, adapter-on-base vs base alone (how much
            the adapter changes the model; a gap is only meaningful next to it).
        dtype: The dtype the base was loaded, merged and saved in.
        base_model: Where the base weights came from.
        files: Names of the files written, sorted.
    """

    out_dir: Path
    max_logit_gap: float
    threshold: float
    adapter_effect: float
    dtype: str
    base_model: str
    files: list[str] = field(default_factory=list)


def say(message: str) -> None:
    print(f"[tuneforge] {message}", flush=True)


# --- sources -------------------------------------------------------------------------------


def model_dir_of(source: str | Path) -> Path | None:
    """`RUN/model` for a run directory, the directory itself for a model directory, else None."""
    path = Path(source)
    if (path / "model").is_dir():
        return path / "model"
    return path if path.is_dir() else None


def is_adapter_dir(directory: Path) -> bool:
    return bool(read_run_metadata(directory).get("adapter")) or (directory / "adapter_config.json").is_file()


def resolve_base_model(adapter_dir: Path, override: str | None) -> str:
    """The base weights the adapter was trained on: `override`, `tuneforge.json`, then peft's record.

    A random-init run records `RUN/base` as given at training time, which may be relative to
    the directory training ran from; the run's own `base/` (beside `model/`) is used when that
    path is gone.
    """
    if override is not None:
        return override
    recorded = read_run_metadata(adapter_dir).get("base_model")
    if not recorded and (adapter_dir / "adapter_config.json").is_file():
        recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    own_base = adapter_dir.parent / "base"
    if recorded and not Path(recorded).exists() and own_base.is_dir():
        return str(own_base)
    if not recorded:
        raise MergeError(
            "the adapter does not record its base model",
            where=str(adapter_dir),
            hint="pass the base checkpoint with --base (library: base_model=...)",
        )
    return str(recorded)


def refuse_quantized_base(base_model: str) -> None:
    """A checkpoint stored quantized cannot be merged into without changing outputs (PITFALLS 17)."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(base_model)
    except OSError as exc:
        raise ModelError(
            f"cannot read the base model's config: {str(exc).strip().splitlines()[0]}",
            where=f"base model {base_model}",
            hint="pass the base checkpoint with --base (a local directory or a cached hub id)",
        ) from None
    quantization = config_dict.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
        raise MergeError(
            f"the base checkpoint stores {method} weights; merging an adapter into quantized "
            "weights changes the model's outputs (peft#2321)",
            where=f"base model {base_model}",
            hint="pass the unquantized (bf16/fp32) checkpoint it was made from with --base",
        )


def load_causal_lm(source: str, dtype: str, trust_remote_code: bool, device: str) -> torch.nn.Module:
    """`AutoModelForCausalLM` in `dtype` (`auto`: the checkpoint's), unquantized, in eval mode."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES.get(dtype, "auto"), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(
            str(exc).strip().splitlines()[0],
            where=source,
            hint="a checkpoint with its own code needs --trust-remote-code"
            if "trust_remote_code" in str(exc)
            else "give a run directory (with model/), a model directory or a hub id",
        ) from None
    return model.to(device).eval()


def load_tokenizer_for_export(directory: str, template: Template | None, trust_remote_code: bool) -> Any:
    """The run's tokenizer, carrying the template it trained with as its chat template."""
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if template is not None:
        tokenizer.chat_template = template.chat_template
    return tokenizer


# --- probes --------------------------------------------------------------------------------


def probe_sequences(tokenizer: Any, template: Template | None, vocab_size: int) -> list[list[int]]:
    """Token sequences the logit check runs on: fixed texts, and the template's prompt if any."""
    sequences = [list(tokenizer(text)["input_ids"]) for text in PROBE_TEXTS]
    if template is not None:
        sequences.append(encode_prompt_for_generation(tokenizer, template, PROBE_PROMPT, None))
    clipped = [[i for i in ids if i < vocab_size][:PROBE_MAX_TOKENS] for ids in sequences]
    return [ids for ids in clipped if ids]


@torch.no_grad()
def probe_logits(model: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits per sequence, each run alone (no padding to get wrong), on the CPU."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in sequences]


def max_gap(left: list[torch.Tensor], right: list[torch.Tensor]) -> float:
    """Largest |difference|; NaN counts as infinite, so an overflow can never pass a check."""
    return max(
        float(torch.nan_to_num((a - b).abs(), nan=float("inf")).max()) for a, b in zip(left, right, strict=True)
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_name(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def threshold_for(dtype: str, max_logit_gap: float | None) -> float:
    return max_logit_gap if max_logit_gap is not None else DEFAULT_MAX_LOGIT_GAP.get(dtype, 5e-1)


# --- writing -------------------------------------------------------------------------------


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A staging directory beside `out_dir`, renamed to it on success and deleted on failure.

    A checkpoint that fails its check is never left where a user would load it from.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeError(
            "the output directory already exists and is not empty",
            where=str(out_dir),
            hint="choose a new directory, or delete this one first",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # No dots in the name: transformers imports remote code from a module named after it.
    staging = Path(tempfile.mkdtemp(prefix="tuneforge_partial_", dir=out_dir.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def generation_eos(source_dir: Path | None, template: Template | None, tokenizer: Any) -> list[int] | None:
    """The ids generation must stop on: the source's generation config, plus the template's stops."""
    eos: list[int] = []
    if source_dir is not None and (source_dir / "generation_config.json").is_file():
        recorded = GenerationConfig.from_pretrained(str(source_dir)).eos_token_id
        eos = list(recorded) if isinstance(recorded, list) else [recorded] if recorded is not None else []
    if template is not None:
        eos += [i for i in template.stop_token_ids(tokenizer) if i not in eos]
    return eos or None


def _auto_map_modules(directory: Path) -> set[str]:
    """Module files named by `auto_map` in config.json and tokenizer_config.json."""
    modules = set()
    for name in ("config.json", "tokenizer_config.json"):
        path = directory / name
        auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map", {}) if path.is_file() else {}
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                if reference and "--" not in reference:  # "repo--module.Class" lives in another repo
                    modules.add(reference.split(".")[0] + ".py")
    return modules


def copy_remote_code(out_dir: Path, sources: list[Path]) -> None:
    """For a checkpoint with its own code, copy the `.py` files of local source directories
    that the export does not have yet (modules the `auto_map` ones import relatively too).

    Raises:
        MergeError: `auto_map` names a module file the export still lacks (it would not load).
    """
    if not _auto_map_modules(out_dir):
        return  # plain architecture: scripts lying beside the weights are not part of it
    for source in sources:
        for path in sorted(source.glob("*.py")) if source.is_dir() else []:
            if not (out_dir / path.name).exists():
                shutil.copy2(path, out_dir / path.name)
    missing = sorted(name for name in _auto_map_modules(out_dir) if not (out_dir / name).is_file())
    if missing:
        raise MergeError(
            f"the checkpoint's auto_map needs {', '.join(missing)}, which no source directory has",
            where=str(out_dir),
            hint="download the base model to a local directory and pass it with --base",
        )


def write_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    *,
    eos_token_id: list[int] | None,
    template_metadata: dict[str, Any] | None,
    code_sources: list[Path],
    trust_remote_code: bool,
    max_shard_size: int | str,
    **provenance: Any,
) -> list[str]:
    """Write weights (safetensors, sharded), tokenizer, generation config, code and tuneforge.json.

    Returns:
        The names of the files written, sorted.
    """
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        if eos_token_id is not None:
            generation_config.eos_token_id = eos_token_id
        if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
            generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out_dir))
    copy_remote_code(out_dir, code_sources)
    write_run_metadata(
        out_dir,
        base_model=None,
        adapter=False,
        template=template_metadata,
        trust_remote_code=trust_remote_code,
        **provenance,
    )
    pickled = sorted(p.name for p in out_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:  # save_pretrained writes safetensors only; a library change must not slip through
        raise MergeError(f"pickle files were written: {', '.join(pickled)}", where=str(out_dir))
    return sorted(p.name for p in out_dir.iterdir())


def check_reload(
    staging: Path, out_dir: Path, reference: list[torch.Tensor], sequences: list[list[int]],
    *, dtype: str, threshold: float, trust_remote_code: bool, device: str, against: str,
) -> float:
    """Reload the written checkpoint with plain `AutoModelForCausalLM` and measure its logit gap.

    Raises:
        MergeError: The gap exceeds `threshold`.
    """
    reloaded = load_causal_lm(str(staging), dtype, trust_remote_code, device)
    gap = max_gap(reference, probe_logits(reloaded, sequences))
    del reloaded
    if gap > threshold:
        raise MergeError(
            f"the written checkpoint's logits differ from {against} by up to {gap:.3g} "
            f"(limit {threshold:.3g} for {dtype}); nothing was kept",
            where=str(out_dir),
            hint="this dtype rounds the merged weights too coarsely for the limit: merge with "
            "--dtype float32, or accept the gap with --max-logit-gap",
        )
    return gap


# --- merge ---------------------------------------------------------------------------------


def _adapter_on_base(
    adapter_dir: Path, base_model: str, tokenizer: Any, dtype: DType, trust_remote_code: bool, device: str
) -> torch.nn.Module:
    from peft import PeftModel

    base = load_causal_lm(base_model, dtype, trust_remote_code, device)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        # Tokens added in training: the adapter carries their rows, the base needs room for them.
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise MergeError(
            f"the adapter does not fit this base model: {str(exc).strip().splitlines()[0]}",
            where=str(adapter_dir),
            hint=f"it was loaded onto {base_model}; pass the base it was trained on with --base",
        ) from None


def merge_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: DType = "auto",
    max_logit_gap: float | None = None,
    max_shard_size: int | str = "5GB",
    base_model: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> MergeReport:
    """Merge an adapter run into its base and write a self-contained checkpoint to `out_dir`.

    Args:
        run_dir: A LoRA run directory (with `model/`), or an adapter directory.
        out_dir: New or empty directory for the checkpoint.
        dtype: Load, merge and save in this dtype; `auto` keeps the base checkpoint's.
        max_logit_gap: Refuse the merge above this gap; default by dtype, see
            `DEFAULT_MAX_LOGIT_GAP`.
        max_shard_size: Largest weight file (`"5GB"`, or bytes).
        base_model: Base weights to use instead of those the run records (unquantized).
        trust_remote_code: Run the checkpoint's own Python code (also on if the run says so).
        device: Where to merge and check; the GPU if there is one.

    Returns:
        A `MergeReport`; the gap is measured on the checkpoint as reloaded from disk.

    Raises:
        MergeError: The run has no adapter (use `export_model`), the base is stored quantized,
            the output directory is not empty, or the merged checkpoint's logits differ from
            adapter-on-base by more than `max_logit_gap`.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    adapter_dir = model_dir_of(run_dir)
    if adapter_dir is None:
        raise MergeError("no such directory", where=str(run_dir), hint="give a LoRA run directory (with model/)")
    if not is_adapter_dir(adapter_dir):
        raise MergeError(
            "there is no adapter to merge: this run saved full weights",
            where=str(run_dir),
            hint=f"write a standalone checkpoint of it with: tuneforge export {run_dir} --out DIR",
        )
    metadata = read_run_metadata(adapter_dir)
    trust = trust_remote_code or bool(metadata.get("trust_remote_code"))
    template = template_from_metadata(metadata["template"]) if metadata.get("template") else None
    base = resolve_base_model(adapter_dir, base_model)
    refuse_quantized_base(base)
    device = device or default_device()

    tokenizer = load_tokenizer_for_export(str(adapter_dir), template, trust)
    say(f"loading base {base} ({dtype}) and the adapter from {adapter_dir}")
    model = _adapter_on_base(adapter_dir, base, tokenizer, dtype, trust, device)
    working_dtype = dtype_name(model)
    threshold = threshold_for(working_dtype, max_logit_gap)
    sequences = probe_sequences(tokenizer, template, model.get_input_embeddings().weight.shape[0])
    reference = probe_logits(model, sequences)
    with model.disable_adapter():
        adapter_effect = max_gap(reference, probe_logits(model, sequences))
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaNs in a merged weight
        raise MergeError(
            str(exc).strip().splitlines()[0], where=str(adapter_dir), hint="merge in a wider dtype: --dtype float32"
        ) from None
    del model

    with staged_output(out_dir) as staging:
        files = write_checkpoint(
            merged, tokenizer, staging,
            eos_token_id=generation_eos(adapter_dir, template, tokenizer),
            template_metadata=metadata.get("template"),
            code_sources=[Path(base), adapter_dir],
            trust_remote_code=trust,
            max_shard_size=max_shard_size,
            merged_from=str(run_dir),
        )
        del merged
        gc.collect()
        gap = check_reload(
            staging, out_dir, reference, sequences, dtype=working_dtype, threshold=threshold,
            trust_remote_code=trust, device=device, against="adapter-on-base",
        )
    say(
        f"merged {adapter_dir} into {base} ({working_dtype}): max logit gap {gap:.3g} "
        f"(limit {threshold:.3g}; the adapter moves logits by up to {adapter_effect:.3g})"
    )
    return MergeReport(out_dir, gap, threshold, adapter_effect, working_dtype, base, files)


__all__ = [
    "DEFAULT_MAX_LOGIT_GAP",
    "MergeError",
    "MergeReport",
    "merge_run",
    "write_checkpoint",
]
