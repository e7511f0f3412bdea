"""Write a self-contained Hugging Face checkpoint of a run, a merged directory or a model.

    tuneforge export runs/pythia-lamini --out exports/pythia-lamini --max-shard-size 2GB
    export_model("runs/pythia-lamini", "exports/pythia-lamini", max_shard_size="2GB")

The result loads with plain `AutoModelForCausalLM` / `AutoTokenizer` and nothing else
(PITFALLS 18): safetensors weights sharded by size with their index, the tokenizer whose
chat template is the run's, a generation config that stops at the trained terminator, any
remote-code `.py` files, and `tuneforge.json`. Pickle files are never written. An adapter run
is merged on the way (`merge_run`, with its logit check); any other source is reloaded from
the written files and must reproduce the source's logits.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.data.templates import template_from_metadata
from tuneforge.infer.merge import (
    DType,
    check_reload,
    default_device,
    dtype_name,
    generation_eos,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer_for_export,
    merge_run,
    model_dir_of,
    probe_logits,
    probe_sequences,
    say,
    staged_output,
    threshold_for,
    write_checkpoint,
)
from tuneforge.train.run_dir import read_run_metadata


def export_model(
    source: str | Path,
    out_dir: str | Path,
    *,
    dtype: DType = "auto",
    max_shard_size: int | str = "5GB",
    max_logit_gap: float | None = None,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> Path:
    """Export `source` to `out_dir` as a standalone checkpoint.

    Args:
        source: A run directory (full weights or adapter), a model directory such as a run's
            `merged/`, or a hub id.
        out_dir: New or empty directory.
        dtype: Save in this dtype; `auto` keeps the source's.
        max_shard_size: Largest weight file (`"5GB"`, or bytes); larger models are sharded
            with a `model.safetensors.index.json`.
        max_logit_gap: Refuse the export above this gap against the source (adapter runs:
            adapter-on-base); default by dtype, see `DEFAULT_MAX_LOGIT_GAP`.
        base_model: For an adapter run, base weights to merge into instead of the recorded ones.
        trust_remote_code: Run the checkpoint's own Python code (also on if the run says so).
        device: Where to load and check; the GPU if there is one.

    Returns:
        `out_dir`.

    Raises:
        MergeError: The output directory is not empty, an `auto_map` module file is missing,
            or the written checkpoint does not reproduce the source's logits.
        ModelError: The source cannot be loaded.
    """
    out_dir = Path(out_dir)
    model_dir = model_dir_of(source)
    if model_dir is not None and is_adapter_dir(model_dir):
        say(f"{model_dir} holds an adapter: merging it into its base on the way")
        report = merge_run(
            source, out_dir, dtype=dtype, max_logit_gap=max_logit_gap, max_shard_size=max_shard_size,
            base_model=base_model, trust_remote_code=trust_remote_code, device=device,
        )
        return report.out_dir

    metadata = read_run_metadata(model_dir) if model_dir is not None else {}
    trust = trust_remote_code or bool(metadata.get("trust_remote_code"))
    template = template_from_metadata(metadata["template"]) if metadata.get("template") else None
    location = str(model_dir) if model_dir is not None else str(source)
    device = device or default_device()

    tokenizer = load_tokenizer_for_export(location, template, trust)
    say(f"loading {location} ({dtype})")
    model = load_causal_lm(location, dtype, trust, device)
    working_dtype = dtype_name(model)
    sequences = probe_sequences(tokenizer, template, model.get_input_embeddings().weight.shape[0])
    reference = probe_logits(model, sequences)
    with staged_output(out_dir) as staging:
        write_checkpoint(
            model, tokenizer, staging,
            eos_token_id=generation_eos(model_dir, template, tokenizer),
            template_metadata=metadata.get("template"),
            code_sources=[model_dir] if model_dir is not None else [],
            trust_remote_code=trust,
            max_shard_size=max_shard_size,
            exported_from=location,
        )
        del model
        gap = check_reload(
            staging, out_dir, reference, sequences, dtype=working_dtype,
            threshold=threshold_for(working_dtype, max_logit_gap),
            trust_remote_code=trust, device=device, against="the source model",
        )
    say(f"exported {location} ({working_dtype}); reloaded from disk, max logit gap {gap:.3g}")
    return out_dir


__all__ = ["export_model"]
